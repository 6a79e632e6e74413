"""The legacy burn-down report: for each target the catalog in force marks ``legacy``, who
still gets credentials for it (``GET /v1/reports/legacy``, ``tasklease report legacy``).

Read from the ledger, which keeps every lease of a run until ``ledger.retention_days`` after
the run is over, so the report covers about that many days (``since`` narrows it). Each
target's leases are read through its index in batches, at most ``scan_limit`` of them; a
target with more is reported with ``complete`` false and its figures as a lower bound. For
the trend over longer periods, ``tasklease_legacy_requests_total{target,outcome}`` counts
every request for a legacy target (broker/http/metrics_routes.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from broker.core.authn import Caller
from broker.core.legacy import LegacyTally, LegacyTargetUsage, burn_down_order
from broker.core.model import Target
from broker.core.ports import Clock, LeaseSelector, Ledger
from broker.core.roles import Role
from broker.errors import BadRequestError

SCAN_LIMIT: Final = 100_000
"""The most leases read per legacy target for one report."""
_BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class LegacyReport:
    """The burn-down: every legacy target of the catalog in force, most recently used first
    (unused ones last: candidates to retire)."""

    generated_at: datetime
    since: datetime | None
    ledger_retention: timedelta
    targets: tuple[LegacyTargetUsage, ...]


class LegacyReporter:
    """Builds :class:`LegacyReport` for admins."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        targets: Callable[[], Mapping[str, Target]],
        clock: Clock,
        ledger_retention: timedelta,
        scan_limit: int = SCAN_LIMIT,
    ) -> None:
        self._ledger = ledger
        # The catalog in force when asked (a hot reload may replace it).
        self._targets = targets
        self._clock = clock
        self._retention = ledger_retention
        self._scan_limit = scan_limit

    async def report(self, caller: Caller, *, since: datetime | None = None) -> LegacyReport:
        """Every legacy target's usage in the ledger, issued at or after ``since`` if given."""
        caller.require(Role.ADMIN, "read the legacy report")
        now = self._clock.now()
        if since is not None and since > now:
            raise BadRequestError("since must not be in the future", reason="query.invalid")
        legacy = [t for _, t in sorted(self._targets().items()) if t.legacy]
        usages = [await self._usage(target, now, since) for target in legacy]
        return LegacyReport(
            generated_at=now,
            since=since,
            ledger_retention=self._retention,
            targets=tuple(burn_down_order(usages)),
        )

    async def _usage(
        self, target: Target, now: datetime, since: datetime | None
    ) -> LegacyTargetUsage:
        tally = LegacyTally(target=target, now=now, since=since)
        read = 0
        batches = self._ledger.iter_leases(LeaseSelector(target=target.name), batch=_BATCH)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for lease in batch:
                    if read >= self._scan_limit:
                        return tally.usage(complete=False)
                    read += 1
                    tally.add(lease)
        return tally.usage()
