"""Continuous authorization under failure, with fakes: a re-evaluation that fails is retried
by itself (jittered backoff) until it completes, coalesced with newer changes, shown on the
gauge and the ``continuous`` readiness check while pending, cancelled by ``close``; and the
decision-inputs marker makes a broker apply, at start-up, a policy change made while no broker
ran."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.memory_reevaluation import InMemoryReevaluationMarkers
from broker.continuous import (
    EVERYTHING,
    RECENT,
    TARGET,
    ContinuousAuthorizer,
    ContinuousReadiness,
    DecisionInputs,
    decision_inputs_digest,
)
from broker.core.audit import CredentialRevoked, EventType
from broker.core.model import CredentialRequest, Lease, LeaseState, Quarantine, QuarantineKind
from broker.core.policy import WorkingHours
from broker.core.ports import LeaseSelector, ReevaluationMarker
from broker.core.roles import Role, parse_role_map
from broker.errors import LedgerUnavailableError
from broker.policy_reload import PolicyReloader
from broker.service import CredentialBroker
from tests.unit.test_continuous import (
    AGENT,
    DENY_DEMO_DB,
    NOW,
    ROLES,
    World,
    caller,
    engine_with,
    opened_approval,
    restrict,
)

FAST: dict[str, Any] = {
    "retry_base": timedelta(milliseconds=1),
    "retry_cap": timedelta(milliseconds=4),
}
SLOW: dict[str, Any] = {"retry_base": timedelta(seconds=60), "retry_cap": timedelta(seconds=60)}
INPUTS = "a" * 64
OLD_INPUTS = "b" * 64


class FlakyLedger(InMemoryLedger):
    """Unreachable after handing out the first batch, for the next ``failures`` iterations
    (``failures = -1``: every one); counts the iterations started."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.failures = failures
        self.iterations = 0

    async def iter_leases(
        self, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        self.iterations += 1
        failing = self.failures != 0
        if self.failures > 0:
            self.failures -= 1
        async for found in super().iter_leases(selector, batch=batch):
            yield found
            if failing:
                raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
        if failing:  # nothing to hand out: fail at once
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")


async def until(probe: Callable[[], bool], *, within: float = 2.0) -> None:
    started = time.monotonic()
    while not probe():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.001)


async def flaky_world(failures: int, *, leases: int = 6, **options: Any) -> World:
    """A world on a flaky ledger with ``leases`` demo-db and two demo-kv leases, a policy that
    now denies demo-db, and an authorizer reading 2 leases a batch."""
    world = World(FlakyLedger())
    await world.start_run()
    for n in range(leases):
        await world.issue("demo-db", task=f"db-{n}")
    for n in range(2):
        await world.issue("demo-kv", task=f"kv-{n}")
    world.continuous = world.authorizer(batch=2, **options)
    world.policy.replace(engine_with(DENY_DEMO_DB))
    ledger(world).failures = failures
    return world


def ledger(world: World) -> FlakyLedger:
    assert isinstance(world.ledger, FlakyLedger)
    return world.ledger


async def states(world: World, target: str) -> set[LeaseState]:
    found: set[LeaseState] = set()
    for lease in world.ledger._leases.values():
        if lease.target == target:
            found.add(lease.state)
    return found


def gauge(authorizer: ContinuousAuthorizer) -> float:
    return float(authorizer.metrics.pending._value.get())


def failures(authorizer: ContinuousAuthorizer, scope: str) -> float:
    return float(authorizer.metrics.failures.labels(scope=scope)._value.get())


def completed(authorizer: ContinuousAuthorizer, scope: str) -> float:
    return float(authorizer.metrics.completed.labels(scope=scope)._value.get())


# --------------------------------------------------------------------------- retries


