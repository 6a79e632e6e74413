"""Burn-down of legacy targets: who still uses the standing static secrets.

A target marked ``legacy = true`` in the catalog stands for a standing static secret (a shared
password, an integration key) that tasklease hands out behind a short-lived task token while
it waits to be retired. Retiring one needs to know who still depends on it. A
:class:`LegacyTally` counts the ledger's leases of one such target (every state: the ledger
keeps a run's leases until ``ledger.retention_days`` after the run is over) and summarises:
how many credentials, how many live now, in how many runs, first and last issued, and which
holders (agents) and owners (people) asked, most credentials first.

Pure: the use case (``broker/legacy.py``) reads the leases and feeds them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from broker.core.model import Lease, Target

TOP: Final = 20
"""Holders and owners named per target (the most credentials first); the totals count all."""


@dataclass(frozen=True, slots=True)
class Usage:
    """One holder's or owner's credentials of a target, and the last one's issue time."""

    who: str
    credentials: int
    last_issued_at: datetime


@dataclass(frozen=True, slots=True)
class LegacyTargetUsage:
    """What the ledger shows of one legacy target. ``examined`` leases were read; when the
    read stopped at its bound, ``complete`` is false and the figures are a lower bound."""

    target: Target
    credentials: int
    live: int
    runs: int
    first_issued_at: datetime | None
    last_issued_at: datetime | None
    holders: tuple[Usage, ...]
    holder_count: int
    owners: tuple[Usage, ...]
    owner_count: int
    complete: bool

    @property
    def unused(self) -> bool:
        """No credential of it in the window: a candidate to retire."""
        return self.credentials == 0


@dataclass(slots=True)
class _Counter:
    credentials: int = 0
    last: datetime | None = None

    def add(self, issued_at: datetime) -> None:
        self.credentials += 1
        if self.last is None or issued_at > self.last:
            self.last = issued_at


@dataclass(slots=True)
class LegacyTally:
    """Counts the leases of ``target`` issued at or after ``since`` (all when None); a lease
    is *live* when not confirmed revoked and not expired at ``now``."""

    target: Target
    now: datetime
    since: datetime | None = None
    credentials: int = 0
    live: int = 0
    first: datetime | None = None
    last: datetime | None = None
    _runs: set[str] = field(default_factory=set)
    _holders: dict[str, _Counter] = field(default_factory=dict)
    _owners: dict[str, _Counter] = field(default_factory=dict)

    def add(self, lease: Lease) -> None:
        """Count ``lease`` (one of this target's; others are ignored)."""
        if lease.target != self.target.name:
            return
        if self.since is not None and lease.issued_at < self.since:
            return
        self.credentials += 1
        if lease.is_live and lease.expires_at > self.now:
            self.live += 1
        if self.first is None or lease.issued_at < self.first:
            self.first = lease.issued_at
        if self.last is None or lease.issued_at > self.last:
            self.last = lease.issued_at
        self._runs.add(lease.workflow_id)
        self._holders.setdefault(lease.holder, _Counter()).add(lease.issued_at)
        self._owners.setdefault(lease.owner, _Counter()).add(lease.issued_at)

    def usage(self, *, complete: bool = True, top: int = TOP) -> LegacyTargetUsage:
        """The summary so far; ``complete`` False when the caller stopped reading early."""
        return LegacyTargetUsage(
            target=self.target,
            credentials=self.credentials,
            live=self.live,
            runs=len(self._runs),
            first_issued_at=self.first,
            last_issued_at=self.last,
            holders=_top(self._holders, top),
            holder_count=len(self._holders),
            owners=_top(self._owners, top),
            owner_count=len(self._owners),
            complete=complete,
        )


def _top(counters: dict[str, _Counter], top: int) -> tuple[Usage, ...]:
    """The ``top`` most frequent, most credentials first, then the latest, then by name."""
    ranked = sorted(
        counters.items(),
        key=lambda item: (-item[1].credentials, -(_stamp(item[1].last)), item[0]),
    )
    return tuple(
        Usage(who=who, credentials=counter.credentials, last_issued_at=counter.last)
        for who, counter in ranked[:top]
        if counter.last is not None
    )


def _stamp(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def burn_down_order(usages: list[LegacyTargetUsage]) -> list[LegacyTargetUsage]:
    """Most recently used first (the ones still depended on), unused ones last, by name."""
    return sorted(
        usages,
        key=lambda u: (u.unused, -_stamp(u.last_issued_at), u.target.name),
    )
