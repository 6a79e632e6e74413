"""A Redis master, its replica and three Sentinels (quorum 2) on real processes, all with
passwords, on free loopback ports in a temporary directory: the topology of the Sentinel
tests (tests/integration/test_redis_sentinel_failover.py, and over TLS
tests/integration/test_redis_tls.py).

Only ``redis-server`` is needed (``--sentinel`` is the same binary). Every wait is bounded by
:data:`BOUND_SECONDS`, so a topology that never forms fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)
from broker.devstack import ManagedProcess, free_port, redis_config, wait_until
from tests.conftest import LOG_DIR, remember_secret
from tests.redis_tls import RedisTLSFiles, tls_server_config, write_redis_tls_files

SERVICE = "tl-ledger"
SENTINEL_PASSWORD_ENV = "TL_TEST_SENTINEL_PASSWORD"
# Every wait is bounded by this: a broken failover fails the test instead of hanging it.
BOUND_SECONDS = 20.0
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/planner"


def ledger_run(workflow_id: str) -> WorkflowRun:
    """A run of alice's, an hour long from :data:`NOW`."""
    return WorkflowRun(
        id=workflow_id,
        owner="alice@example.com",
        purpose="Redis topology test",
        started_by=AGENT,
        created_at=NOW,
        deadline=NOW + timedelta(hours=1),
    )


def ledger_lease(credential_id: str, workflow_id: str = "wf-failover") -> Lease:
    """A database lease of :data:`AGENT` in ``workflow_id``, 15 minutes from :data:`NOW`."""
    return Lease(
        credential_id=credential_id,
        workflow_id=workflow_id,
        task_id=f"task-{credential_id}",
        target="db-orders",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.CONFIDENTIAL,
        holder=AGENT,
        owner="alice@example.com",
        chain=DelegationChain((DelegationHop("agent", AGENT, verified=True),)),
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=15),
    )


async def write_and_activate(
    ledger: RedisLedger, credential_id: str, workflow_id: str = "wf-failover"
) -> Lease:
    """An issuance's two writes: the lease written ahead, then activated."""
    await ledger.write_ahead(ledger_lease(credential_id, workflow_id))
    return await ledger.activate(
        credential_id, token_accessor=f"acc-{credential_id}", vault_lease_ids=()
    )


