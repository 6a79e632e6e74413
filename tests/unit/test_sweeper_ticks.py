"""The sweeper's interval job when a sweep outlasts the interval: ticks are folded, one sweep
runs at a time, and APScheduler's per-tick "skipped" warning does not flood the log."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from broker.adapters.scheduler import RevocationSweeper


class SystemTime:
    def now(self) -> datetime:
        return datetime.now(UTC)


async def test_ticks_during_a_long_sweep_are_folded_without_a_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = 0
    overlapped = False

    async def slow_sweep(now: datetime) -> None:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        await asyncio.sleep(0.3)
        running -= 1

    sweeper = RevocationSweeper(
        sweep=slow_sweep, clock=SystemTime(), interval=timedelta(milliseconds=20)
    )
    with caplog.at_level(logging.INFO, logger="apscheduler"):
        sweeper.start()
        await asyncio.sleep(0.75)
        await sweeper.stop()
    assert not overlapped
    assert 1 <= sweeper.sweeps <= 3
    skipped = [r for r in caplog.records if "maximum number of running" in r.getMessage()]
    assert skipped == []
