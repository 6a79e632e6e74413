"""Run retention on a real Redis: how fast runs that are over leave the ledger, and how long
the longest single Redis command of a purge blocks everyone else.

Populations (written with ``appendfsync no`` for speed, then purged with ``appendfsync
always``, as the dev stack and the default durability run it):

* many small runs: ``--runs`` runs of ``--leases`` leases each, revoked, over;
* one large run of ``--large`` leases, purged in pages of ``PURGE_PAGE`` (the ledger's way),
  and the same run purged in one transaction (``PURGE_PAGE`` raised for the measurement):
  what paging buys in the longest blocking command.

Each population is purged as the retention job does it (``runs_over_before``, then
``plan_purge`` and ``purge`` per run), timed end to end, while another process PINGs Redis
back to back: its longest round trip is how long anyone else waited at most (Redis runs a
``MULTI``/``EXEC`` or a script whole, and its fsync follows; on this 2-core machine the
probe shares the CPU, so read it as an upper bound). Bounded by the sizes given; asserts only
that every run went.

    .venv/bin/python bench/bench_retention.py [--runs 200] [--leases 5] [--large 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

import redis
import redis.asyncio as aioredis
import structlog
from _common import with_redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.adapters import redis_ledger
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    DelegationHop,
    Lease,
    LeaseState,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ORCHESTRATOR = "spiffe://example.org/ns/ci/sa/argo"
OWNER = "alice@example.org"
CUTOFF = T0 + timedelta(days=1)


def _run(run_id: str) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        owner=OWNER,
        purpose="retention benchmark",
        started_by=ORCHESTRATOR,
        created_at=T0,
        deadline=T0 + timedelta(hours=1),
    )


def _lease(run_id: str, number: int) -> Lease:
    holder = f"spiffe://example.org/ns/agents/sa/agent-{number % 7}"
    return Lease(
        credential_id=f"cred_{uuid.uuid4().hex[:24]}",
        workflow_id=run_id,
        task_id=f"task-{number}",
        target="db-orders",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.INTERNAL,
        holder=holder,
        owner=OWNER,
        # As the service builds it: the run's chain, extended by the agent.
        chain=_run(run_id).chain.extended(DelegationHop("agent", holder, verified=True)),
        issued_at=T0 + timedelta(minutes=1),
        expires_at=T0 + timedelta(minutes=16),
    )


async def _populate(ledger: RedisLedger, runs: int, leases: int) -> list[str]:
    """``runs`` runs of ``leases`` revoked leases each (as the sweeper leaves them)."""
    ids = [f"wf-{uuid.uuid4().hex[:10]}" for _ in range(runs)]
    gate = asyncio.Semaphore(64)

    async def one(run_id: str, number: int) -> None:
        async with gate:
            lease = _lease(run_id, number)
            await ledger.write_ahead(lease)
            await ledger.save_lease(
                dataclasses.replace(
                    lease,
                    state=LeaseState.REVOKED,
                    revoked_at=T0 + timedelta(minutes=16),
                    revoke_reason="ttl_expired",
                )
            )

    for run_id in ids:
        await ledger.create_run(_run(run_id))
    await asyncio.gather(*(one(run_id, n) for run_id in ids for n in range(leases)))
    return ids


def _probe(url: str, stop: Event, longest: Synchronized[float]) -> None:
    """In a process of its own (so the purger's Python work does not delay it): PING Redis back
    to back until ``stop``, keeping the longest round trip (s)."""
    client = redis.Redis.from_url(url)
    while not stop.is_set():
        sent = time.perf_counter()
        client.ping()
        longest.value = max(longest.value, time.perf_counter() - sent)
    client.close()


async def _purge_all(
    ledger: RedisLedger, admin: aioredis.Redis, url: str, expected: int
) -> tuple[float, int, int, float]:
    """Purge every run over by CUTOFF as the job does, while another process PINGs Redis back
    to back; seconds, runs and leases purged, and the longest PING (ms): how long another
    client waited at most meanwhile (a MULTI/EXEC or a script runs whole)."""
    await admin.config_set("appendfsync", "always")
    purged = leases = 0
    context = multiprocessing.get_context("spawn")
    stop, longest = context.Event(), context.Value("d", 0.0)
    prober = context.Process(target=_probe, args=(url, stop, longest), daemon=True)
    prober.start()
    await asyncio.sleep(1.0)  # the probe is up and pinging
    started = time.perf_counter()
    try:
        while True:
            found = await ledger.runs_over_before(CUTOFF, limit=100)
            if not found:
                break
            for run_id in found:
                plan = await ledger.plan_purge(run_id, cutoff=CUTOFF)
                if plan.ready and await ledger.purge(plan):
                    purged += 1
                    leases += plan.leases
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        prober.join(10)
    await admin.config_set("appendfsync", "no")
    if purged != expected:
        raise SystemExit(f"purged {purged} of {expected} runs")
    return elapsed, purged, leases, longest.value * 1000


async def main(url: str, runs: int, leases: int, large: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    admin = aioredis.Redis.from_url(url)
    await admin.config_set("appendfsync", "no")
    rows: list[str] = []

    async def measure(label: str, count: int, size: int, page: int | None = None) -> None:
        ledger = RedisLedger(settings=RedisSettings(url=url), namespace=f"b{uuid.uuid4().hex[:8]}")
        try:
            await _populate(ledger, count, size)
            saved = redis_ledger.PURGE_PAGE
            if page is not None:
                redis_ledger.PURGE_PAGE = page  # type: ignore[misc]
            try:
                elapsed, purged, gone, longest = await _purge_all(ledger, admin, url, count)
            finally:
                redis_ledger.PURGE_PAGE = saved  # type: ignore[misc]
        finally:
            await ledger.close()
        rows.append(
            f"| {label} | {purged} | {gone} | {elapsed * 1000:.0f} ms | "
            f"{purged / elapsed:.0f} | {gone / elapsed:.0f} | {longest:.1f} ms |"
        )

    await measure(f"{runs} runs of {leases} leases", runs, leases)
    await measure(f"1 run of {large} leases, pages of {redis_ledger.PURGE_PAGE}", 1, large)
    await measure(f"1 run of {large} leases, one transaction", 1, large, page=10**9)
    await admin.aclose()
    print("run retention on a private Redis (appendfsync always while purging)")
    print(
        "| population | runs purged | leases purged | time | runs/s | leases/s | "
        "longest PING of another client |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--leases", type=int, default=5)
    parser.add_argument("--large", type=int, default=5000)
    arguments = parser.parse_args()
    sys.exit(
        with_redis(
            lambda url: main(url, arguments.runs, arguments.leases, arguments.large),
            appendfsync="no",
        )
    )