async def test_a_failed_reevaluation_is_retried_until_it_revokes_every_denied_lease() -> None:
    world = await flaky_world(3, **FAST)
    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="sighup")
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert await states(world, "demo-db") == {LeaseState.REVOKED}
    assert await states(world, "demo-kv") == {LeaseState.ACTIVE}
    revoked = [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert len(revoked) == 6  # each once, whichever attempt revoked it
    events = [e["event"] for e in logs]
    assert events.count("continuous.incomplete") == 3
    scheduled = [e for e in logs if e["event"] == "continuous.retry_scheduled"]
    assert [(e["failed_attempts"], e["error"], e["scope"]) for e in scheduled] == [
        (1, "ledger.unreachable", EVERYTHING),
        (2, "ledger.unreachable", EVERYTHING),
        (3, "ledger.unreachable", EVERYTHING),
    ]
    # Jittered exponential backoff: [d/2, d] with d = 1, 2, 4 ms (capped at 4).
    for event, ceiling in zip(scheduled, (0.001, 0.002, 0.004), strict=True):
        assert ceiling / 2 <= event["retry_in_seconds"] <= ceiling
    (recovered,) = [e for e in logs if e["event"] == "continuous.recovered"]
    assert (recovered["scope"], recovered["failed_attempts"]) == (EVERYTHING, 3)
    assert ledger(world).iterations == 4
    assert failures(world.continuous, EVERYTHING) == 3
    assert completed(world.continuous, EVERYTHING) == 1  # the failed attempts do not count
    assert gauge(world.continuous) == 0
    assert world.continuous.pending() == []


async def test_the_gauge_and_the_readiness_alarm_show_a_pending_retry_until_it_completes() -> None:
    world = await flaky_world(1, **SLOW)
    readiness = ContinuousReadiness(world.continuous)
    calm = await readiness.check(NOW)
    assert (calm.name, calm.ok, calm.alarm) == ("continuous", True, False)

    await world.continuous.policy_changed(trigger="sighup")
    await until(lambda: bool(world.continuous.pending()))

    (pending,) = world.continuous.pending()
    assert (pending.scope.kind, pending.failures, pending.error) == (
        EVERYTHING,
        1,
        "ledger.unreachable",
    )
    assert 29 <= pending.retry_in <= 60
    assert gauge(world.continuous) == 1
    check = await readiness.check(NOW)
    assert (check.ok, check.alarm) == (True, True)
    assert "every live lease: 1 failed attempt(s)" in check.detail
    assert "ledger.unreachable" in check.detail
    assert "may still be live" in check.detail
    # Two of six demo-db leases were revoked by the first batch; the rest are still live.
    assert await states(world, "demo-db") == {LeaseState.REVOKED, LeaseState.ACTIVE}

    # A newer change of the same scope replaces the waiting retry and runs at once.
    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="file_change")
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert await states(world, "demo-db") == {LeaseState.REVOKED}
    assert gauge(world.continuous) == 0
    check = await readiness.check(NOW)
    assert (check.ok, check.alarm) == (True, False)
    (recovered,) = [e for e in logs if e["event"] == "continuous.recovered"]
    assert "file_change" in recovered["trigger"]


async def test_a_policy_change_takes_over_a_pending_target_retry() -> None:
    """Coalescing: a target's retry is pending; a policy change arrives, fails too: exactly
    one retry stays pending, the one of every live lease."""
    world = await flaky_world(-1, **SLOW)
    await world.continuous.targets_changed(frozenset({"demo-db"}), trigger="sighup")
    await until(lambda: [p.scope.kind for p in world.continuous.pending()] == [TARGET])
    assert gauge(world.continuous) == 1

    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="sighup")
        await until(lambda: failures(world.continuous, EVERYTHING) == 1)

    # One pending retry: every live lease, carrying the target's failed attempt (2 in all).
    (pending,) = world.continuous.pending()
    assert (pending.scope.kind, pending.failures) == (EVERYTHING, 2)
    assert "the policy set changed" in pending.reason
    assert gauge(world.continuous) == 1
    assert failures(world.continuous, TARGET) == 1
    (coalesced,) = [e for e in logs if e["event"] == "continuous.coalesced"]
    assert (coalesced["scope"], coalesced["into"]) == (
        TARGET,
        "the re-evaluation of every live lease",
    )
    assert ledger(world).iterations == 2  # the target's attempt, the full one: nothing more

    # Once the ledger is back, the one pending retry (brought forward) revokes everything.
    ledger(world).failures = 0
    await world.continuous.policy_changed(trigger="sighup")
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert await states(world, "demo-db") == {LeaseState.REVOKED}
    assert world.continuous.pending() == []


