"""The ledger over TLS, on real ``redis-server`` processes that speak only TLS and ask every
client for a certificate (``port 0``, ``tls-auth-clients yes``): a single Redis, a broker
that issues a credential through it, each way the handshake must fail (one defect per row),
a CA rotated under a running client, and the Sentinel topology over TLS through a failover.

Only ``redis-server`` is needed; the session's stack fixture applies the suite's rule for a
machine without it (fail with TASKLEASE_REQUIRE_STACK=1). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.adapters.redis_connection import SentinelMasterRedis, SentinelTLSConnection
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    Lease,
    LeaseState,
)
from broker.devstack import DevStack, ManagedProcess, free_port, redis_config, wait_until
from broker.errors import LedgerUnavailableError
from tests.conftest import LOG_DIR, remember_secret
from tests.integration.clients import StartBroker, ready_then_issue
from tests.integration.redis_topology import (
    BOUND_SECONDS,
    SERVICE,
    Topology,
    ledger_run,
    running_topology,
    write_and_activate,
)
from tests.redis_tls import RedisTLSFiles, tls_server_config, write_redis_tls_files

pytestmark = pytest.mark.stack


@dataclass(frozen=True)
class TLSRedis:
    """One Redis that speaks only TLS on ``port`` and asks clients for a certificate."""

    port: int
    password: str
    files: RedisTLSFiles
    other: RedisTLSFiles
    """A second, unrelated PKI: its CA and its client certificate are trusted by no one."""

    def settings(self, **overrides: Any) -> RedisSettings:
        values: dict[str, Any] = {
            "url": f"rediss://:{self.password}@127.0.0.1:{self.port}/0",
            "tls_ca_file": str(self.files.ca),
            "tls_cert_file": str(self.files.client_cert),
            "tls_key_file": str(self.files.client_key),
            "socket_timeout_seconds": 2.0,
        }
        values.update(overrides)
        return RedisSettings.model_validate(values)

    def client(self) -> redis.Redis:
        """A synchronous client with the right certificates, for the test's own reads."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=2,
            ssl=True,
            ssl_ca_certs=str(self.files.ca),
            ssl_certfile=str(self.files.client_cert),
            ssl_keyfile=str(self.files.client_key),
        )


