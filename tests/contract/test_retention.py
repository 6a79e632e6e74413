"""Run retention, as a contract: ended runs leave the ledger with their leases, tombstones and
index entries once everything of them is over by the cutoff; nothing that changed since it was
read is deleted. Every test runs against InMemoryLedger and RedisLedger on the real Redis of
the local stack (the ``ledgers`` fixture of conftest.py); the last ones read Redis itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest

from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.redis_ledger import PURGE_PAGE, RedisLedger
from broker.core.model import LeaseState, RunState, WorkflowRun
from broker.core.ports import LeaseSelector, Ledger, RunRetention
from broker.errors import BadRequestError, ConflictError
from tests.contract.conftest import Ledgers
from tests.contract.test_ledger import AGENT, NOW, make_lease, make_run

HOUR = timedelta(hours=1)
DEADLINE = NOW + 2 * HOUR  # make_run's


class RetainingLedger(Ledger, RunRetention, Protocol):
    """Both ledgers implement both ports."""


@pytest.fixture
def ledger(ledgers: Ledgers) -> RetainingLedger:
    opened = ledgers.new()
    assert isinstance(opened, InMemoryLedger | RedisLedger)
    return opened


async def _revoke(ledger: RetainingLedger, credential_id: str) -> None:
    """As the sweeper leaves a lease whose revocation OpenBao confirmed."""
    lease = await ledger.get_lease(credential_id)
    assert lease is not None
    await ledger.save_lease(
        dataclasses.replace(
            lease, state=LeaseState.REVOKED, revoked_at=NOW + HOUR, revoke_reason="ttl"
        )
    )


async def _run_with_leases(
    ledger: RetainingLedger,
    workflow_id: str,
    *credential_ids: str,
    holder: str = AGENT,
    settled: bool = True,
) -> None:
    """A run with active leases, revoked (confirmed) unless ``settled`` is false."""
    await ledger.create_run(make_run(workflow_id))
    for cid in credential_ids:
        await ledger.write_ahead(make_lease(cid, workflow_id=workflow_id, holder=holder))
        await ledger.activate(cid, token_accessor=f"acc-{cid}", vault_lease_ids=())
        if settled:
            await _revoke(ledger, cid)


async def test_a_run_is_listed_once_its_deadline_is_at_or_before_the_cutoff(
    ledger: RetainingLedger,
) -> None:
    await ledger.create_run(make_run("wf-late", deadline=NOW + 3 * HOUR))
    await ledger.create_run(make_run("wf-early"))

    assert await ledger.runs_over_before(DEADLINE - timedelta(microseconds=1), limit=10) == []
    assert await ledger.runs_over_before(DEADLINE, limit=10) == ["wf-early"]
    assert await ledger.runs_over_before(NOW + 3 * HOUR, limit=10) == ["wf-early", "wf-late"]
    assert await ledger.runs_over_before(NOW + 3 * HOUR, limit=1) == ["wf-early"]


async def test_a_run_that_ends_early_is_listed_from_when_it_ended(ledger: RetainingLedger) -> None:
    await ledger.create_run(make_run())
    ended = NOW + timedelta(minutes=10)
    await ledger.save_run(make_run(state=RunState.COMPLETED, ended_at=ended))

    assert await ledger.runs_over_before(ended, limit=10) == ["wf-1"]


async def test_a_run_whose_credential_outlives_its_end_is_put_back_until_it_expired(
    ledger: RetainingLedger,
) -> None:
    await _run_with_leases(ledger, "wf-1", "cred_a")
    ended = NOW + timedelta(minutes=5)  # the lease expires at NOW + 15 min
    await ledger.save_run(make_run(state=RunState.COMPLETED, ended_at=ended))

    plan = await ledger.plan_purge("wf-1", cutoff=ended)

    assert not plan.ready
    assert NOW + timedelta(minutes=15) == plan.over_at
    assert await ledger.runs_over_before(ended, limit=10) == []
    assert await ledger.runs_over_before(NOW + timedelta(minutes=15), limit=10) == ["wf-1"]
    assert await ledger.get_run("wf-1") is not None


async def test_purging_a_ready_run_removes_it_its_leases_and_their_index_entries(
    ledger: RetainingLedger,
) -> None:
    await _run_with_leases(ledger, "wf-1", "cred_a", "cred_b")
    await _run_with_leases(ledger, "wf-2", "cred_c", settled=False)
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + HOUR)
    # A due entry left behind (the sweeper takes it out once revoked; here it stayed).
    await ledger.schedule("cred_b", NOW + timedelta(minutes=15))

    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    assert plan.ready
    assert plan.lease_states == {"revoked": 2}
    assert plan.leases == 2
    assert await ledger.purge(plan) is True

    assert await ledger.get_run("wf-1") is None
    assert await ledger.get_lease("cred_a") is None
    assert await ledger.get_lease("cred_b") is None
    assert await ledger.find_leases(LeaseSelector(workflow_id="wf-1")) == []
    for selector in (
        LeaseSelector(holder=AGENT),
        LeaseSelector(owner="alice@example.com"),
        LeaseSelector(target="db-orders"),
        LeaseSelector(everything=True),
    ):
        assert [lease.credential_id for lease in await ledger.find_leases(selector)] == [
            "cred_c"
        ], selector
    # Its due entry is gone too: only the other run's lease is ever claimed.
    await ledger.schedule("cred_c", NOW)
    assert await ledger.claim_due(NOW + 10 * HOUR, limit=10, visibility=timedelta(seconds=30)) == [
        "cred_c"
    ]
    assert "wf-1" not in await ledger.runs_over_before(NOW + 10 * HOUR, limit=10)
    # The other run is untouched, and the id may be used again.
    assert await ledger.get_run("wf-2") is not None
    assert await ledger.create_run(make_run("wf-1")) is True


async def test_a_run_with_a_live_credential_waits_until_the_ledger_settles_it(
    ledger: RetainingLedger,
) -> None:
    await _run_with_leases(ledger, "wf-1", "cred_a", settled=False)

    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)

    assert (plan.ready, plan.over_at, plan.lease_states) == (False, DEADLINE, {"active": 1})
    assert await ledger.runs_over_before(DEADLINE + HOUR - timedelta(seconds=1), limit=10) == []
    assert await ledger.runs_over_before(DEADLINE + HOUR, limit=10) == ["wf-1"]
    await _revoke(ledger, "cred_a")
    assert (await ledger.plan_purge("wf-1", cutoff=DEADLINE + HOUR)).ready


async def test_a_run_changed_since_its_plan_is_not_purged(ledger: RetainingLedger) -> None:
    await _run_with_leases(ledger, "wf-1", "cred_a")
    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    assert plan.ready
    # Written meanwhile (a run over takes none: it was written while the run still was).
    await ledger.write_ahead(make_lease("cred_late", task_id="task-late"))

    assert await ledger.purge(plan) is False
    assert await ledger.get_run("wf-1") is not None
    assert await ledger.get_lease("cred_a") is not None
    assert await ledger.get_lease("cred_late") is not None
    # Planned again, it waits for the new credential to be settled, then goes.
    assert not (await ledger.plan_purge("wf-1", cutoff=DEADLINE)).ready
    await _revoke(ledger, "cred_late")
    assert await ledger.purge(await ledger.plan_purge("wf-1", cutoff=DEADLINE + HOUR)) is True


async def test_a_run_purged_by_another_replica_is_not_purged_twice(
    ledgers: Ledgers, ledger: RetainingLedger
) -> None:
    other: RetainingLedger = ledgers.twin(ledger)  # type: ignore[assignment]
    await _run_with_leases(ledger, "wf-1", "cred_a")
    mine = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    theirs = await other.plan_purge("wf-1", cutoff=DEADLINE)

    assert await other.purge(theirs) is True
    assert await ledger.purge(mine) is False


async def test_a_gone_run_is_dropped_from_the_index(ledger: RetainingLedger) -> None:
    plan = await ledger.plan_purge("wf-nowhere", cutoff=DEADLINE)

    assert plan.run is None
    assert plan.over_at is None
    assert not plan.ready
    with pytest.raises(ValueError, match="not ready"):
        await ledger.purge(plan)


async def test_a_run_that_is_not_over_cannot_be_purged(ledger: RetainingLedger) -> None:
    await _run_with_leases(ledger, "wf-1", "cred_a")
    plan = await ledger.plan_purge("wf-1", cutoff=NOW)

    assert not plan.ready
    with pytest.raises(ValueError, match="not ready"):
        await ledger.purge(plan)
    assert await ledger.get_lease("cred_a") is not None


async def _large_run(ledger: RetainingLedger, count: int) -> list[str]:
    await ledger.create_run(make_run())
    holders = [f"{AGENT}-{n}" for n in range(3)]
    ids = [f"cred_{n:05d}" for n in range(count)]
    await asyncio.gather(
        *(
            ledger.write_ahead(make_lease(cid, holder=holders[n % 3], task_id=f"task-{n}"))
            for n, cid in enumerate(ids)
        )
    )
    await asyncio.gather(*(_revoke(ledger, cid) for cid in ids))
    return ids


async def test_a_run_larger_than_a_page_is_purged_whole(ledger: RetainingLedger) -> None:
    ids = await _large_run(ledger, 2 * PURGE_PAGE + 7)
    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    assert (plan.ready, plan.leases) == (True, len(ids))

    assert await ledger.purge(plan) is True

    assert await ledger.get_run("wf-1") is None
    assert await ledger.find_leases(LeaseSelector(holder_prefix=AGENT), limit=10_000) == []
    assert await ledger.get_lease(ids[-1]) is None


async def test_a_large_run_changed_since_its_plan_keeps_every_record(
    ledger: RetainingLedger,
) -> None:
    ids = await _large_run(ledger, PURGE_PAGE + 1)
    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    assert plan.ready
    await ledger.write_ahead(make_lease("cred_late", task_id="task-late"))

    assert await ledger.purge(plan) is False
    kept = await ledger.find_leases(LeaseSelector(workflow_id="wf-1"), limit=10_000)
    assert len(kept) == len(ids) + 1


def _started(run_id: str, at: datetime) -> WorkflowRun:
    return make_run(run_id, created_at=at, deadline=at + HOUR)


async def test_a_purge_may_retire_the_id_until_a_time(ledger: RetainingLedger) -> None:
    """With ``retire_until``, the purged run's id starts no run before then (a typed 409 that
    says until when, nothing written); from then on it does. Other ids are not affected."""
    await _run_with_leases(ledger, "wf-1", "cred_a")
    until = DEADLINE + 90 * 24 * HOUR
    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    assert await ledger.purge(plan, retire_until=until) is True

    for created_at in (NOW, until - timedelta(microseconds=1)):
        with pytest.raises(ConflictError) as caught:
            await ledger.create_run(_started("wf-1", created_at))
        assert caught.value.reason == "workflow.id_retired"
        assert f"until {until.isoformat()}" in caught.value.detail
    assert await ledger.get_run("wf-1") is None
    assert "wf-1" not in await ledger.runs_over_before(until + HOUR, limit=10)
    assert await ledger.create_run(make_run("wf-2")) is True
    assert await ledger.create_run(_started("wf-1", until)) is True
    assert await ledger.create_run(_started("wf-1", until)) is False  # taken now


@pytest.mark.parametrize("limit", [0, -1, 10_001])
async def test_a_pass_takes_a_bounded_number_of_runs(ledger: RetainingLedger, limit: int) -> None:
    with pytest.raises(BadRequestError):
        await ledger.runs_over_before(NOW, limit=limit)


# --------------------------------------------------------------------------- Redis itself


@pytest.mark.parametrize("ledgers", ["redis"], indirect=True)
async def test_nothing_of_a_purged_run_stays_in_redis(ledger: RetainingLedger) -> None:
    assert isinstance(ledger, RedisLedger)
    other_holder = f"{AGENT}-solo"
    await _run_with_leases(ledger, "wf-1", "cred_a", "cred_b")
    await _run_with_leases(ledger, "wf-1b", "cred_keep")  # same holder, another run
    await ledger.write_ahead(make_lease("cred_solo", workflow_id="wf-1", holder=other_holder))
    await _revoke(ledger, "cred_solo")
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + HOUR)
    redis = ledger.client
    namespace = ledger.namespace

    retire_until = datetime.now(UTC) + timedelta(days=90)
    plan = await ledger.plan_purge("wf-1", cutoff=DEADLINE)
    assert await ledger.purge(plan, retire_until=retire_until) is True

    leftovers = []
    async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        if name == f"{namespace}:{{wf:wf-1}}:retired":
            # The retired id alone stays, and Redis drops it when the retirement ends.
            expires = await redis.pexpiretime(name)
            assert abs(expires - int(retire_until.timestamp() * 1000)) <= 1, name
            continue
        if f":live:{other_holder}" in name or f":rate:{other_holder}" in name:
            # Limits' bookkeeping of the holder, not of the run: Redis drops it by itself.
            assert await redis.pttl(name) > 0, name
            continue
        if "wf-1}" in name or other_holder in name:
            leftovers.append(name)
            continue
        kind = await redis.type(name)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "hash":
            members = [*(await redis.hkeys(name)), *(await redis.hvals(name))]
        elif kind == "set":
            members = list(await redis.smembers(name))
        elif kind == "zset":
            members = [str(member) for member in await redis.zrange(name, 0, -1)]
        else:
            members = []
        for member in members:
            text = member.decode() if isinstance(member, bytes) else str(member)
            if any(gone in text for gone in ("cred_a", "cred_b", "cred_solo", other_holder)):
                leftovers.append(f"{name}: {text[:80]}")
            if text == "wf-1":
                leftovers.append(f"{name}: {text}")
    assert leftovers == []
    # The holder that still holds a lease elsewhere stays findable by prefix.
    found = await ledger.find_leases(LeaseSelector(holder_prefix=AGENT))
    assert [lease.credential_id for lease in found] == ["cred_keep"]


@pytest.mark.parametrize("ledgers", ["redis"], indirect=True)
async def test_runs_stored_before_the_index_existed_are_indexed_once(
    ledger: RetainingLedger,
) -> None:
    assert isinstance(ledger, RedisLedger)
    await ledger.create_run(make_run("wf-old"))
    await ledger.create_run(make_run("wf-ended"))
    await ledger.save_run(
        make_run("wf-ended", state=RunState.COMPLETED, ended_at=NOW + timedelta(minutes=1))
    )
    await ledger.create_run(make_run("wf-new", deadline=NOW + 3 * HOUR))
    # As a broker from before the index left them: no entries (the new one keeps its own).
    await ledger.client.zrem(f"{ledger.namespace}:idx:run_ends", "wf-old", "wf-ended")
    # A record no broker can read is skipped, not a reason to index nothing.
    await ledger.client.set(f"{ledger.namespace}:{{wf:wf-bad}}:run", "{not json")

    assert await ledger.index_runs(batch=1) == 2
    assert await ledger.index_runs() == 0  # done once per ledger
    assert await ledger.runs_over_before(NOW + 3 * HOUR, limit=10) == [
        "wf-ended",
        "wf-old",
        "wf-new",
    ]