@dataclass
class Topology:
    """A master, its replica and three Sentinels; ``processes`` by name."""

    root: Path
    logs: Path
    password: str
    sentinel_password: str
    tls: RedisTLSFiles | None = None
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    def _conf(self, name: str, text: str) -> Path:
        data = self.root / name
        data.mkdir()
        conf = data / f"{name}.conf"
        conf.touch(mode=0o600)  # it holds passwords
        conf.write_text(text)
        return conf

    def _start(self, name: str, argv: list[str]) -> None:
        process = ManagedProcess(name, argv, self.logs / f"{name}.log")
        self.processes[name] = process
        process.start()

    def start_redis(self, name: str, *, replica_of: int | None = None) -> None:
        port = self.ports[name]
        text = redis_config(port=port, data_dir=self.root / name, password=self.password)
        if self.tls is not None:
            text += tls_server_config(port, self.tls)
        if replica_of is not None:
            text += f"replicaof 127.0.0.1 {replica_of}\nmasterauth {self.password}\n"
        else:
            # A master demoted after a failover must follow the new one with the password;
            # a replica's sync starts at once (Redis waits 5 s for more replicas by default).
            text += f"masterauth {self.password}\nrepl-diskless-sync-delay 0\n"
        self._start(name, ["redis-server", str(self._conf(name, text))])

    def start_sentinel(self, name: str) -> None:
        text = "\n".join(
            [
                "bind 127.0.0.1",
                f"port {self.ports[name]}",
                f"dir {self.root / name}",
                "daemonize no",
                # Clients, and the other Sentinels, must give this password.
                f"requirepass {self.sentinel_password}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports['master']} 2",
                f"sentinel auth-pass {SERVICE} {self.password}",
                f"sentinel down-after-milliseconds {SERVICE} 500",
                f"sentinel failover-timeout {SERVICE} 2000",
                f"sentinel parallel-syncs {SERVICE} 1",
                "",
            ]
        )
        if self.tls is not None:
            text += tls_server_config(self.ports[name], self.tls)
        self._start(name, ["redis-server", str(self._conf(name, text)), "--sentinel"])

    def client(self, name: str) -> redis.Redis:
        password = self.sentinel_password if name.startswith("sentinel") else self.password
        tls: dict[str, object] = {}
        if self.tls is not None:
            tls = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key),
            }
        return redis.Redis(
            host="127.0.0.1",
            port=self.ports[name],
            password=password,
            decode_responses=True,
            socket_timeout=2,
            **tls,  # type: ignore[arg-type]
        )

    def info(self, name: str, section: str) -> dict[str, object]:
        with self.client(name) as client:
            reply: dict[str, object] = client.info(section)
            return reply

    def answers(self, name: str) -> bool:
        with self.client(name) as client:
            return bool(client.ping())

    def replica_in_sync(self) -> bool:
        return self.info("replica", "replication").get("master_link_status") == "up"

    def sentinels_ready(self) -> bool:
        """Every Sentinel sees the master, the two other Sentinels and the replica, up and
        linked to the master (else a failover would find nothing to promote)."""
        for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
            with self.client(name) as client:
                state = client.sentinel_master(SERVICE)
                replicas = client.sentinel_slaves(SERVICE)
            if int(state["num-other-sentinels"]) != 2 or len(replicas) != 1:
                return False
            if replicas[0]["is_sdown"] or replicas[0].get("master-link-status") != "ok":
                return False
        return True

    def settings(self, **overrides: object) -> RedisSettings:
        values: dict[str, object] = {
            # Only the master's password: where it is, the Sentinels say.
            "url": f"{'redis' if self.tls is None else 'rediss'}://:{self.password}@/0",
            "sentinels": tuple(f"127.0.0.1:{self.ports[f'sentinel-{i}']}" for i in (1, 2, 3)),
            "sentinel_service": SERVICE,
            "sentinel_password_env": SENTINEL_PASSWORD_ENV,
            "socket_timeout_seconds": 1.0,
            "durability": "replicas",
            "durability_replicas": 1,
            "durability_timeout_ms": 500,
        }
        if self.tls is not None:
            values["tls_ca_file"] = str(self.tls.ca)
            values["tls_cert_file"] = str(self.tls.client_cert)
            values["tls_key_file"] = str(self.tls.client_key)
        values.update(overrides)
        return RedisSettings.model_validate(values)

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop(timeout=5)


@contextlib.contextmanager
def running_topology(
    monkeypatch: pytest.MonkeyPatch, *, label: str, tls: bool = False
) -> Iterator[Topology]:
    """A started topology (the master, its replica in sync, three Sentinels that see them and
    each other) in a temporary directory, stopped and removed afterwards; with ``tls``, every
    server and Sentinel speaks only TLS and asks clients for a certificate."""
    root = Path(tempfile.mkdtemp(prefix=f"tl-{label}-", dir="/tmp"))
    topo = Topology(
        root=root,
        # Under the session's log directory: the secret scan reads these logs.
        logs=LOG_DIR / label / root.name,
        password=remember_secret(secrets.token_urlsafe(24)),
        sentinel_password=remember_secret(secrets.token_urlsafe(24)),
        tls=write_redis_tls_files(root / "pki") if tls else None,
    )
    monkeypatch.setenv(SENTINEL_PASSWORD_ENV, topo.sentinel_password)
    for name in ("master", "replica", "sentinel-1", "sentinel-2", "sentinel-3"):
        topo.ports[name] = free_port()
    try:
        topo.start_redis("master")
        wait_until(
            lambda: topo.answers("master"),
            what="the master to answer",
            timeout=BOUND_SECONDS,
            process=topo.processes["master"],
        )
        topo.start_redis("replica", replica_of=topo.ports["master"])
        wait_until(
            topo.replica_in_sync,
            what="the replica to sync",
            timeout=BOUND_SECONDS,
            process=topo.processes["replica"],
        )
        for i in (1, 2, 3):
            topo.start_sentinel(f"sentinel-{i}")
        wait_until(
            topo.sentinels_ready,
            what="the Sentinels to see the master, the replica and each other",
            timeout=BOUND_SECONDS,
        )
        yield topo
    finally:
        topo.stop()
        shutil.rmtree(root, ignore_errors=True)
