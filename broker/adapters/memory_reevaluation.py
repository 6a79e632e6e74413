"""The re-evaluation marker in memory: the fake the unit tests use.

``tests/contract/test_reevaluation_markers.py`` runs one suite against this class and
:class:`broker.adapters.redis_reevaluation.RedisReevaluationMarkers`.
"""

from __future__ import annotations

from broker.core.ports import ReevaluationMarker


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
