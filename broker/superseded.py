"""A replica whose decision inputs the fleet has moved past stops issuing until it loads them.

During a rolling change of the policy set (or the targets catalog, the role rules, the working
hours), replicas run different decision inputs for a while. The first replica on the new
inputs decides every live credential again and notes it (the re-evaluation marker,
``core.ports.ReevaluationMarkers``: the inputs' digest, when that completed, who did it). A
replica still on the old inputs would go on issuing under them, and a replica restarted later
on the new inputs finds the marker equal to its own and decides nothing again: what the old
replica issued meanwhile would live to its TTL under a policy no longer in force.

:class:`SupersededInputsWatch` closes that window. Every ``interval`` it reads the marker; when
it names other inputs than this replica's and was stored *after* this replica's came into force
(so another replica completed a re-evaluation of every live credential under newer inputs),
this replica is **superseded**:

* ``POST /v1/credentials`` answers ``503 unavailable`` (``policy.superseded``): a client retries
  and the load balancer sends it to a current replica;
* its ``/readyz`` check ``policy_set`` fails, so the load balancer stops sending it requests;
* ``tasklease_policy_superseded`` is 1 and ``policy.superseded`` is logged (alert) once.

It clears by itself as soon as this replica's inputs are those of the marker (a SIGHUP or file
poll that loads the new files, or a restart), or when this replica's own re-evaluation under
newer inputs stores a marker (the last to complete one wins: after a rollback the rolled-back
inputs are the newest). "After" compares the marker's time (the writer's clock) with this
replica's (when it first saw its inputs in force): clocks that disagree by more than the time
between the two events can mark a replica superseded until its own re-evaluation completes,
never the other way round for long. A marker that cannot be read leaves the state as it was
(logged). Credentials the old inputs issued before the replica was marked are decided again by
nothing here: the window is at most ``interval`` plus the re-evaluation's own duration; the
next start or reload on the new inputs does not decide them either (the marker matches), so
the interval is kept short (5 s by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from prometheus_client import CollectorRegistry, Gauge

from broker.core.ports import CheckResult, Clock, ReevaluationMarkers
from broker.errors import TaskleaseError, UnavailableError

_log = structlog.get_logger("broker.superseded")
DEFAULT_INTERVAL = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class Superseded:
    """Why this replica is superseded: its inputs and since when, and the marker's."""

    own_digest: str
    own_since: datetime
    marker_digest: str
    marker_at: datetime
    marker_writer: str

    def explain(self) -> str:
        """One sentence an operator can act on (no secret: digests and a process name)."""
        return (
            f"the decision inputs in force here ({self.own_digest[:12]}, since "
            f"{self.own_since.isoformat()}) were superseded: {self.marker_writer} completed a "
            f"re-evaluation of every live credential under {self.marker_digest[:12]} at "
            f"{self.marker_at.isoformat()}; load the current policy, targets and roles "
            "(SIGHUP) or replace this replica"
        )


class SupersededInputsWatch:
    """Whether another replica has moved the fleet to other decision inputs (see the module)."""

    def __init__(
        self,
        *,
        markers: ReevaluationMarkers,
        inputs: Callable[[], str],
        clock: Clock,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._markers = markers
        self._inputs = inputs
        self._clock = clock
        self._digest = inputs()
        self._since = clock.now()
        self._state: Superseded | None = None
        self._gauge = Gauge(
            "tasklease_policy_superseded",
            "1 while another replica has applied other decision inputs (policy set, targets, "
            "roles, working hours) after this replica's came into force: it issues nothing",
            registry=registry,
        )

    @property
    def state(self) -> Superseded | None:
        """The reason this replica is superseded, or None (what issuance reads: no I/O)."""
        return self._state

    def refuse_if_superseded(self) -> None:
        """Raise 503 ``policy.superseded`` while superseded (the issuance hook)."""
        state = self._state
        if state is not None:
            raise UnavailableError(state.explain(), reason="policy.superseded")

    async def check(self) -> Superseded | None:
        """Read the marker once and update the state (logged when it changes)."""
        digest = self._inputs()
        if digest != self._digest:
            self._digest, self._since = digest, self._clock.now()
        try:
            marker = await self._markers.last_reevaluated()
        except TaskleaseError as exc:
            _log.warning("policy.superseded_check_failed", reason=exc.reason)
            return self._state
        state = None
        if marker is not None and marker.digest != digest and marker.at > self._since:
            state = Superseded(
                own_digest=digest,
                own_since=self._since,
                marker_digest=marker.digest,
                marker_at=marker.at,
                marker_writer=marker.writer,
            )
        if state is not None and self._state is None:
            _log.error("policy.superseded", detail=state.explain(), alert=True)
        elif state is None and self._state is not None:
            _log.warning("policy.current", digest=digest[:12])
        self._state = state
        self._gauge.set(1 if state is not None else 0)
        return state

    async def run(self, *, interval: timedelta) -> None:
        """Check every ``interval`` until cancelled (0: never)."""
        if interval <= timedelta(0):
            return
        while True:
            await self.check()
            await asyncio.sleep(interval.total_seconds())


class SupersededReadiness:
    """/readyz check ``policy_set`` (satisfies ``core.ports.ReadinessCheck``): not ready while
    the watch says this replica is superseded."""

    name = "policy_set"

    def __init__(self, watch: SupersededInputsWatch) -> None:
        self._watch = watch

    async def check(self, now: datetime) -> CheckResult:
        """The watch's last state (no I/O: it reads the marker on its own schedule)."""
        state = self._watch.state
        if state is None:
            return CheckResult(
                self.name, ok=True, detail="the decision inputs in force are current"
            )
        return CheckResult(self.name, ok=False, detail=state.explain())
