"""The re-evaluation marker and the pending re-evaluation records in memory: the fakes the
unit tests use.

``tests/contract/test_reevaluation_markers.py`` and ``tests/contract/test_pending_scopes.py``
run one suite against these classes and their Redis twins in
:mod:`broker.adapters.redis_reevaluation`.
"""

from __future__ import annotations

from collections.abc import Collection

from broker.core.ports import PendingScopeRecord, PendingScopesRead, ReevaluationMarker


class InMemoryReevaluationMarkers:  # satisfies core.ports.ReevaluationMarkers
    """One marker in an attribute; ``writes`` counts the stores (tests look at it)."""

    def __init__(self, marker: ReevaluationMarker | None = None) -> None:
        self.marker = marker
        self.writes = 0

    async def last_reevaluated(self) -> ReevaluationMarker | None:
        """The marker stored last, or None."""
        return self.marker

    async def mark_reevaluated(self, marker: ReevaluationMarker) -> None:
        """Replace the stored marker."""
        self.marker = marker
        self.writes += 1


class InMemoryPendingScopeRecords:  # satisfies core.ports.PendingScopeRecords
    """The pending records in a dictionary, in the order noted. ``corrupt`` holds entries that
    do not parse (id → raw text: tests put them there, as a hand-edited Redis would);
    ``notes`` and ``clears`` count the calls (tests look at them)."""

    def __init__(self) -> None:
        self.records: dict[str, PendingScopeRecord] = {}
        self.corrupt: dict[str, str] = {}
        self.notes = 0
        self.clears = 0

    async def note_pending(self, record: PendingScopeRecord) -> None:
        """Store ``record`` under its id."""
        self.records[record.id] = record
        self.notes += 1

    async def read_pending(self, *, limit: int) -> PendingScopesRead:
        """Up to ``limit`` entries, unreadable ones first."""
        if limit < 1:
            raise ValueError("limit must be positive")
        unreadable = tuple(self.corrupt)[:limit]
        records = tuple(self.records.values())[: limit - len(unreadable)]
        complete = len(unreadable) + len(records) == len(self.corrupt) + len(self.records)
        return PendingScopesRead(records=records, unreadable=unreadable, complete=complete)

    async def clear_pending(self, ids: Collection[str]) -> None:
        """Drop these entries."""
        self.clears += 1
        for entry in ids:
            self.records.pop(entry, None)
            self.corrupt.pop(entry, None)
