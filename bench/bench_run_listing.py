"""Listing runs (``Ledger.list_runs``, what ``GET /v1/workflows`` serves) on a real Redis:
how long a page takes, and that a selective filter reads a bounded stretch per page instead of
every run.

Population: ``--runs`` runs (written with ``appendfsync no`` for speed), one in ``--every``
of them owned by carol, the rest by alice, deadlines a second apart. Measured, each timed over
every page until the end of the listing:

* no filter, 100 a page: the first page, and walking every page;
* ``owner=carol`` (selective: one run in ``--every``), 100 a page: pages needed, runs per
  second read through the index, the longest page;
* a label (``ticket``, on the same runs as carol's) with a state filter.

Bounded by the sizes given; asserts only that every listing found what was written.

    .venv/bin/python bench/bench_run_listing.py [--runs 20000] [--every 100]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from _common import drop_namespace, percentile, with_redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import RunState, WorkflowRun
from broker.core.ports import RunQuery

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ORCHESTRATOR = "spiffe://example.org/ns/ci/sa/argo"


def _run(number: int, every: int) -> WorkflowRun:
    rare = number % every == 0
    return WorkflowRun(
        id=f"wf-{number:07}",
        owner="carol@example.org" if rare else "alice@example.org",
        purpose="listing benchmark",
        started_by=ORCHESTRATOR,
        created_at=T0,
        deadline=T0 + timedelta(hours=1, seconds=number),
        labels={"ticket": "OPS-7"} if rare else {},
    )


async def _walk(ledger: RedisLedger, query: RunQuery) -> tuple[int, list[float], int]:
    """Every page of ``query``: the runs listed, each page's seconds, and the page count."""
    listed, took = 0, []
    while True:
        started = time.perf_counter()
        page = await ledger.list_runs(query)
        took.append(time.perf_counter() - started)
        listed += len(page.runs)
        if page.next is None:
            return listed, took, len(took)
        query = dataclasses.replace(query, after=page.next)


def _report(what: str, runs: int, listed: int, took: list[float], population: int) -> None:
    total = sum(took)
    print(
        f"| {what} | {len(took)} | {listed} | {percentile(took, 0.5) * 1e3:.1f} | "
        f"{max(took) * 1e3:.1f} | {total:.2f} | {population / total:,.0f} |"
    )
    assert listed == runs, f"{what}: listed {listed}, expected {runs}"


async def main(url: str, runs: int, every: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    ledger = RedisLedger(settings=RedisSettings(url=url), namespace="bench-listing")
    try:
        started = time.perf_counter()
        for first in range(0, runs, 500):
            await asyncio.gather(
                *(ledger.create_run(_run(n, every)) for n in range(first, min(first + 500, runs)))
            )
        written = time.perf_counter() - started
        print(f"# {runs} runs written in {written:.1f} s; 1 in {every} is carol's")
        first_page = time.perf_counter()
        page = await ledger.list_runs(RunQuery(limit=100))
        print(f"# the first page alone: {(time.perf_counter() - first_page) * 1e3:.1f} ms")
        assert len(page.runs) == min(100, runs)
        print(
            "| listing | pages | runs listed | page p50 (ms) | longest page (ms) | "
            "all pages (s) | index entries read per second |"
        )
        print("|---|---|---|---|---|---|---|")
        listed, took, _ = await _walk(ledger, RunQuery(limit=100))
        _report("every run, 100 a page", runs, listed, took, runs)
        rare = len(range(0, runs, every))
        listed, took, _ = await _walk(ledger, RunQuery(owner="carol@example.org", limit=100))
        _report("owner=carol, 100 a page", rare, listed, took, runs)
        query = RunQuery(
            labels=(("ticket", "OPS-7"),), states=frozenset({RunState.ACTIVE}), limit=100
        )
        listed, took, _ = await _walk(ledger, query)
        _report("label ticket=OPS-7, state active", rare, listed, took, runs)
    finally:
        await drop_namespace(ledger.client, "bench-listing")
        await ledger.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=100)
    arguments = parser.parse_args()
    sys.exit(with_redis(lambda url: main(url, arguments.runs, arguments.every), appendfsync="no"))
