"""Policy lifecycle: the policy set and the targets catalog in force, and their hot reload.

The broker decides with :class:`LivePolicy` and looks targets up in :class:`LiveTargets`;
each holds the set in force and swaps it in one assignment, so a decision sees the old set or
the new one, never a mixture. :class:`PolicyReloader` replaces them:

* on a **file change**: every ``policy.reload_interval_seconds`` it compares what ``stat``
  says about ``<policy_dir>/*.cedar``, the schema and the targets file with the last look;
  only then does it read them, and a content digest that did not change (``touch``) is no
  change;
* on **SIGHUP** (:meth:`PolicyReloader.request_reload`, wired in bootstrap): read and compare
  the digests whatever ``stat`` says.

A new policy set is parsed and validated against its schema (and a new catalog parsed) *before*
it replaces the old one. An invalid set never replaces anything: the old one stays in force,
the failure is logged as an alert (``policy.reload_failed``, ``alert=True``), counted
(``tasklease_policy_reloads_total{result="invalid"}``, gauge
``tasklease_policy_reload_failing``) and shown on ``/readyz`` as an alarm of the ``policy``
check, which stays ready: the broker still decides with a valid set. The alarm clears when a
valid set is loaded (or the files return to the set in force).

After a set really changed, the listeners (continuous authorization) are told, so live
credentials are decided again under the new set. Listeners only queue that work (it runs in
the background, retried until done), so a long re-evaluation never keeps the reloader from
noticing the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from broker.adapters.config_files import (
    PolicyFiles,
    Signature,
    TargetsFile,
    file_signature,
    policy_dir_signature,
    read_policy_dir,
    read_targets_file,
)
from broker.core.model import Decision, Target
from broker.core.policy import CedarPolicyEngine, WorkingHours
from broker.core.ports import CheckResult, Clock, PolicyRequest
from broker.core.untrusted import printable
from broker.errors import ConfigurationError

_log = structlog.get_logger("broker.policy")

_ERROR_LIMIT = 600


class LivePolicy:
    """The policy set in force. Satisfies ``core.ports.PolicyEngine``."""

    def __init__(self, engine: CedarPolicyEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> CedarPolicyEngine:
        """The engine deciding now."""
        return self._engine

    def decide(self, request: PolicyRequest) -> Decision:
        """Decide with the set in force at the moment of the call."""
        return self._engine.decide(request)

    def replace(self, engine: CedarPolicyEngine) -> None:
        """Put ``engine`` in force (one assignment: atomic for every decision)."""
        self._engine = engine


class LiveTargets(Mapping[str, Target]):
    """The targets catalog in force, as a read-only mapping that follows reloads."""

    def __init__(self, catalog: Mapping[str, Target]) -> None:
        self._catalog = catalog

    def __getitem__(self, name: str) -> Target:
        return self._catalog[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._catalog)

    def __len__(self) -> int:
        return len(self._catalog)

    def replace(self, catalog: Mapping[str, Target]) -> None:
        """Put ``catalog`` in force."""
        self._catalog = catalog


class ChangeListener(Protocol):
    """Told after a reload changed what is in force (continuous authorization). The reloader
    awaits each call: a listener queues its work and returns promptly."""

    async def policy_changed(self, *, trigger: str) -> None:
        """A new policy set is in force."""
        ...

    async def targets_changed(self, names: frozenset[str], *, trigger: str) -> None:
        """These targets were changed, added or removed in the catalog in force."""
        ...


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What one reload did. ``policy`` / ``targets``: ``unchanged``, ``reloaded`` or
    ``invalid`` (the old one stays in force; ``errors`` says why)."""

    trigger: str
    policy: str = "unchanged"
    targets: str = "unchanged"
    changed_targets: frozenset[str] = frozenset()
    errors: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """True when a file set on disk was invalid and was not loaded."""
        return "invalid" in (self.policy, self.targets)


