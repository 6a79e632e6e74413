"""The revocation sweeper on APScheduler: one interval job per process, never one per lease.

The job calls ``revoke_due(clock.now())``; the due leases themselves live in the ledger's due
index, so a replica that stops loses nothing (its claims come back after the visibility
timeout) and any number of replicas sweep at once. ``max_instances=1`` keeps one sweep per
process at a time and ``coalesce=True`` folds ticks missed during a long sweep into one.
A sweep's failure is logged (reason codes only) and the next tick tries again; APScheduler
never sees an exception, so it never logs a traceback that could carry a backend's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from broker.core.ports import Clock
from broker.errors import TaskleaseError

_log = structlog.get_logger("broker.sweeper")

JOB_ID = "tasklease-revocation-sweep"
# The sweep's own executor: APScheduler logs two INFO lines per run on its executor's logger,
# which at one sweep a second would drown the broker log; this one logs warnings and up.
_EXECUTOR = "tasklease-sweeper"


class _SkippedTickFilter(logging.Filter):
    """Drops APScheduler's warning that a tick was skipped because the previous sweep still
    runs: with ``max_instances=1`` and ``coalesce=True`` that is the design, and a long sweep
    would otherwise log it up to once per interval (the sweep lag metric shows the delay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (JOB_ID in message and "maximum number of running instances" in message)


_SKIPPED_TICKS = _SkippedTickFilter()


class RevocationSweeper:
    """Runs ``sweep(now)`` every ``interval`` on the running event loop.

    ``sweep`` is :meth:`broker.revocation.Revoker.revoke_due` in the broker. Use :meth:`run`
    as a background task (it starts the scheduler and stops it when cancelled), or
    :meth:`start` / :meth:`stop` directly.
    """

    def __init__(
        self,
        *,
        sweep: Callable[[datetime], Awaitable[Any]],
        clock: Clock,
        interval: timedelta = timedelta(seconds=1),
        stop_grace: timedelta = timedelta(seconds=10),
    ) -> None:
        if interval <= timedelta(0):
            raise ValueError(f"the sweep interval must be positive, got {interval}")
        self._sweep = sweep
        self._clock = clock
        self._interval = interval
        self._stop_grace = stop_grace
        self._scheduler: AsyncIOScheduler | None = None
        self._current: asyncio.Task[None] | None = None
        self.sweeps = 0
        self.failures = 0

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._scheduler is not None

    def start(self) -> None:
        """Add the interval job and start the scheduler on the running loop. The first
        sweep runs at once: a restarted broker drains its overdue backlog first."""
        if self._scheduler is not None:
            return
        logging.getLogger(f"apscheduler.executors.{_EXECUTOR}").setLevel(logging.WARNING)
        logging.getLogger("apscheduler.scheduler").addFilter(_SKIPPED_TICKS)
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_executor(AsyncIOExecutor(), alias=_EXECUTOR)
        scheduler.add_job(
            self._tick,
            "interval",
            executor=_EXECUTOR,
            seconds=self._interval.total_seconds(),
            id=JOB_ID,
            name=JOB_ID,
            max_instances=1,
            coalesce=True,
            # Run however late the loop gets to it: a late sweep beats a skipped one.
            misfire_grace_time=None,
            next_run_time=self._clock.now(),
        )
        scheduler.start()
        self._scheduler = scheduler
        _log.info("revocation.sweeper_started", interval_seconds=self._interval.total_seconds())

    async def stop(self) -> None:
        """Stop ticking, let a sweep in progress finish (within ``stop_grace``), shut down."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        scheduler.pause()
        current = self._current
        if current is not None and not current.done():
            # Past the grace the sweep is cancelled; its unfinished claims come back to the
            # due index after the visibility timeout (SECURITY 35).
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(
                    asyncio.shield(current), timeout=self._stop_grace.total_seconds()
                )
        scheduler.shutdown(wait=False)
        # APScheduler's asyncio shutdown is queued on the loop: let it run before returning.
        await asyncio.sleep(0)
        _log.info("revocation.sweeper_stopped", sweeps=self.sweeps, failures=self.failures)

    async def run(self) -> None:
        """Start, then wait until cancelled; stop on the way out (a background task)."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _tick(self) -> None:
        self._current = asyncio.current_task()
        try:
            await self._sweep(self._clock.now())
            self.sweeps += 1
        except TaskleaseError as exc:
            # Typically the ledger is unreachable; nothing was lost, the next tick retries.
            self.failures += 1
            _log.warning("revocation.sweep_failed", error=exc.code, reason=exc.reason)
        except Exception as exc:  # noqa: BLE001 - a sweep must never kill the job
            self.failures += 1
            _log.error("revocation.sweep_crashed", error_type=type(exc).__name__)
        finally:
            self._current = None
