"""A replica whose decision inputs the fleet has moved past (broker/superseded.py): when it is
superseded and when not, what issuance and /readyz then say, and how it clears."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from broker.adapters.memory_reevaluation import InMemoryReevaluationMarkers
from broker.core.ports import ReevaluationMarker
from broker.errors import LedgerUnavailableError, UnavailableError
from broker.superseded import SupersededInputsWatch, SupersededReadiness

START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
OLD = "a" * 64
NEW = "b" * 64
THIRD = "c" * 64


class SteppingClock:
    def __init__(self) -> None:
        self.now_value = START

    def now(self) -> datetime:
        return self.now_value


class Inputs:
    """The replica's decision inputs digest, changed by a test as a reload would."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def __call__(self) -> str:
        return self.digest


def _marker(digest: str, at: datetime, writer: str = "broker-2") -> ReevaluationMarker:
    return ReevaluationMarker(digest=digest, at=at, writer=writer)


def _watch(
    markers: InMemoryReevaluationMarkers, inputs: Inputs, clock: SteppingClock
) -> tuple[SupersededInputsWatch, CollectorRegistry]:
    registry = CollectorRegistry()
    watch = SupersededInputsWatch(markers=markers, inputs=inputs, clock=clock, registry=registry)
    return watch, registry


@pytest.mark.parametrize(
    ("marker", "why"),
    [
        (None, "no marker stored yet"),
        (_marker(OLD, START + timedelta(minutes=5)), "the marker is this replica's inputs"),
        (_marker(NEW, START - timedelta(seconds=1)), "other inputs, applied before these"),
        (_marker(NEW, START), "other inputs, applied at the instant these came into force"),
    ],
)
async def test_a_replica_is_current(marker: ReevaluationMarker | None, why: str) -> None:
    clock = SteppingClock()
    watch, registry = _watch(InMemoryReevaluationMarkers(marker), Inputs(OLD), clock)
    assert await watch.check() is None, why
    watch.refuse_if_superseded()  # does not raise
    assert (await SupersededReadiness(watch).check(clock.now())).ok
    assert registry.get_sample_value("tasklease_policy_superseded") == 0


async def test_other_inputs_applied_after_these_supersede_the_replica() -> None:
    clock = SteppingClock()
    markers = InMemoryReevaluationMarkers()
    watch, registry = _watch(markers, Inputs(OLD), clock)
    clock.now_value = START + timedelta(minutes=1)
    markers.marker = _marker(NEW, START + timedelta(seconds=30), writer="host-7-abc")
    with capture_logs() as logs:
        state = await watch.check()
        await watch.check()
    assert state is not None
    assert (state.own_digest, state.own_since, state.marker_digest) == (OLD, START, NEW)
    assert [entry["event"] for entry in logs] == ["policy.superseded"]  # once, not per check
    assert logs[0]["alert"] is True
    with pytest.raises(UnavailableError) as refused:
        watch.refuse_if_superseded()
    assert refused.value.reason == "policy.superseded"
    assert refused.value.status == 503
    for said in (OLD[:12], NEW[:12], "host-7-abc", "SIGHUP"):
        assert said in str(refused.value)
    readiness = await SupersededReadiness(watch).check(clock.now())
    assert (readiness.name, readiness.ok) == ("policy_set", False)
    assert readiness.detail == state.explain()
    assert registry.get_sample_value("tasklease_policy_superseded") == 1


async def test_loading_the_markers_inputs_clears_it() -> None:
    clock = SteppingClock()
    markers = InMemoryReevaluationMarkers(_marker(NEW, START + timedelta(seconds=30)))
    inputs = Inputs(OLD)
    watch, registry = _watch(markers, inputs, clock)
    assert await watch.check() is not None
    inputs.digest = NEW  # a SIGHUP or a file poll loaded the new files
    clock.now_value = START + timedelta(minutes=2)
    with capture_logs() as logs:
        assert await watch.check() is None
    assert [entry["event"] for entry in logs] == ["policy.current"]
    watch.refuse_if_superseded()
    assert registry.get_sample_value("tasklease_policy_superseded") == 0


async def test_this_replicas_own_later_reevaluation_makes_it_current_again() -> None:
    """After a rollback the rolled-back inputs are the newest once a replica applied them."""
    clock = SteppingClock()
    markers = InMemoryReevaluationMarkers(_marker(NEW, START + timedelta(seconds=30)))
    watch, _ = _watch(markers, Inputs(OLD), clock)
    assert await watch.check() is not None
    markers.marker = _marker(OLD, START + timedelta(minutes=3), writer="this replica")
    assert await watch.check() is None


async def test_inputs_loaded_after_the_marker_are_newer_than_it() -> None:
    """A reload to a third set after the marker: this replica's inputs are the newest now."""
    clock = SteppingClock()
    markers = InMemoryReevaluationMarkers(_marker(NEW, START + timedelta(seconds=30)))
    inputs = Inputs(OLD)
    watch, _ = _watch(markers, inputs, clock)
    assert await watch.check() is not None
    clock.now_value = START + timedelta(minutes=5)
    inputs.digest = THIRD
    assert await watch.check() is None


async def test_a_marker_that_cannot_be_read_keeps_the_state() -> None:
    class Unreachable(InMemoryReevaluationMarkers):
        refuse = False

        async def last_reevaluated(self) -> ReevaluationMarker | None:
            if self.refuse:
                raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
            return await super().last_reevaluated()

    clock = SteppingClock()
    markers = Unreachable(_marker(NEW, START + timedelta(seconds=30)))
    watch, _ = _watch(markers, Inputs(OLD), clock)
    superseded = await watch.check()
    assert superseded is not None
    markers.refuse = True
    with capture_logs() as logs:
        assert await watch.check() == superseded
    assert logs == [
        {
            "event": "policy.superseded_check_failed",
            "reason": "ledger.unreachable",
            "log_level": "warning",
        }
    ]


async def test_no_interval_means_no_checks() -> None:
    markers = InMemoryReevaluationMarkers(_marker(NEW, START + timedelta(seconds=30)))
    watch, _ = _watch(markers, Inputs(OLD), SteppingClock())
    await watch.run(interval=timedelta(0))
    assert watch.state is None