class PolicyReloadMetrics:
    """Prometheus instruments of the policy lifecycle, registered on ``registry`` (or later,
    with :meth:`register`: the reloader exists before the process registry does)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.reloads = Counter(
            "tasklease_policy_reloads",
            "Reloads of the policy set or the targets catalog that found a change, by result",
            ["what", "result"],
            registry=None,
        )
        self.failing = Gauge(
            "tasklease_policy_reload_failing",
            "1 while the files on disk are invalid and the previous set stays in force",
            ["what"],
            registry=None,
        )
        if registry is not None:
            self.register(registry)

    def register(self, registry: CollectorRegistry) -> None:
        """Expose the instruments on ``registry`` (once)."""
        registry.register(self.reloads)
        registry.register(self.failing)


@dataclass(frozen=True, slots=True)
class _Failure:
    digest: str
    error: str
    since: datetime


class PolicyReloader:
    """Watches the policy directory and the targets file; swaps in valid new sets.

    Build it with :meth:`load` at start-up (an invalid set there stops the broker, as before);
    run :meth:`run` as a background task; call :meth:`reload` (tests, SIGHUP) any time.
    Reloads are serialised: a SIGHUP during a poll waits for it.
    """

    def __init__(
        self,
        *,
        policy_dir: Path,
        targets_file: Path,
        hours: WorkingHours,
        policy_files: PolicyFiles,
        targets_files: TargetsFile,
        clock: Clock,
        metrics: PolicyReloadMetrics | None = None,
    ) -> None:
        self._policy_dir = policy_dir
        self._targets_file = targets_file
        self._hours = hours
        self._clock = clock
        self.metrics = metrics or PolicyReloadMetrics()
        self.policy = LivePolicy(policy_files.engine(hours))
        self.targets = LiveTargets(targets_files.catalog)
        self._policy_digest = policy_files.digest
        self._targets_digest = targets_files.digest
        self._policy_signature = policy_dir_signature(policy_dir)
        self._targets_signature = file_signature([targets_file])
        self._loaded_at = clock.now()
        self._failures: dict[str, _Failure] = {}
        self._listeners: list[ChangeListener] = []
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[ReloadOutcome]] = set()

    @classmethod
    def load(
        cls,
        *,
        policy_dir: Path,
        targets_file: Path,
        hours: WorkingHours,
        clock: Clock,
        metrics: PolicyReloadMetrics | None = None,
    ) -> PolicyReloader:
        """Read and validate both at start-up; raises :class:`ConfigurationError`."""
        return cls(
            policy_dir=policy_dir,
            targets_file=targets_file,
            hours=hours,
            policy_files=read_policy_dir(policy_dir),
            targets_files=read_targets_file(targets_file),
            clock=clock,
            metrics=metrics,
        )

    def listen(self, listener: ChangeListener) -> None:
        """Tell ``listener`` about every change put in force from now on."""
        self._listeners.append(listener)

    @property
    def policy_digest(self) -> str:
        """SHA-256 of the policy files in force."""
        return self._policy_digest

    @property
    def targets_digest(self) -> str:
        """SHA-256 of the targets file in force."""
        return self._targets_digest

    @property
    def hours(self) -> WorkingHours:
        """The working window every decision sees (a setting, not reloaded)."""
        return self._hours

    # ---- reloading

    async def reload(self, trigger: str, *, force: bool = True) -> ReloadOutcome:
        """Check both file sets now and put valid changes in force, then tell the listeners.

        ``force=False`` (the poll) reads only files whose ``stat`` changed since the last
        look; ``force=True`` (SIGHUP, tests) reads and compares digests regardless.
        """
        async with self._lock:
            outcome = await self._reload_locked(trigger, force=force)
        if outcome.policy == "reloaded":
            await self._notify_policy(trigger)
        elif outcome.changed_targets:
            await self._notify_targets(outcome.changed_targets, trigger)
        return outcome

    def request_reload(self, trigger: str = "sighup") -> None:
        """Schedule a forced reload from a signal handler (which cannot await)."""
        task = asyncio.get_running_loop().create_task(self._logged_reload(trigger))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def run(self, *, interval: timedelta) -> None:
        """Poll every ``interval`` until cancelled; a failed poll is logged, never fatal."""
        if interval <= timedelta(0):
            return
        while True:
            await asyncio.sleep(interval.total_seconds())
            await self._logged_reload("file_change", force=False)

    async def close(self) -> None:
        """Cancel reloads requested by signal that are still running."""
        for task in list(self._pending):
            task.cancel()
        for task in list(self._pending):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _logged_reload(self, trigger: str, *, force: bool = True) -> ReloadOutcome:
        try:
            return await self.reload(trigger, force=force)
        except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one reload
            _log.error("policy.reload_crashed", trigger=trigger, error=type(exc).__name__)
            return ReloadOutcome(trigger=trigger, errors=(type(exc).__name__,))

    async def _reload_locked(self, trigger: str, *, force: bool) -> ReloadOutcome:
        policy_signature = policy_dir_signature(self._policy_dir)
        targets_signature = file_signature([self._targets_file])
        policy_result = "unchanged"
        targets_result = "unchanged"
        changed: frozenset[str] = frozenset()
        errors: list[str] = []
        if force or policy_signature != self._policy_signature:
            policy_result, error = await self._reload_policy(trigger, policy_signature)
            if error:
                errors.append(error)
        if force or targets_signature != self._targets_signature:
            targets_result, changed, error = await self._reload_targets(trigger, targets_signature)
            if error:
                errors.append(error)
        return ReloadOutcome(
            trigger=trigger,
            policy=policy_result,
            targets=targets_result,
            changed_targets=changed,
            errors=tuple(errors),
        )

    async def _reload_policy(self, trigger: str, signature: Signature) -> tuple[str, str]:
        try:
            files = await asyncio.to_thread(read_policy_dir, self._policy_dir)
        except ConfigurationError as exc:
            return self._invalid("policy", "", exc, trigger, signature), exc.detail
        if files.digest == self._policy_digest:
            self._policy_signature = signature
            self._recovered("policy")
            return "unchanged", ""
        try:
            engine = await asyncio.to_thread(files.engine, self._hours)
        except ConfigurationError as exc:
            return self._invalid("policy", files.digest, exc, trigger, signature), exc.detail
        previous = self.policy.engine
        self.policy.replace(engine)
        self._policy_digest = files.digest
        self._policy_signature = signature
        self._loaded_at = self._clock.now()
        self._recovered("policy")
        self.metrics.reloads.labels(what="policy", result="reloaded").inc()
        before = {info.id for info in previous.policies}
        after = {info.id for info in engine.policies}
        _log.warning(
            "policy.reloaded",
            trigger=trigger,
            digest=files.digest,
            policies=len(engine.policies),
            added=sorted(after - before),
            removed=sorted(before - after),
        )
        return "reloaded", ""

    async def _reload_targets(
        self, trigger: str, signature: Signature
    ) -> tuple[str, frozenset[str], str]:
        try:
            parsed = await asyncio.to_thread(read_targets_file, self._targets_file)
        except ConfigurationError as exc:
            result = self._invalid("targets", "", exc, trigger, signature)
            return result, frozenset(), exc.detail
        self._targets_signature = signature
        if parsed.digest == self._targets_digest:
            self._recovered("targets")
            return "unchanged", frozenset(), ""
        old, new = dict(self.targets), parsed.catalog
        changed = frozenset(
            name for name in old.keys() | new.keys() if old.get(name) != new.get(name)
        )
        self.targets.replace(new)
        self._targets_digest = parsed.digest
        self._loaded_at = self._clock.now()
        self._recovered("targets")
        self.metrics.reloads.labels(what="targets", result="reloaded").inc()
        _log.warning(
            "targets.reloaded",
            trigger=trigger,
            digest=parsed.digest,
            targets=len(new),
            changed=sorted(changed),
        )
        return "reloaded", changed, ""

    def _invalid(
        self,
        what: str,
        digest: str,
        exc: ConfigurationError,
        trigger: str,
        signature: Signature,
    ) -> str:
        """Keep the set in force; alert once per distinct bad content."""
        error = printable(exc.detail, _ERROR_LIMIT)
        if what == "policy":
            self._policy_signature = signature
        else:
            self._targets_signature = signature
        known = self._failures.get(what)
        if known is None or (known.digest, known.error) != (digest, error):
            self._failures[what] = _Failure(
                digest=digest,
                error=error,
                since=known.since if known is not None else self._clock.now(),
            )
            self.metrics.reloads.labels(what=what, result="invalid").inc()
            _log.error(
                "policy.reload_failed",
                what=what,
                trigger=trigger,
                error=error,
                kept_digest=self._policy_digest if what == "policy" else self._targets_digest,
                alert=True,
            )
        self.metrics.failing.labels(what=what).set(1)
        return "invalid"

    def _recovered(self, what: str) -> None:
        if self._failures.pop(what, None) is not None:
            _log.info("policy.reload_recovered", what=what)
        self.metrics.failing.labels(what=what).set(0)

    async def _notify_policy(self, trigger: str) -> None:
        for listener in self._listeners:
            try:
                await listener.policy_changed(trigger=trigger)
            except Exception as exc:  # noqa: BLE001 - one listener must not stop the others
                _log.error("policy.listener_failed", trigger=trigger, error=type(exc).__name__)

    async def _notify_targets(self, names: frozenset[str], trigger: str) -> None:
        for listener in self._listeners:
            try:
                await listener.targets_changed(names, trigger=trigger)
            except Exception as exc:  # noqa: BLE001 - one listener must not stop the others
                _log.error("targets.listener_failed", trigger=trigger, error=type(exc).__name__)

    # ---- readiness

    def check_result(self) -> CheckResult:
        """The ``policy`` readiness check: always ready (a valid set is in force), with an
        alarm while the files on disk are invalid."""
        in_force = (
            f"{len(self.policy.engine.policies)} policies (sha256 {self._policy_digest[:12]}) "
            f"and {len(self.targets)} targets (sha256 {self._targets_digest[:12]}) in force "
            f"(last change {self._loaded_at.isoformat()})"
        )
        if not self._failures:
            return CheckResult("policy", ok=True, detail=in_force)
        problems = "; ".join(
            f"{what} files invalid since {failure.since.isoformat()}: {failure.error}"
            for what, failure in sorted(self._failures.items())
        )
        return CheckResult("policy", ok=True, detail=f"{problems}; kept: {in_force}", alarm=True)


class PolicyReadiness:
    """/readyz check ``policy`` (satisfies ``core.ports.ReadinessCheck``)."""

    name = "policy"

    def __init__(self, reloader: PolicyReloader) -> None:
        self._reloader = reloader

    async def check(self, now: datetime) -> CheckResult:
        """Ready with the set in force; an alarm while a reload keeps failing."""
        return self._reloader.check_result()
