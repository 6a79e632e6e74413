"""The one adapter that reads the system clock."""

from __future__ import annotations

from datetime import UTC, datetime


class SystemClock:  # satisfies core.ports.Clock
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        return datetime.now(UTC)
