"""The ledger behind Redis Sentinel, on real processes: a master (AOF, ``appendfsync always``),
one replica and three Sentinels (quorum 2), all with passwords, on free loopback ports in a
temporary directory, started per test and torn down after it (SECURITY.md 32, failover case).

Only ``redis-server`` is needed (``--sentinel`` is the same binary); the session's stack
fixture checks the machine as for every stack test. Every wait is bounded, so a failover that
never happens fails the test instead of hanging it. The service's side of a refused
acknowledgement (the credential is revoked, no secret returned) is
tests/unit/test_service_issuance.py::test_a_failed_acknowledgement_revokes_and_returns_no_secret.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from broker.adapters.redis_connection import SentinelMasterRedis, WaitingSentinelConnectionPool
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)
from broker.devstack import DevStack, ManagedProcess, free_port, redis_config, wait_until
from broker.errors import LedgerUnavailableError
from tests.conftest import LOG_DIR, remember_secret

SERVICE = "tl-ledger"
SENTINEL_PASSWORD_ENV = "TL_TEST_SENTINEL_PASSWORD"
# Every wait is bounded by this: a broken failover fails the test instead of hanging it.
BOUND_SECONDS = 20.0
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/planner"


def _lease(credential_id: str) -> Lease:
    return Lease(
        credential_id=credential_id,
        workflow_id="wf-failover",
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


async def _write_and_activate(ledger: RedisLedger, credential_id: str) -> Lease:
    await ledger.write_ahead(_lease(credential_id))
    return await ledger.activate(
        credential_id, token_accessor=f"acc-{credential_id}", vault_lease_ids=()
    )


# --------------------------------------------------------------------------- the topology


@dataclass
class Topology:
    """A master, its replica and three Sentinels; ``processes`` by name."""

    root: Path
    logs: Path
    password: str
    sentinel_password: str
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
        self._start(name, ["redis-server", str(self._conf(name, text)), "--sentinel"])

    def client(self, name: str) -> redis.Redis:
        password = self.sentinel_password if name.startswith("sentinel") else self.password
        return redis.Redis(
            port=self.ports[name], password=password, decode_responses=True, socket_timeout=2
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
            "url": f"redis://:{self.password}@/0",
            "sentinels": tuple(f"127.0.0.1:{self.ports[f'sentinel-{i}']}" for i in (1, 2, 3)),
            "sentinel_service": SERVICE,
            "sentinel_password_env": SENTINEL_PASSWORD_ENV,
            "socket_timeout_seconds": 1.0,
            "durability": "replicas",
            "durability_replicas": 1,
            "durability_timeout_ms": 500,
        }
        values.update(overrides)
        return RedisSettings.model_validate(values)

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop(timeout=5)


@pytest.fixture
def topology(stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    # ``stack`` (the session's, already running) applies the suite's one rule for a machine
    # without redis-server and the rest: fail with TASKLEASE_REQUIRE_STACK=1. Its own
    # processes are not used here.
    root = Path(tempfile.mkdtemp(prefix="tl-sentinel-", dir="/tmp"))
    topo = Topology(
        root=root,
        # Under the session's log directory: the secret scan reads these logs.
        logs=LOG_DIR / "sentinel-failover" / root.name,
        password=remember_secret(secrets.token_urlsafe(24)),
        sentinel_password=remember_secret(secrets.token_urlsafe(24)),
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


@pytest.fixture
async def ledgers() -> AsyncIterator[list[RedisLedger]]:
    opened: list[RedisLedger] = []
    yield opened
    for ledger in opened:
        await ledger.close()


async def _server_port(ledger: RedisLedger) -> int:
    return int((await ledger.client.info("server"))["tcp_port"])


async def _eventually(check: Callable[[], Awaitable[bool]], *, what: str) -> None:
    """Poll an async predicate until it is true, for at most BOUND_SECONDS."""
    deadline = time.monotonic() + BOUND_SECONDS
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {BOUND_SECONDS} s")


# --------------------------------------------------------------------------- tests


async def test_a_lease_acknowledged_by_wait_survives_a_failover(
    topology: Topology, ledgers: list[RedisLedger]
) -> None:
    """SECURITY 32, failover: a lease activated with WAIT 1 acknowledged, then the master is
    SIGKILLed; Sentinel promotes the replica; the ledger's calls fail as ledger errors (503)
    until then, and afterwards reach the new master, where the lease is, active."""
    ledger = RedisLedger(settings=topology.settings(), namespace=f"f{uuid.uuid4().hex[:12]}")
    ledgers.append(ledger)
    assert isinstance(ledger.client, SentinelMasterRedis)
    assert isinstance(ledger.client.connection_pool, WaitingSentinelConnectionPool)
    # The start-up checks run against the master the Sentinels name.
    durability = await ledger.check_durability()
    assert (durability.problems, durability.acknowledgement) == ([], "WAIT 1")
    assert (durability.appendonly, durability.appendfsync) == (True, "always")
    assert (durability.maxmemory_policy, durability.connected_replicas) == ("noeviction", 1)
    assert topology.ports["master"] == await _server_port(ledger)

    run = WorkflowRun(
        id="wf-failover",
        owner="alice@example.com",
        purpose="failover test",
        started_by=AGENT,
        created_at=NOW,
        deadline=NOW + timedelta(hours=1),
    )
    await ledger.create_run(run)
    active = await _write_and_activate(ledger, "cred_acked")
    assert active.state == LeaseState.ACTIVE

    master = topology.processes["master"].popen
    assert master is not None
    os.kill(master.pid, signal.SIGKILL)
    master.wait(timeout=10)

    failures: list[LedgerUnavailableError] = []
    found: Lease | None = None
    deadline = time.monotonic() + BOUND_SECONDS
    while found is None:
        assert time.monotonic() < deadline, (
            f"no new master within {BOUND_SECONDS} s; "
            f"{len(failures)} ledger errors: {sorted({e.reason for e in failures})}"
        )
        try:
            found = await ledger.get_lease("cred_acked")
        except LedgerUnavailableError as exc:  # 503 while there is no master
            failures.append(exc)
            await asyncio.sleep(0.1)
            continue
        assert found is not None, "the new master answered without the acknowledged lease"

    assert active == found
    assert run == await ledger.get_run("wf-failover")
    assert topology.ports["replica"] == await _server_port(ledger)
    assert (await ledger.client.info("replication"))["role"] == "master"
    assert {e.reason for e in failures} <= {"ledger.unreachable"}
    # Its due entry came along: the sweeper finds it at its expiry.
    assert await ledger.claim_due(
        active.expires_at, limit=10, visibility=timedelta(seconds=30)
    ) == ["cred_acked"]
    # The new master has no replica left: WAIT 1 cannot be met, so nothing more is
    # acknowledged (the service revokes such a credential) until a replica joins it.
    with pytest.raises(LedgerUnavailableError) as refused:
        await _write_and_activate(ledger, "cred_after")
    assert refused.value.reason == "ledger.not_acknowledged"


async def test_replicas_durability_refuses_activation_while_the_replica_is_down(
    topology: Topology, ledgers: list[RedisLedger]
) -> None:
    """With the replica stopped, WAIT 1 is never met: start-up refuses the master, and an
    activation raises ``ledger.not_acknowledged`` (the write stays; the service revokes the
    credential). With the replica back, activations are acknowledged again."""
    ledger = RedisLedger(settings=topology.settings(), namespace=f"r{uuid.uuid4().hex[:12]}")
    ledgers.append(ledger)
    assert (await ledger.check_durability()).problems == []

    topology.processes["replica"].stop(timeout=5)

    async def replica_gone() -> bool:
        return (await ledger.durability()).connected_replicas == 0

    await _eventually(replica_gone, what="the master to lose its replica")
    with pytest.raises(LedgerUnavailableError, match="replica") as at_start_up:
        await ledger.check_durability()
    assert at_start_up.value.reason == "ledger.not_durable"
    with pytest.raises(LedgerUnavailableError, match="WAIT: 0 of 1") as caught:
        await _write_and_activate(ledger, "cred_unacked")
    assert caught.value.reason == "ledger.not_acknowledged"
    stored = await ledger.get_lease("cred_unacked")
    assert stored is not None
    assert (stored.state, stored.token_accessor) == (LeaseState.ACTIVE, "acc-cred_unacked")

    topology.processes["replica"].start()

    async def replica_back() -> bool:
        return (await ledger.durability()).connected_replicas == 1

    await _eventually(replica_back, what="the replica to rejoin")
    assert (await _write_and_activate(ledger, "cred_acked")).state == LeaseState.ACTIVE
