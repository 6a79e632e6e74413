"""The use cases, written against ``broker.core.ports`` only."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from broker.core.ports import CheckResult, Clock, ReadinessCheck


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    """Every check's result; ready only when all are ok."""

    results: tuple[CheckResult, ...]

    @property
    def ready(self) -> bool:
        """True when every dependency is ready."""
        return all(r.ok for r in self.results)


class Readiness:
    """Asks every dependency, concurrently and each within a time budget."""

    def __init__(
        self, *, checks: Sequence[ReadinessCheck], clock: Clock, timeout_seconds: float
    ) -> None:
        self._checks = tuple(checks)
        self._clock = clock
        self._timeout = timeout_seconds

    async def report(self) -> ReadinessReport:
        """Run all checks; a check that times out or raises counts as not ready."""
        now = self._clock.now()
        results = await asyncio.gather(*(self._run(check, now) for check in self._checks))
        return ReadinessReport(results=tuple(results))

    async def _run(self, check: ReadinessCheck, now: datetime) -> CheckResult:
        try:
            async with asyncio.timeout(self._timeout):
                return await check.check(now)
        except TimeoutError:
            return CheckResult(check.name, ok=False, detail=f"no answer within {self._timeout} s")
        except Exception as exc:  # noqa: BLE001 - a failing probe is "not ready", with why
            detail = getattr(exc, "detail", None) or type(exc).__name__
            return CheckResult(check.name, ok=False, detail=str(detail))