async def test_a_target_attempt_failing_after_a_full_one_started_is_left_to_it() -> None:
    """The full attempt started deciding after the target's change: it covers the target's
    leases, so the target's failed attempt gets no retry of its own."""
    world = await flaky_world(0, **SLOW)
    in_target, release_target = asyncio.Event(), asyncio.Event()
    in_full, release_full = asyncio.Event(), asyncio.Event()
    real = FlakyLedger.iter_leases

    async def gated(
        self: FlakyLedger, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        if selector.everything:
            in_full.set()
            await release_full.wait()
        else:
            in_target.set()
            await release_target.wait()
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
        async for found in real(self, selector, batch=batch):
            yield found

    ledger(world).iter_leases = gated.__get__(ledger(world))  # type: ignore[method-assign]
    await world.continuous.targets_changed(frozenset({"demo-db"}), trigger="sighup")
    await in_target.wait()
    await world.continuous.policy_changed(trigger="sighup")
    await in_full.wait()

    with capture_logs() as logs:
        release_target.set()
        await until(lambda: failures(world.continuous, TARGET) == 1)
    (pending,) = world.continuous.pending()
    assert (pending.scope.kind, pending.failures, pending.retry_in) == (EVERYTHING, 1, 0.0)
    assert [e["event"] for e in logs if e["event"].startswith("continuous.")] == [
        "continuous.incomplete",
        "continuous.coalesced",
    ]

    with capture_logs() as logs:
        release_full.set()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert "continuous.recovered" in [e["event"] for e in logs]
    assert await states(world, "demo-db") == {LeaseState.REVOKED}
    assert (world.continuous.pending(), gauge(world.continuous)) == ([], 0)


async def test_close_cancels_a_pending_retry() -> None:
    world = await flaky_world(-1, **SLOW)
    await world.continuous.policy_changed(trigger="sighup")
    await until(lambda: bool(world.continuous.pending()))

    with capture_logs() as logs:
        await asyncio.wait_for(world.continuous.close(), timeout=1)

    assert world.continuous.pending() == []
    assert gauge(world.continuous) == 0
    (abandoned,) = [e for e in logs if e["event"] == "continuous.retries_abandoned"]
    assert (abandoned["scopes"], abandoned["alert"]) == (["everything:"], True)
    iterations = ledger(world).iterations
    await asyncio.sleep(0.05)
    assert ledger(world).iterations == iterations
    await asyncio.wait_for(world.continuous.drain(), timeout=1)
    # Changes after close are not started.
    await world.continuous.policy_changed(trigger="late")
    assert ledger(world).iterations == iterations


async def test_a_quarantine_attempt_that_fails_raises_and_is_retried() -> None:
    world = await flaky_world(1, **FAST)
    quarantine = Quarantine(
        kind=QuarantineKind.TARGET,
        value="demo-db",
        reason="incident",
        created_by="spiffe://tasklease.test/admin/demo",
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    await world.ledger.set_quarantine(quarantine)
    with pytest.raises(LedgerUnavailableError):
        await world.continuous.quarantine_set(quarantine)
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert await states(world, "demo-db") == {LeaseState.REVOKED}
    assert await states(world, "demo-kv") == {LeaseState.ACTIVE}


async def test_a_withdrawn_approval_whose_attempt_failed_is_revoked_by_the_retry() -> None:
    world = await flaky_world(0, leases=1, **FAST)
    world.policy.replace(engine_with())  # nothing denied but the withdrawn approval's lease
    (lease,) = [x for x in world.ledger._leases.values() if x.target == "demo-db"]
    restrict(world)
    world.ledger._leases[lease.credential_id] = replace(lease, approval_id="apr_" + "1" * 24)
    approval = replace(opened_approval(lease), id="apr_" + "1" * 24, closed_by="bob")
    ledger(world).failures = 1

    with capture_logs() as logs:
        assert await world.continuous.approval_withdrawn(approval) is None
    assert [e["scope"] for e in logs if e["event"] == "continuous.retry_scheduled"] == ["approval"]
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert await world.state(lease.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )


# --------------------------------------------------------------------------- the reloader


async def test_a_long_reevaluation_does_not_keep_the_reloader_from_the_next_change(
    tmp_path: Path,
) -> None:
    policy_dir = tmp_path / "policies"
    shutil.copytree("config/policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    targets_file = tmp_path / "targets.toml"
    shutil.copy("config/targets.toml", targets_file)
    world = World()
    await world.start_run()
    db = await world.issue("demo-db")
    reloader = PolicyReloader.load(
        policy_dir=policy_dir, targets_file=targets_file, hours=WorkingHours(), clock=world.clock
    )
    release = asyncio.Event()
    real = InMemoryLedger.iter_leases

    async def blocked(
        self: InMemoryLedger, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        await release.wait()
        async for found in real(self, selector, batch=batch):
            yield found

    world.ledger.iter_leases = blocked.__get__(world.ledger)  # type: ignore[method-assign]
    continuous = ContinuousAuthorizer(
        ledger=world.ledger,
        policy=reloader.policy,
        targets=reloader.targets,
        roles=ROLES,
        revoker=world.revoker,
        clock=world.clock,
    )
    reloader.listen(continuous)

    (policy_dir / "closed.cedar").write_text(DENY_DEMO_DB)
    first = await asyncio.wait_for(reloader.reload("sighup"), timeout=2)
    (policy_dir / "other.cedar").write_text(
        '@id("other") forbid (principal, action, resource)\nwhen { resource.name == "demo-kv" };\n'
    )
    second = await asyncio.wait_for(reloader.reload("sighup"), timeout=2)
    assert (first.policy, second.policy) == ("reloaded", "reloaded")

    release.set()
    await asyncio.wait_for(continuous.drain(), timeout=5)
    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")


# --------------------------------------------------------------------------- the start-up marker


async def marked_world(
    marker: ReevaluationMarker | None, *, failures: int = 0, **options: Any
) -> tuple[World, InMemoryReevaluationMarkers]:
    markers = InMemoryReevaluationMarkers(marker)
    world = await flaky_world(
        failures,
        leases=3,
        markers=markers,
        inputs=lambda: INPUTS,
        writer="broker-a",
        **(options or FAST),
    )
    return world, markers


@pytest.mark.parametrize(
    "stored",
    [None, ReevaluationMarker(digest=OLD_INPUTS, at=NOW, writer="old-broker")],
    ids=["absent", "stale"],
)
async def test_start_up_with_an_absent_or_stale_marker_reevaluates_then_stores_it(
    stored: ReevaluationMarker | None,
) -> None:
    world, markers = await marked_world(stored)
    with capture_logs() as logs:
        world.continuous.reevaluate_if_inputs_changed()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert await states(world, "demo-db") == {LeaseState.REVOKED}
    assert await states(world, "demo-kv") == {LeaseState.ACTIVE}
    assert markers.marker == ReevaluationMarker(digest=INPUTS, at=NOW, writer="broker-a")
    (changed,) = [e for e in logs if e["event"] == "continuous.inputs_changed"]
    assert (changed["digest"], changed["stored"]) == (
        INPUTS[:12],
        stored.digest[:12] if stored else "",
    )
    revoked = [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert revoked
    assert all(
        isinstance(e.payload, CredentialRevoked) and "start-up" in e.payload.reason for e in revoked
    )


async def test_start_up_with_a_matching_marker_does_not_reevaluate() -> None:
    stored = ReevaluationMarker(digest=INPUTS, at=NOW, writer="other-replica")
    world, markers = await marked_world(stored)
    with capture_logs() as logs:
        world.continuous.reevaluate_if_inputs_changed()
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert ledger(world).iterations == 0
    assert await states(world, "demo-db") == {LeaseState.ACTIVE}
    assert (markers.marker, markers.writes) == (stored, 0)
    assert [e["event"] for e in logs] == ["continuous.inputs_unchanged"]


async def test_a_failed_start_up_reevaluation_does_not_store_the_marker() -> None:
    stale = ReevaluationMarker(digest=OLD_INPUTS, at=NOW, writer="old-broker")
    world, markers = await marked_world(stale, failures=-1, **SLOW)
    world.continuous.reevaluate_if_inputs_changed()
    await until(lambda: bool(world.continuous.pending()))

    assert (markers.marker, markers.writes) == (stale, 0)
    assert await states(world, "demo-db") == {LeaseState.REVOKED, LeaseState.ACTIVE}
    await world.continuous.close()
    assert (markers.marker, markers.writes) == (stale, 0)


async def test_a_start_up_reevaluation_stores_the_marker_once_its_retry_completed() -> None:
    world, markers = await marked_world(None, failures=2)
    world.continuous.reevaluate_if_inputs_changed()
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert ledger(world).iterations == 3
    assert (markers.marker is not None, markers.writes) == (True, 1)
    assert await states(world, "demo-db") == {LeaseState.REVOKED}


async def test_an_unreadable_marker_store_is_retried_like_the_ledger() -> None:
    class Unreachable(InMemoryReevaluationMarkers):
        def __init__(self) -> None:
            super().__init__()
            self.refuse = 2

        async def last_reevaluated(self) -> ReevaluationMarker | None:
            if self.refuse:
                self.refuse -= 1
                raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
            return await super().last_reevaluated()

    markers = Unreachable()
    world = await flaky_world(0, leases=2, markers=markers, inputs=lambda: INPUTS, **FAST)
    world.continuous.reevaluate_if_inputs_changed()
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert markers.marker is not None and markers.marker.digest == INPUTS
    assert failures(world.continuous, EVERYTHING) == 2
    assert await states(world, "demo-db") == {LeaseState.REVOKED}


async def test_a_policy_reevaluation_stores_the_marker_and_a_narrow_one_does_not() -> None:
    world, markers = await marked_world(None)
    await world.continuous.targets_changed(frozenset({"demo-db"}), trigger="sighup")
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert markers.writes == 0
    await world.continuous.policy_changed(trigger="sighup")
    await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert (markers.writes, markers.marker is not None and markers.marker.digest) == (1, INPUTS)


async def test_inputs_that_changed_during_the_reevaluation_are_not_marked() -> None:
    digests = iter([INPUTS, OLD_INPUTS])
    markers = InMemoryReevaluationMarkers()
    world = await flaky_world(0, markers=markers, inputs=lambda: next(digests), **FAST)
    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="sighup")
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert (markers.marker, markers.writes) == (None, 0)
    assert "continuous.marker_skipped" in [e["event"] for e in logs]


async def test_a_marker_that_cannot_be_stored_costs_no_retry() -> None:
    class Refusing(InMemoryReevaluationMarkers):
        async def mark_reevaluated(self, marker: ReevaluationMarker) -> None:
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")

    world = await flaky_world(0, markers=Refusing(), inputs=lambda: INPUTS, **FAST)
    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="sighup")
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    (failed,) = [e for e in logs if e["event"] == "continuous.marker_failed"]
    assert failed["reason"] == "ledger.unreachable"
    assert (ledger(world).iterations, world.continuous.pending()) == (1, [])


# --------------------------------------------------------------------------- the digest


class Sources:
    def __init__(self) -> None:
        self.policy_digest = "p" * 64
        self.targets_digest = "t" * 64
        self.hours = WorkingHours()


def test_the_decision_inputs_digest_follows_every_input() -> None:
    sources = Sources()
    inputs = DecisionInputs(sources, ROLES)
    first = inputs()
    assert len(first) == 64 and first == inputs()
    seen = {first}
    sources.policy_digest = "q" * 64
    seen.add(inputs())
    sources.targets_digest = "u" * 64
    seen.add(inputs())
    sources.hours = WorkingHours(start_hour_utc=0, end_hour_utc=24)
    seen.add(inputs())
    other_roles = parse_role_map(
        {"workload": [{"pattern": "spiffe://tasklease.test/agent/*", "roles": ["admin"]}]}
    )
    seen.add(DecisionInputs(sources, other_roles)())
    assert len(seen) == 5


def test_the_order_of_role_rules_does_not_change_the_digest() -> None:
    rules = [
        {"pattern": "spiffe://tasklease.test/agent/*", "roles": ["agent"]},
        {"pattern": "spiffe://tasklease.test/admin/*", "roles": ["admin", "approver"]},
    ]
    one = parse_role_map({"workload": rules})
    two = parse_role_map({"workload": [rules[1] | {"roles": ["approver", "admin"]}, rules[0]]})
    digest: Callable[..., str] = decision_inputs_digest
    args = {"policy_digest": "p", "targets_digest": "t", "hours": WorkingHours()}
    assert digest(roles=one, **args) == digest(roles=two, **args)


async def test_the_readiness_check_before_the_authorizer_exists() -> None:
    check = await ContinuousReadiness().check(NOW)
    assert (check.name, check.ok, check.alarm, check.detail) == (
        "continuous",
        True,
        False,
        "not started",
    )


def test_retry_timings_must_be_positive_and_ordered() -> None:
    world = World()
    with pytest.raises(ValueError, match="retry_base"):
        world.authorizer(retry_base=timedelta(seconds=2), retry_cap=timedelta(seconds=1))
    with pytest.raises(ValueError, match="retry_base"):
        world.authorizer(retry_base=timedelta(0))


# --------------------------------------------------------------------------- the follow-up


async def test_credentials_an_old_replica_issued_meanwhile_are_decided_in_the_follow_up() -> None:
    """A re-evaluation of every live lease under new inputs (deny demo-db) completes and
    stores its marker; a replica still on the previous inputs then issues a demo-db
    credential. The follow-up, scheduled once the marker is stored, decides again the leases
    issued since the re-evaluation began (less a minute of skew) and revokes it; a lease
    issued before that window is left to the full pass."""
    markers = InMemoryReevaluationMarkers()
    world = await flaky_world(
        0,
        leases=1,
        markers=markers,
        inputs=lambda: INPUTS,
        writer="broker-a",
        follow_up_after=timedelta(milliseconds=30),
        **FAST,
    )
    await world.continuous.policy_changed(trigger="sighup")
    # The old replica: the same ledger, the previous policy set (demo-db allowed).
    old = CredentialBroker(
        policy=engine_with(),
        minter=world.minter,
        ledger=world.ledger,
        targets=world.targets,
        clock=world.clock,
    )

    async def issue_on_old(task: str) -> Lease:
        issued = await old.request_credential(
            caller(AGENT, Role.AGENT),
            CredentialRequest(
                workflow_id="wf-1", task_id=task, target="demo-db", ttl=timedelta(seconds=300)
            ),
            params={},
        )
        return issued.lease

    await until(lambda: markers.writes == 1)
    recent = await issue_on_old("old-replica")
    world.clock.current = NOW - timedelta(minutes=5)  # stamped before the follow-up's window
    earlier = await issue_on_old("before-the-window")
    world.clock.current = NOW
    assert (await world.state(recent.credential_id))[0] == LeaseState.ACTIVE

    with capture_logs() as logs:
        await asyncio.sleep(0.1)
        await asyncio.wait_for(world.continuous.drain(), timeout=5)

    assert await world.state(recent.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert (await world.state(earlier.credential_id))[0] == LeaseState.ACTIVE
    (report,) = [e for e in logs if e["event"] == "continuous.reevaluated"]
    assert report["trigger"].startswith("follow-up:")
    # The recent one and the two demo-kv leases (issued at NOW too); not the earlier one.
    assert report["examined"] == 3
    assert markers.writes == 1  # the follow-up stores no marker of its own
    assert (completed(world.continuous, EVERYTHING), completed(world.continuous, RECENT)) == (1, 1)


async def test_no_follow_up_unless_configured() -> None:
    markers = InMemoryReevaluationMarkers()
    world = await flaky_world(0, leases=1, markers=markers, inputs=lambda: INPUTS, **FAST)
    with capture_logs() as logs:
        await world.continuous.policy_changed(trigger="sighup")
        await asyncio.wait_for(world.continuous.drain(), timeout=5)
    assert [e["event"] for e in logs].count("continuous.reevaluated") == 1
