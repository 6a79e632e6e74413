"""Ports: the Protocols the use cases are written against. Adapters satisfy them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    """The one source of time. Only ``adapters.clock.SystemClock`` reads the system clock."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One dependency's readiness: ``ok`` and a reason a person can act on (never a secret)."""

    name: str
    ok: bool
    detail: str
    alarm: bool = False


class ReadinessCheck(Protocol):
    """Something /readyz asks: is this dependency able to serve issuance right now?"""

    name: str

    async def check(self, now: datetime) -> CheckResult:
        """Probe the dependency."""
        ...
