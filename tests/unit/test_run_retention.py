"""The run retention job on the in-memory ledger and audit trail: what it purges, when, and that
the audit record comes first (the ledger's own behaviour is in tests/contract/test_retention.py,
against Redis too)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
import structlog.testing

from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.metrics_sources import RetentionCollector
from broker.core.audit import AuditEvent, EventType, WorkflowPurged
from broker.core.model import CredentialRequest, LeaseState, RunState
from broker.core.ports import PurgePlan
from broker.errors import ConflictError, LedgerUnavailableError, NotFoundError
from broker.metrics import BrokerMetrics
from broker.retention import RunRetentionJob
from broker.service import CredentialBroker
from tests.contract.test_ledger import make_lease, make_run
from tests.unit.test_service_issuance import (
    AGENT_CALLER,
    ORCH_CALLER,
    POLICY,
    TARGETS,
    FakeMinter,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # the contract suite's
BROKER = "spiffe://tasklease.test/broker"
DAYS_30 = timedelta(days=30)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


class World:
    def __init__(self, *, batch: int = 100, retire_ids_for: timedelta = timedelta(0)) -> None:
        self.ledger = InMemoryLedger()
        self.audit = MemoryAuditTrail()
        self.clock = Clock(NOW)
        self.job = RunRetentionJob(
            ledger=self.ledger,
            locks=self.ledger,
            audit=self.audit,
            clock=self.clock,
            actor=BROKER,
            retention=DAYS_30,
            batch=batch,
            retire_ids_for=retire_ids_for,
        )

    async def run_with_a_revoked_lease(self, workflow_id: str, cid: str) -> None:
        await self.ledger.create_run(make_run(workflow_id))
        lease = make_lease(cid, workflow_id=workflow_id)
        await self.ledger.write_ahead(lease)
        await self.ledger.save_lease(
            dataclasses.replace(lease, state=LeaseState.REVOKED, revoked_at=NOW)
        )


async def test_a_run_over_for_longer_than_the_retention_is_purged_after_its_record() -> None:
    world = World()
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    deadline = NOW + timedelta(hours=2)
    world.clock.current = deadline + DAYS_30

    report = await world.job.purge_pass()

    assert (report.ran, report.examined, report.purged, report.leases) == (True, 1, 1, 1)
    assert await world.ledger.get_run("wf-1") is None
    assert await world.ledger.get_lease("cred_a") is None
    [event] = world.audit.events
    assert event.type == EventType.WORKFLOW_PURGED
    assert (event.actor, event.workflow_id) == (BROKER, "wf-1")
    assert (
        WorkflowPurged(
            state="active",
            over_at=deadline,
            retention_days=30,
            leases=1,
            lease_states={"revoked": 1},
        )
        == event.payload
    )


async def test_a_run_within_its_retention_stays() -> None:
    world = World()
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    world.clock.current = NOW + timedelta(hours=2) + DAYS_30 - timedelta(seconds=1)

    report = await world.job.purge_pass()

    assert (report.ran, report.examined, report.purged) == (True, 0, 0)
    assert await world.ledger.get_run("wf-1") is not None
    assert world.audit.events == []


async def test_a_run_ended_early_waits_for_its_last_credential_to_expire() -> None:
    world = World()
    await world.ledger.create_run(make_run())
    lease = make_lease("cred_a", expires_at=NOW + timedelta(hours=1))
    await world.ledger.write_ahead(lease)
    await world.ledger.save_lease(
        dataclasses.replace(lease, state=LeaseState.REVOKED, revoked_at=NOW + timedelta(minutes=1))
    )
    await world.ledger.save_run(
        make_run(state=RunState.COMPLETED, ended_at=NOW + timedelta(minutes=1))
    )
    world.clock.current = NOW + timedelta(minutes=30) + DAYS_30

    postponed = await world.job.purge_pass()
    world.clock.current = NOW + timedelta(hours=1) + DAYS_30
    purged = await world.job.purge_pass()

    assert (postponed.examined, postponed.postponed, postponed.purged) == (1, 1, 0)
    assert (purged.examined, purged.purged) == (1, 1)
    [event] = world.audit.events
    assert isinstance(event.payload, WorkflowPurged)
    assert ("completed", NOW + timedelta(hours=1)) == (event.payload.state, event.payload.over_at)


async def test_nothing_is_deleted_when_the_audit_trail_cannot_take_the_record() -> None:
    world = World()
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    world.clock.current = NOW + 40 * timedelta(days=1)
    world.audit.fail = True

    report = await world.job.purge_pass()

    assert (report.examined, report.purged, report.failed) == (1, 0, 1)
    assert await world.ledger.get_run("wf-1") is not None
    world.audit.fail = False
    assert (await world.job.purge_pass()).purged == 1


async def test_the_record_is_written_while_the_run_is_still_in_the_ledger() -> None:
    world = World()
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    world.clock.current = NOW + 40 * timedelta(days=1)
    seen: list[bool] = []
    recorded = world.audit.record

    async def record(event: AuditEvent) -> None:
        seen.append(await world.ledger.get_run(event.workflow_id) is not None)
        await recorded(event)

    world.audit.record = record  # type: ignore[method-assign]

    await world.job.purge_pass()

    assert seen == [True]
    assert await world.ledger.get_run("wf-1") is None


async def test_a_pass_takes_at_most_its_batch_oldest_first() -> None:
    world = World(batch=2)
    for number in (3, 1, 2):
        await world.ledger.create_run(
            make_run(f"wf-{number}", deadline=NOW + timedelta(hours=number))
        )
    world.clock.current = NOW + 40 * timedelta(days=1)

    first = await world.job.purge_pass()
    purged_first = [event.workflow_id for event in world.audit.events]
    second = await world.job.purge_pass()

    assert (first.purged, second.purged) == (2, 1)
    assert purged_first == ["wf-1", "wf-2"]
    assert world.audit.events[-1].workflow_id == "wf-3"


async def test_only_the_replica_holding_the_lock_purges() -> None:
    world = World()
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    world.clock.current = NOW + 40 * timedelta(days=1)
    assert await world.ledger.try_lock("retention", "another-replica", ttl=timedelta(minutes=5))

    report = await world.job.purge_pass()

    assert not report.ran
    assert await world.ledger.get_run("wf-1") is not None
    await world.ledger.unlock("retention", "another-replica")
    assert (await world.job.purge_pass()).purged == 1
    # It let go of the lock after its pass.
    assert await world.ledger.try_lock("retention", "another-replica", ttl=timedelta(minutes=5))


async def test_a_ledger_failure_on_one_run_does_not_stop_the_others() -> None:
    world = World()
    for workflow_id in ("wf-1", "wf-2"):
        await world.ledger.create_run(make_run(workflow_id))
    world.clock.current = NOW + 40 * timedelta(days=1)
    planned = world.ledger.plan_purge

    async def plan_purge(workflow_id: str, *, cutoff: datetime) -> PurgePlan:
        if workflow_id == "wf-1":
            raise LedgerUnavailableError("Redis is unreachable", reason="ledger.unreachable")
        return await planned(workflow_id, cutoff=cutoff)

    world.ledger.plan_purge = plan_purge  # type: ignore[method-assign]

    report = await world.job.purge_pass()

    assert (report.examined, report.purged, report.failed) == (2, 1, 1)
    assert await world.ledger.get_run("wf-1") is not None
    assert await world.ledger.get_run("wf-2") is None


def test_the_retention_is_at_least_a_day() -> None:
    ledger = InMemoryLedger()
    with pytest.raises(ValueError, match="at least a day"):
        RunRetentionJob(
            ledger=ledger,
            locks=ledger,
            audit=None,
            clock=Clock(NOW),
            actor=BROKER,
            retention=timedelta(hours=23),
        )


async def test_the_metrics_count_what_this_process_purged_and_could_not() -> None:
    world = World()
    metrics = BrokerMetrics()
    metrics.registry.register(RetentionCollector(world.job))
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    await world.run_with_a_revoked_lease("wf-2", "cred_b")
    lease = make_lease("cred_c", workflow_id="wf-2")
    await world.ledger.write_ahead(lease)
    await world.ledger.save_lease(
        dataclasses.replace(lease, state=LeaseState.REVOKED, revoked_at=NOW)
    )
    world.clock.current = NOW + 40 * timedelta(days=1)
    world.audit.fail = True
    await world.job.purge_pass()
    world.audit.fail = False
    await world.job.purge_pass()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("tasklease_ledger_purged_total", record="run") == 2
    assert sample("tasklease_ledger_purged_total", record="lease") == 3
    assert sample("tasklease_ledger_purge_failures_total") == 2


async def test_runs_indexed_already_are_purged_while_indexing_the_old_ones_fails() -> None:
    world = World()
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    world.clock.current = NOW + 40 * timedelta(days=1)
    attempts: list[int] = []

    async def index_runs(*, batch: int = 1000) -> int:
        attempts.append(batch)
        if len(attempts) == 1:
            raise LedgerUnavailableError("Redis is unreachable", reason="ledger.unreachable")
        return 0

    world.ledger.index_runs = index_runs  # type: ignore[method-assign]

    first = await world.job.purge_pass()
    await world.job.purge_pass()
    await world.job.purge_pass()

    assert (first.purged, world.job.failures) == (1, 1)
    assert len(attempts) == 2  # tried again at the next pass, then done


async def test_a_run_over_with_a_credential_not_settled_waits_and_says_so() -> None:
    world = World()
    await world.ledger.create_run(make_run())
    await world.ledger.write_ahead(make_lease("cred_a"))  # never confirmed revoked
    world.clock.current = NOW + 40 * timedelta(days=1)

    with structlog.testing.capture_logs() as logs:
        report = await world.job.purge_pass()

    assert (report.examined, report.postponed, report.purged) == (1, 1, 0)
    assert await world.ledger.get_run("wf-1") is not None
    assert world.audit.events == []
    [warning] = [entry for entry in logs if entry["event"] == "retention.run_unsettled"]
    assert warning["lease_states"] == {"issuing": 1}


# --------------------------------------------------------------------------- run ids after a purge

RETIRED_FOR = timedelta(days=90)


def _service(world: World) -> CredentialBroker:
    return CredentialBroker(
        policy=POLICY,
        minter=FakeMinter(),
        ledger=world.ledger,
        targets=TARGETS,
        clock=world.clock,
        audit=world.audit,
    )


async def _start(service: CredentialBroker, world: World, run_id: str) -> None:
    await service.start_workflow(
        ORCH_CALLER,
        workflow_id=run_id,
        owner="bob",
        purpose="a new run",
        deadline=world.clock.now() + timedelta(hours=1),
        labels={},
        participants=(),
    )


async def _purged(world: World) -> datetime:
    """wf-1 purged; when."""
    await world.run_with_a_revoked_lease("wf-1", "cred_a")
    world.clock.current = NOW + timedelta(hours=2) + DAYS_30
    assert (await world.job.purge_pass()).purged == 1
    return world.clock.current


async def test_a_purged_runs_id_is_retired_for_as_long_as_the_trail_keeps_its_copy() -> None:
    world = World(retire_ids_for=RETIRED_FOR)
    purged_at = await _purged(world)
    service = _service(world)

    with pytest.raises(ConflictError) as caught:
        await _start(service, world, "wf-1")

    assert caught.value.reason == "workflow.id_retired"
    until = (purged_at + RETIRED_FOR).isoformat()
    assert "'wf-1' was used by a run the ledger has since purged" in caught.value.detail
    assert f"cannot start a new run until {until}: choose another id" in caught.value.detail
    assert await world.ledger.get_run("wf-1") is None  # nothing stored
    assert world.audit.types() == [EventType.WORKFLOW_PURGED]  # no workflow.started
    await _start(service, world, "wf-2")  # another id starts

    world.clock.current = purged_at + RETIRED_FOR - timedelta(seconds=1)
    with pytest.raises(ConflictError):
        await _start(service, world, "wf-1")
    world.clock.current = purged_at + RETIRED_FOR  # the copy is gone: the id is free
    await _start(service, world, "wf-1")
    assert (await world.ledger.get_run("wf-1")) is not None


async def test_without_a_retirement_a_purged_id_may_be_used_again_at_once() -> None:
    world = World()
    await _purged(world)
    await _start(_service(world), world, "wf-1")
    assert (await world.ledger.get_run("wf-1")) is not None


async def test_only_a_purge_retires_an_id() -> None:
    """An id is not retired by requests that name it before the run exists (a denial, a
    quarantine of that run id): nobody can squat on a run id another will start."""
    world = World(retire_ids_for=RETIRED_FOR)
    service = _service(world)
    with pytest.raises(NotFoundError):
        await service.request_credential(
            AGENT_CALLER,
            CredentialRequest(
                workflow_id="wf-next", task_id="t", target="demo-kv", ttl=timedelta(minutes=5)
            ),
            params={},
        )
    # The trail names the run id (the denial), yet the id starts a run.
    assert [e.workflow_id for e in world.audit.events] == ["wf-next"]
    await _start(service, world, "wf-next")
    assert (await world.ledger.get_run("wf-next")) is not None


def test_the_retirement_is_not_negative() -> None:
    with pytest.raises(ValueError, match="retire_ids_for"):
        World(retire_ids_for=-timedelta(seconds=1))
