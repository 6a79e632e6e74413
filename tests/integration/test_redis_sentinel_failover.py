"""The ledger behind Redis Sentinel, on real processes: a master (AOF, ``appendfsync always``),
one replica and three Sentinels (quorum 2), all with passwords, on free loopback ports in a
temporary directory, started per test and torn down after it (SECURITY.md 32, failover case).

The topology is tests/integration/redis_topology.py's; the session's stack fixture checks the
machine as for every stack test. Every wait is bounded, so a failover that never happens fails
the test instead of hanging it. The service's side of a refused
acknowledgement (the credential is revoked, no secret returned) is
tests/unit/test_service_issuance.py::test_a_failed_acknowledgement_revokes_and_returns_no_secret.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

import pytest

from broker.adapters.redis_connection import SentinelMasterRedis, WaitingSentinelConnectionPool
from broker.adapters.redis_ledger import RedisLedger
from broker.core.model import (
    Lease,
    LeaseState,
)
from broker.devstack import DevStack
from broker.errors import LedgerUnavailableError
from tests.integration.redis_topology import (
    BOUND_SECONDS,
    Topology,
    ledger_run,
    running_topology,
    write_and_activate,
)

# --------------------------------------------------------------------------- the topology


@pytest.fixture
def topology(stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    # ``stack`` (the session's, already running) applies the suite's one rule for a machine
    # without redis-server and the rest: fail with TASKLEASE_REQUIRE_STACK=1. Its own
    # processes are not used here.
    with running_topology(monkeypatch, label="sentinel-failover") as topo:
        yield topo


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

    run = ledger_run("wf-failover")
    await ledger.create_run(run)
    active = await write_and_activate(ledger, "cred_acked")
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
        await write_and_activate(ledger, "cred_after")
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
        await write_and_activate(ledger, "cred_unacked")
    assert caught.value.reason == "ledger.not_acknowledged"
    stored = await ledger.get_lease("cred_unacked")
    assert stored is not None
    assert (stored.state, stored.token_accessor) == (LeaseState.ACTIVE, "acc-cred_unacked")

    topology.processes["replica"].start()

    async def replica_back() -> bool:
        return (await ledger.durability()).connected_replicas == 1

    await _eventually(replica_back, what="the replica to rejoin")
    assert (await write_and_activate(ledger, "cred_acked")).state == LeaseState.ACTIVE
