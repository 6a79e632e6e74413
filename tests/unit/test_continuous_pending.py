"""A withdrawn approval's re-evaluation survives a broker stop, with fakes: it is noted in the
pending records before its first attempt, cleared only once an attempt completed, and resumed
by the next authorizer at start-up (retried like any scope). Many records, a read cut at its
limit, or an unreadable entry make it one re-evaluation of every live lease."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, MutableMapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.adapters.memory_reevaluation import (
    InMemoryPendingScopeRecords,
    InMemoryReevaluationMarkers,
)
from broker.continuous import APPROVAL, EVERYTHING
from broker.core.approvals import Approval
from broker.core.audit import CredentialRevoked, EventType
from broker.core.model import Lease, LeaseState
from broker.core.ports import (
    PENDING_APPROVAL,
    LeaseSelector,
    PendingScopeRecord,
    PendingScopesRead,
    ReevaluationMarker,
)
from broker.errors import LedgerUnavailableError
from tests.unit.test_continuous import NOW, World, engine_with, opened_approval, restrict
from tests.unit.test_continuous_retry import FAST, SLOW, FlakyLedger, failures, ledger, until

APPROVAL_ID = "apr_" + "1" * 24


class DownLedger(FlakyLedger):
    """Unreachable for the next ``failures`` lease iterations (-1: every one) before handing
    out anything: an attempt that fails revokes nothing."""

    async def iter_leases(
        self, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        self.iterations += 1
        if self.failures != 0:
            if self.failures > 0:
                self.failures -= 1
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
        async for found in super(FlakyLedger, self).iter_leases(selector, batch=batch):
            yield found


async def withdrawn_world(
    store: InMemoryPendingScopeRecords, **options: Any
) -> tuple[World, Lease, Approval]:
    """One demo-db lease issued with an approval on a target that now needs one (restricted),
    the approval withdrawn (the approvals fake does not know it: not approved), and an
    authorizer with ``store`` as its pending records. Its ledger does not fail (yet)."""
    world = World(DownLedger())
    await world.start_run()
    await world.issue("demo-db", task="db-0")
    for n in range(2):
        await world.issue("demo-kv", task=f"kv-{n}")
    world.continuous = world.authorizer(batch=2, pending=store, writer="broker-a", **options)
    world.policy.replace(engine_with())  # nothing denied but the withdrawn approval's lease
    (lease,) = [x for x in world.ledger._leases.values() if x.target == "demo-db"]
    restrict(world)
    lease = replace(lease, approval_id=APPROVAL_ID)
    world.ledger._leases[lease.credential_id] = lease
    approval = opened_approval(lease)
    return world, lease, replace(approval, id=APPROVAL_ID, closed_by="bob@example.test")


def record(n: int, *, task: str = "db-0", key: str = APPROVAL_ID) -> PendingScopeRecord:
    return PendingScopeRecord(
        id=f"pnd_{n:024x}",
        kind=PENDING_APPROVAL,
        key=key,
        workflow_id="wf-1",
        task_id=task,
        reason=f"approval {key} was withdrawn by bob@example.test",
        noted_at=NOW,
        noted_by="broker-old",
    )


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_withdrawal_is_noted_before_its_first_attempt_and_cleared_once_it_completed() -> (
    None
):
    class Watching(InMemoryPendingScopeRecords):
        async def note_pending(self, record: PendingScopeRecord) -> None:
            self.iterations_when_noted = ledger(world).iterations
            await super().note_pending(record)

    store = Watching()
    world, lease, approval = await withdrawn_world(store, **FAST)
    with capture_logs() as logs:
        report = await world.continuous.approval_withdrawn(approval)
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert report is not None and (report.denied, report.confirmed_revoked) == (1, 1)
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert (store.notes, store.iterations_when_noted, store.records) == (1, 0, {})
    (noted,) = events(logs, "continuous.pending_noted")
    assert (noted["scope"], noted["key"]) == (APPROVAL, APPROVAL_ID)
    assert events(logs, "continuous.pending_cleared")[0]["records"] == 1


async def test_the_record_holds_ids_and_the_reason_only() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, approval = await withdrawn_world(store, **SLOW)
    ledger(world).failures = -1
    await world.continuous.approval_withdrawn(approval)
    (stored,) = store.records.values()
    assert (stored.kind, stored.key, stored.workflow_id, stored.task_id) == (
        PENDING_APPROVAL,
        APPROVAL_ID,
        "wf-1",
        lease.task_id,
    )
    assert (stored.reason, stored.noted_at, stored.noted_by) == (
        f"approval {APPROVAL_ID} was withdrawn by bob@example.test",
        NOW,
        "broker-a",
    )
    await world.continuous.close()


async def test_a_failed_attempt_keeps_the_record_until_an_attempt_completes() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, approval = await withdrawn_world(store, **SLOW)
    ledger(world).failures = 1
    assert await world.continuous.approval_withdrawn(approval) is None
    assert len(store.records) == 1
    assert [p.scope.kind for p in world.continuous.pending()] == [APPROVAL]
    assert await world.state(lease.credential_id) == (LeaseState.ACTIVE, "")

    # The same change again (a replica, a repeated call) replaces the waiting retry and runs
    # now: that attempt completes and clears both notes.
    report = await world.continuous.approval_withdrawn(approval)
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert report is not None and report.confirmed_revoked == 1
    assert (store.notes, store.records) == (2, {})
    assert world.continuous.pending() == []


async def test_a_pending_withdrawal_survives_a_stop_and_the_next_authorizer_revokes() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, approval = await withdrawn_world(store, **SLOW)
    ledger(world).failures = -1  # Redis down: every attempt fails
    assert await world.continuous.approval_withdrawn(approval) is None
    with capture_logs() as logs:
        await world.continuous.close()  # the broker stops with the retry pending
    assert events(logs, "continuous.pending_kept")[0]["records"] == 1
    assert len(store.records) == 1
    assert await world.state(lease.credential_id) == (LeaseState.ACTIVE, "")

    # The next broker (Redis back) resumes it at start-up.
    ledger(world).failures = 0
    restarted = world.authorizer(batch=2, pending=store, **FAST)
    with capture_logs() as logs:
        restarted.resume_pending()
        await asyncio.wait_for(restarted.drain(), timeout=5)

    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert store.records == {}
    (resumed,) = events(logs, "continuous.pending_resumed")
    assert (resumed["count"], resumed["unreadable"], resumed["each_scope"]) == (1, 0, True)
    (event,) = [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert isinstance(event.payload, CredentialRevoked)
    assert f"start-up: resumed: approval {APPROVAL_ID} was withdrawn" in event.payload.reason
    assert event.approval_id == APPROVAL_ID


async def test_a_resumed_withdrawal_is_retried_until_it_completes() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, _ = await withdrawn_world(store, **FAST)
    await store.note_pending(record(1, task=lease.task_id))
    ledger(world).failures = 2
    world.continuous.resume_pending()
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert failures(world.continuous, APPROVAL) == 2
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert store.records == {}


async def test_nothing_pending_at_start_up_is_logged_with_a_count_of_zero() -> None:
    store = InMemoryPendingScopeRecords()
    world, _, _ = await withdrawn_world(store, **FAST)
    with capture_logs() as logs:
        world.continuous.resume_pending()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    (resumed,) = events(logs, "continuous.pending_resumed")
    assert (resumed["count"], resumed["log_level"]) == (0, "info")
    assert ledger(world).iterations == 0


async def test_a_record_that_cannot_be_stored_is_alerted_and_stored_before_the_retry() -> None:
    class RefusingOnce(InMemoryPendingScopeRecords):
        refuse = 1
        attempts = 0

        async def note_pending(self, record: PendingScopeRecord) -> None:
            self.attempts += 1
            if self.refuse:
                self.refuse -= 1
                raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
            await super().note_pending(record)

    store = RefusingOnce()
    world, lease, approval = await withdrawn_world(store, **FAST)
    ledger(world).failures = 1
    with capture_logs() as logs:
        assert await world.continuous.approval_withdrawn(approval) is None
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    (unrecorded,) = events(logs, "continuous.pending_unrecorded")
    assert (unrecorded["reason"], unrecorded["alert"]) == ("ledger.unreachable", True)
    assert (store.attempts, store.notes, store.records) == (2, 1, {})
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )


async def test_a_stop_with_a_record_never_stored_is_alerted() -> None:
    class Refusing(InMemoryPendingScopeRecords):
        async def note_pending(self, record: PendingScopeRecord) -> None:
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")

    world, _, approval = await withdrawn_world(Refusing(), **SLOW)
    ledger(world).failures = -1
    await world.continuous.approval_withdrawn(approval)
    with capture_logs() as logs:
        await world.continuous.close()
    (lost,) = events(logs, "continuous.pending_lost")
    assert (lost["scopes"], lost["alert"]) == ([f"approval:{APPROVAL_ID}"], True)


async def test_an_unreadable_entry_at_start_up_is_alerted_and_every_live_lease_decided() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, _ = await withdrawn_world(store, **FAST)
    store.corrupt["pnd_garbage\n"] = "{not json"
    with capture_logs() as logs:
        world.continuous.resume_pending()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    (corrupt,) = events(logs, "continuous.pending_corrupt")
    assert (corrupt["entries"], corrupt["sample"], corrupt["alert"]) == (
        1,
        ["pnd_garbage\\n"],
        True,
    )
    # Its scope is unknown: every live lease is decided, so the withdrawn approval's
    # credential is revoked all the same (and the others are kept).
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    kv = [x for x in world.ledger._leases.values() if x.target == "demo-kv"]
    assert {x.state for x in kv} == {LeaseState.ACTIVE}
    assert (store.corrupt, store.records) == ({}, {})
    (resumed,) = events(logs, "continuous.pending_resumed")
    assert (resumed["count"], resumed["unreadable"], resumed["each_scope"]) == (0, 1, False)


async def test_many_records_are_resumed_as_one_reevaluation_of_every_live_lease() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, _ = await withdrawn_world(store, resume_each=2, **FAST)
    await store.note_pending(record(1, task=lease.task_id))
    for n in range(2, 6):  # withdrawals whose credentials are already gone
        await store.note_pending(record(n, task=f"gone-{n}", key=f"apr_{n:024x}"))
    with capture_logs() as logs:
        world.continuous.resume_pending()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert ledger(world).iterations == 1  # one pass over every live lease, not five scopes
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert store.records == {}
    (resumed,) = events(logs, "continuous.pending_resumed")
    assert (resumed["count"], resumed["each_scope"]) == (5, False)


async def test_a_read_cut_at_its_limit_reads_the_rest_once_its_reevaluation_completed() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, _ = await withdrawn_world(store, resume_limit=2, resume_each=1, **FAST)
    await store.note_pending(record(1, task=lease.task_id))
    for n in range(2, 6):
        await store.note_pending(record(n, task=f"gone-{n}", key=f"apr_{n:024x}"))
    with capture_logs() as logs:
        world.continuous.resume_pending()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    resumed = events(logs, "continuous.pending_resumed")
    assert [(e["count"], e["complete"], e["each_scope"]) for e in resumed] == [
        (2, False, False),
        (2, False, False),
        (1, True, True),
    ]
    assert store.records == {}
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )


async def test_a_reevaluation_of_every_live_lease_that_takes_over_the_withdrawal_clears_it() -> (
    None
):
    store = InMemoryPendingScopeRecords()
    world, lease, approval = await withdrawn_world(store, **SLOW)
    ledger(world).failures = 1
    assert await world.continuous.approval_withdrawn(approval) is None
    assert len(store.records) == 1

    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="sighup")
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    coalesced = events(logs, "continuous.coalesced")
    assert [(e["scope"], e["into"]) for e in coalesced] == [
        (APPROVAL, "the re-evaluation of every live lease")
    ]
    assert store.records == {}
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )


async def test_two_replicas_resuming_the_same_record_is_harmless() -> None:
    store = InMemoryPendingScopeRecords()
    world, lease, _ = await withdrawn_world(store, **FAST)
    await store.note_pending(record(1, task=lease.task_id))
    replicas = [world.continuous, world.authorizer(batch=2, pending=store, **FAST)]
    for replica in replicas:
        replica.resume_pending()
    await asyncio.wait_for(asyncio.gather(*(r.drain() for r in replicas)), timeout=5)

    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert store.records == {}
    assert [r.pending() for r in replicas] == [[], []]
    assert world.minter.revoked == [lease.token_accessor] * len(world.minter.revoked)


async def test_an_unreadable_store_at_start_up_is_read_again_after_a_backoff() -> None:
    class Unreachable(InMemoryPendingScopeRecords):
        refuse = 2

        async def read_pending(self, *, limit: int) -> PendingScopesRead:
            if self.refuse:
                self.refuse -= 1
                raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
            return await super().read_pending(limit=limit)

    store = Unreachable()
    world, lease, _ = await withdrawn_world(store, **FAST)
    await store.note_pending(record(1, task=lease.task_id))
    with capture_logs() as logs:
        world.continuous.resume_pending()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert len(events(logs, "continuous.pending_unreadable")) == 2
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert store.records == {}


async def test_a_record_that_cannot_be_cleared_is_resumed_again_harmlessly() -> None:
    class NotClearing(InMemoryPendingScopeRecords):
        async def clear_pending(self, ids: Any) -> None:
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")

    store = NotClearing()
    world, lease, approval = await withdrawn_world(store, **FAST)
    with capture_logs() as logs:
        await world.continuous.approval_withdrawn(approval)
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert events(logs, "continuous.pending_not_cleared")[0]["records"] == 1
    assert world.continuous.pending() == []  # no retry: the re-evaluation did complete
    assert len(store.records) == 1
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )


async def test_without_a_pending_store_nothing_is_noted_or_resumed() -> None:
    world, lease, approval = await withdrawn_world(InMemoryPendingScopeRecords(), **FAST)
    bare = world.authorizer(batch=2, **FAST)
    with capture_logs() as logs:
        report = await bare.approval_withdrawn(approval)
        bare.resume_pending()
        await asyncio.wait_for(bare.drain(), timeout=5)
    assert report is not None and report.confirmed_revoked == 1
    assert not [e for e in logs if e["event"].startswith("continuous.pending")]
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )


@pytest.mark.parametrize(
    ("limit", "each"), [(0, 0), (5, 6), (5, -1)], ids=["no-read", "each>limit", "negative"]
)
def test_resume_bounds_must_be_ordered(limit: int, each: int) -> None:
    with pytest.raises(ValueError, match="resume_limit"):
        World().authorizer(resume_limit=limit, resume_each=each)


async def test_a_start_up_retry_holding_a_withdrawal_decides_even_if_the_marker_now_matches() -> (
    None
):
    """The marker may predate the withdrawal: a start-up re-evaluation that took over a
    withdrawal and failed decides on its retry, whatever the marker says by then."""
    inputs = "a" * 64
    markers = InMemoryReevaluationMarkers(ReevaluationMarker(digest="b" * 64, at=NOW, writer="x"))
    store = InMemoryPendingScopeRecords()
    quick = timedelta(milliseconds=10)
    world, lease, approval = await withdrawn_world(
        store, markers=markers, inputs=lambda: inputs, retry_base=quick, retry_cap=quick
    )
    ledger(world).failures = 2
    assert await world.continuous.approval_withdrawn(approval) is None
    world.continuous.reevaluate_if_inputs_changed()  # takes over the waiting retry, fails
    await until(lambda: failures(world.continuous, EVERYTHING) == 1)
    (waiting,) = world.continuous.pending()
    assert (waiting.scope.kind, len(store.records)) == (EVERYTHING, 1)

    # Another replica completes a re-evaluation of every live lease meanwhile (perhaps
    # before the withdrawal): the marker matches now.
    markers.marker = ReevaluationMarker(digest=inputs, at=NOW, writer="replica-b")
    await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert store.records == {}


async def test_a_hostile_withdrawer_name_is_stored_escaped_and_bounded() -> None:
    store = InMemoryPendingScopeRecords()
    world, _, approval = await withdrawn_world(store, **SLOW)
    ledger(world).failures = -1
    await world.continuous.approval_withdrawn(replace(approval, closed_by="\x1b[31m" + "x" * 5000))
    (stored,) = store.records.values()
    assert len(stored.reason) <= 500
    assert "\\x1b[31m" in stored.reason
    await world.continuous.close()