@pytest.fixture(scope="module")
def tls_redis(stack: DevStack) -> Iterator[TLSRedis]:
    root = Path(tempfile.mkdtemp(prefix="tl-redis-tls-", dir="/tmp"))
    served = TLSRedis(
        port=free_port(),
        password=remember_secret(secrets.token_urlsafe(24)),
        files=write_redis_tls_files(root / "pki"),
        other=write_redis_tls_files(root / "other-pki"),
    )
    data = root / "data"
    data.mkdir()
    conf = root / "redis.conf"
    conf.touch(mode=0o600)  # it holds the password
    conf.write_text(
        redis_config(port=served.port, data_dir=data, password=served.password)
        + tls_server_config(served.port, served.files)
    )
    process = ManagedProcess(
        "redis-tls", ["redis-server", str(conf)], LOG_DIR / "redis-tls" / f"{root.name}.log"
    )
    process.start()

    def answers() -> bool:
        with served.client() as client:
            return bool(client.ping())

    try:
        wait_until(answers, what="the TLS Redis to answer", timeout=BOUND_SECONDS, process=process)
        yield served
    finally:
        process.stop(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


async def _record_one(ledger: RedisLedger, label: str) -> Lease:
    """A run and one lease written ahead and activated: the issuance's writes, end to end."""
    workflow_id = f"wf-{label}-{uuid.uuid4().hex[:8]}"
    await ledger.create_run(ledger_run(workflow_id))
    return await write_and_activate(ledger, f"cred_{uuid.uuid4().hex[:12]}", workflow_id)


# --------------------------------------------------------------------------- one Redis


async def test_the_ledger_works_over_mutual_tls(
    tls_redis: TLSRedis, ledgers: list[RedisLedger]
) -> None:
    """Start-up's checks and an issuance's writes over TLS with a client certificate (the
    server has no plain-text port, so nothing here could have gone around TLS)."""
    ledger = RedisLedger(settings=tls_redis.settings(), namespace=f"t{uuid.uuid4().hex[:10]}")
    ledgers.append(ledger)
    durability = await ledger.check_durability()
    assert (durability.problems, durability.acknowledgement) == ([], "appendfsync always")
    active = await _record_one(ledger, "mtls")
    assert active.state == LeaseState.ACTIVE
    assert active == await ledger.get_lease(active.credential_id)


def _tls_defects(served: TLSRedis) -> dict[str, dict[str, Any]]:
    """Settings with exactly one thing wrong for the TLS Redis."""
    return {
        "a CA that did not sign the server": {"tls_ca_file": str(served.other.ca)},
        "the system roots instead of the CA": {"tls_ca_file": ""},
        "a host the certificate does not name": {
            "url": f"rediss://:{served.password}@localhost:{served.port}/0"
        },
        "no client certificate": {"tls_cert_file": "", "tls_key_file": ""},
        "a client certificate of another CA": {
            "tls_cert_file": str(served.other.client_cert),
            "tls_key_file": str(served.other.client_key),
        },
        "no TLS at all": {
            "url": f"redis://:{served.password}@127.0.0.1:{served.port}/0",
            "tls_ca_file": "",
            "tls_cert_file": "",
            "tls_key_file": "",
        },
    }


@pytest.mark.parametrize(
    ("defect", "said"),
    [
        ("a CA that did not sign the server", "TLS CERTIFICATE_VERIFY_FAILED"),
        ("the system roots instead of the CA", "TLS CERTIFICATE_VERIFY_FAILED"),
        ("a host the certificate does not name", "Hostname mismatch"),
        ("no client certificate", "ConnectionError"),
        ("a client certificate of another CA", "ConnectionError"),
        ("no TLS at all", "ConnectionError"),
    ],
)
async def test_a_handshake_that_must_fail_is_a_ledger_error_without_the_password(
    tls_redis: TLSRedis, ledgers: list[RedisLedger], defect: str, said: str
) -> None:
    """Each defect: start-up's check fails as ``ledger.unreachable`` (503 on a request),
    naming what OpenSSL said where the client can know it, and no password anywhere."""
    ledger = RedisLedger(settings=tls_redis.settings(**_tls_defects(tls_redis)[defect]))
    ledgers.append(ledger)
    with pytest.raises(LedgerUnavailableError) as caught:
        await ledger.check_durability()
    assert caught.value.reason == "ledger.unreachable"
    assert said in str(caught.value)
    for shown in (str(caught.value), repr(caught.value.__cause__), repr(ledger.client)):
        assert tls_redis.password not in shown


async def test_a_rotated_ca_file_is_used_from_the_next_connection(
    tls_redis: TLSRedis, ledgers: list[RedisLedger], tmp_path: Path
) -> None:
    """The CA file first holds a CA that did not sign the server (every connection fails);
    once the right CA is renamed over it, the same client connects, with no restart."""
    ca = tmp_path / "redis-ca.pem"
    shutil.copyfile(tls_redis.other.ca, ca)
    ledger = RedisLedger(settings=tls_redis.settings(tls_ca_file=str(ca)))
    ledgers.append(ledger)
    with pytest.raises(LedgerUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        await ledger.check_durability()
    staged = tmp_path / "redis-ca.pem.new"
    shutil.copyfile(tls_redis.files.ca, staged)
    staged.replace(ca)
    assert (await ledger.check_durability()).problems == []


async def test_a_broker_issues_through_a_tls_redis(
    tls_redis: TLSRedis, stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """The whole broker on a TLS Redis (ledger, approvals, audit stream and outbox share the
    one factory): it starts (its durability checks pass over TLS), is ready, starts a run and
    issues a credential, and the lease record is on that Redis."""
    broker = await start(
        TASKLEASE_REDIS__URL=f"rediss://:{tls_redis.password}@127.0.0.1:{tls_redis.port}/0",
        TASKLEASE_REDIS__TLS_CA_FILE=str(tls_redis.files.ca),
        TASKLEASE_REDIS__TLS_CERT_FILE=str(tls_redis.files.client_cert),
        TASKLEASE_REDIS__TLS_KEY_FILE=str(tls_redis.files.client_key),
    )
    issued = await ready_then_issue(stack, broker, tmp_path, "demo-kv")
    ledger = RedisLedger(settings=tls_redis.settings())  # the broker's namespace
    try:
        lease = await ledger.get_lease(issued["credential_id"])
    finally:
        await ledger.close()
    assert lease is not None, "the lease record is not on the TLS Redis"
    assert (lease.state, lease.workflow_id) == (LeaseState.ACTIVE, issued["workflow_id"])


# --------------------------------------------------------------------------- Sentinel


@pytest.fixture
def tls_topology(stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    with running_topology(monkeypatch, label="sentinel-tls", tls=True) as topo:
        yield topo


async def _server_port(ledger: RedisLedger) -> int:
    """The TLS port of the server the ledger reaches (its plain-text port is 0)."""
    return int(str((await ledger.client.config_get("tls-port"))["tls-port"]))


async def test_through_sentinel_over_tls_the_ledger_follows_a_failover(
    tls_topology: Topology, ledgers: list[RedisLedger]
) -> None:
    """Master, replica and Sentinels speak only TLS: the ledger finds the master through the
    Sentinels, records a lease acknowledged by the replica, and after ``SENTINEL FAILOVER``
    reaches the promoted replica, where the lease is."""
    ledger = RedisLedger(settings=tls_topology.settings(), namespace=f"s{uuid.uuid4().hex[:10]}")
    ledgers.append(ledger)
    assert isinstance(ledger.client, SentinelMasterRedis)
    assert ledger.client.connection_pool.connection_class is SentinelTLSConnection
    assert (await ledger.check_durability()).problems == []
    assert tls_topology.ports["master"] == await _server_port(ledger)
    active = await _record_one(ledger, "sentinel")

    with tls_topology.client("sentinel-1") as sentinel:
        assert sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)

    deadline = time.monotonic() + BOUND_SECONDS
    while True:
        try:
            if await _server_port(ledger) == tls_topology.ports["replica"]:
                role = (await ledger.client.info("replication"))["role"]
                if role == "master":
                    break
        except LedgerUnavailableError:
            pass
        except redis.exceptions.RedisError:
            pass
        assert time.monotonic() < deadline, f"no failover within {BOUND_SECONDS} s"
        await asyncio.sleep(0.1)
    assert active == await ledger.get_lease(active.credential_id)


async def test_sentinels_with_an_untrusted_certificate_are_not_asked(
    tls_topology: Topology, ledgers: list[RedisLedger], tmp_path: Path
) -> None:
    """The Sentinels' own connections are verified too: with a CA that did not sign them, no
    master is found (``ledger.unreachable``), rather than asking an unverified Sentinel."""
    other = write_redis_tls_files(tmp_path / "other")
    ledger = RedisLedger(settings=tls_topology.settings(tls_ca_file=str(other.ca)))
    ledgers.append(ledger)
    with pytest.raises(LedgerUnavailableError) as caught:
        await ledger.get_lease("cred_none")
    assert caught.value.reason == "ledger.unreachable"
    assert tls_topology.password not in str(caught.value)
