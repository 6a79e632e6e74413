"""Measure the Redis ledger: bytes per lease, and one sweep with few and with many leases.

Run: ``.venv/bin/python bench/bench_ledger.py [leases]`` (default 100000; ``make bench``).

Redis: ``TASKLEASE_BENCH_REDIS_URL`` if set (keys go under fresh ``b…`` namespaces and are
deleted afterwards), else a private ``redis-server`` on a free loopback port in a temporary
directory, stopped at the end. The ledger runs with ``durability = "none"`` here: this measures
memory and sweep cost, not fsync latency.

1. Bytes per lease, on the big population (encodings depend on sizes): the MEMORY USAGE of
   every key of the ledger (lease records, id → run hashes, indexes, due index) divided by
   the number of leases, by family, and as a cross-check the growth of ``used_memory`` per
   lease. The leases are realistic: a 3-hop chain of SPIFFE IDs, a 24-character accessor and
   one database lease id, 50 leases per run. Goal: <= 1 KiB.
2. One ``claim_due(limit=100)`` sweep of 100 due leases, among 1 000 and among ``leases``
   active (not yet due) ones. Rounds alternate between the two populations to share drift;
   after each round the claimed items are put back. Goal: many / few <= 1.5.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis.asyncio as aioredis

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    Sensitivity,
    TargetKind,
)
from broker.devstack import ManagedProcess, free_port, wait_until

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SWEEP_AT = NOW + timedelta(minutes=30)
DUE = 100
FEW = 1_000
ROUNDS = 15
GOAL_BYTES = 1024
GOAL_RATIO = 1.5
CONCURRENCY = 200
TRUST_DOMAIN = "spiffe://prod.example.org"


def _lease(number: int, *, due: bool) -> Lease:
    """A realistic lease: a 3-hop chain, a database target, 50 leases per run."""
    run, task = number // 50, number % 5
    holder = f"{TRUST_DOMAIN}/ns/agents/sa/planner-{number % 500:03d}"
    issued = NOW + timedelta(milliseconds=number % 1000)
    return Lease(
        credential_id=f"cred_{uuid.UUID(int=number).hex[8:]}",
        workflow_id=f"wf-2030-01-01-{run:06d}",
        task_id=f"step-{task}",
        target=f"db-orders-{number % 50:02d}",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.CONFIDENTIAL,
        holder=holder,
        owner=f"owner-{number % 200:03d}@example.org",
        chain=DelegationChain(
            (
                DelegationHop("owner", f"owner-{number % 200:03d}@example.org", verified=False),
                DelegationHop("orchestrator", f"{TRUST_DOMAIN}/ns/ci/sa/argo", verified=True),
                DelegationHop("agent", holder, verified=True),
            )
        ),
        issued_at=issued,
        # Due leases expired a minute after issue; the others are due in an hour.
        expires_at=issued + (timedelta(minutes=1) if due else timedelta(hours=1)),
    )


async def _bounded(jobs: Iterable[Awaitable[object]]) -> None:
    batch: list[Awaitable[object]] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == CONCURRENCY:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)


async def _populate(ledger: RedisLedger, first: int, count: int, *, due: bool) -> list[Lease]:
    # Written ahead already carrying Vault references: the record is then as large as an
    # activated one, and populating costs one round trip per lease instead of four.
    leases = [
        dataclasses.replace(
            _lease(n, due=due),
            token_accessor=uuid.uuid4().hex[:24],
            vault_lease_ids=(f"database/creds/orders-ro/{uuid.uuid4().hex[:24]}",),
        )
        for n in range(first, first + count)
    ]
    await _bounded(ledger.write_ahead(lease) for lease in leases)
    return leases


async def _keys(client: aioredis.Redis, namespace: str) -> list[str]:
    return [str(k) async for k in client.scan_iter(match=f"{namespace}:*", count=5000)]


async def _usage(client: aioredis.Redis, keys: list[str]) -> int:
    total = 0
    for start in range(0, len(keys), 500):
        async with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 500]:
                pipe.memory_usage(key, samples=0)
            total += sum(int(u or 0) for u in await pipe.execute())
    return total


async def _bytes_per_lease(
    client: aioredis.Redis, ledger: RedisLedger, count: int, grew: int
) -> None:
    keys = await _keys(client, ledger.namespace)
    families: dict[str, list[str]] = {}
    for key in keys:
        rest = key.split(":", 1)[1]
        if rest.startswith("{wf:") and rest.endswith("}:leases"):
            family = "lease records (run hashes)"
        elif rest.startswith("{wf:"):
            family = "runs and tombstones"
        elif rest.startswith("creds:"):
            family = "id -> run (credential hashes)"
        elif rest.startswith("{due:"):
            family = "due index"
        elif rest.startswith("idx:"):
            family = "index " + rest.split(":")[1]
        else:
            family = "meta"
        families.setdefault(family, []).append(key)
    out = sys.stdout
    out.write(f"\n1. bytes per lease ({count} active leases in Redis)\n")
    total = 0.0
    for family in sorted(families):
        members = families[family]
        per_lease = await _usage(client, members) / count
        total += per_lease
        out.write(f"   {family:<34} {per_lease:8.1f} B/lease  ({len(members)} keys)\n")
    out.write(
        f"   {'total (MEMORY USAGE)':<34} {total:8.1f} B/lease  goal <= {GOAL_BYTES}  "
        f"{'OK' if total <= GOAL_BYTES else 'MISS'}\n"
    )
    out.write(f"   {'used_memory growth':<34} {grew / count:8.1f} B/lease  (cross-check)\n")


async def _sweep_ms(ledger: RedisLedger, due: list[Lease]) -> tuple[float, int]:
    started = time.perf_counter_ns()
    claimed = await ledger.claim_due(SWEEP_AT, limit=DUE, visibility=timedelta(seconds=30))
    elapsed = (time.perf_counter_ns() - started) / 1e6
    # Put the items back where they were for the next round.
    await _bounded(ledger.schedule(lease.credential_id, lease.expires_at) for lease in due)
    return elapsed, len(claimed)


async def _run(url: str, many: int) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    settings = RedisSettings(url=url, durability="none", insecure_allow_degraded_durability=True)
    few_ledger = RedisLedger(settings=settings, namespace=f"b{uuid.uuid4().hex[:12]}")
    many_ledger = RedisLedger(settings=settings, namespace=f"b{uuid.uuid4().hex[:12]}")
    out = sys.stdout
    try:
        server = await client.info("server")
        out.write(
            f"Redis {server['redis_version']}, {settings.due_buckets} due buckets, "
            f"{DUE} due leases per sweep, {ROUNDS} rounds\n"
        )
        started = time.monotonic()
        await _populate(few_ledger, 0, FEW, due=False)
        few_due = await _populate(few_ledger, 10_000_000, DUE, due=True)
        before = int((await client.info("memory"))["used_memory"])
        await _populate(many_ledger, 20_000_000, many, due=False)
        grew = int((await client.info("memory"))["used_memory"]) - before
        many_due = await _populate(many_ledger, 30_000_000, DUE, due=True)
        out.write(
            f"populated {FEW + many + 2 * DUE} leases (write-ahead) in "
            f"{time.monotonic() - started:.1f} s\n"
        )
        await _bytes_per_lease(client, many_ledger, many, grew)

        few_times: list[float] = []
        many_times: list[float] = []
        counts: set[int] = set()
        for ledger, due in ((few_ledger, few_due), (many_ledger, many_due)):
            await _sweep_ms(ledger, due)  # warm-up: scripts loaded, connections open
        for _ in range(ROUNDS):
            elapsed, claimed = await _sweep_ms(few_ledger, few_due)
            few_times.append(elapsed)
            counts.add(claimed)
            elapsed, claimed = await _sweep_ms(many_ledger, many_due)
            many_times.append(elapsed)
            counts.add(claimed)
        few_median, many_median = statistics.median(few_times), statistics.median(many_times)
        ratio = many_median / few_median
        out.write(f"\n2. one claim_due sweep of {DUE} due leases (claimed per sweep: {counts})\n")
        for size, times in ((FEW, few_times), (many, many_times)):
            out.write(
                f"   among {size:>7} active: median {statistics.median(times):6.2f} ms, "
                f"best {min(times):6.2f} ms\n"
            )
        out.write(
            f"   ratio (median/median): {ratio:.2f}x  goal <= {GOAL_RATIO}x  "
            f"{'OK' if ratio <= GOAL_RATIO else 'MISS'}\n"
        )
    finally:
        for ledger in (few_ledger, many_ledger):
            keys = await _keys(client, ledger.namespace)
            for start in range(0, len(keys), 5000):
                await client.unlink(*keys[start : start + 5000])
            await ledger.close()
        await client.aclose()


def _private_redis(directory: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    conf = directory / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f"dir {directory}",
                "appendonly yes",
                "appendfsync everysec",
                "maxmemory-policy noeviction",
                'save ""',
                "daemonize no",
                "",
            ]
        )
    )
    process = ManagedProcess("redis", ["redis-server", str(conf)], directory / "redis.log")
    process.start()

    def answers() -> bool:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    wait_until(answers, what="the benchmark's Redis to answer PING", timeout=20, process=process)
    return process, f"redis://127.0.0.1:{port}/0"


def main(argv: list[str]) -> int:
    """Run the benchmark and print the figures (``make bench`` asserts nothing)."""
    many = int(argv[1]) if len(argv) > 1 else 100_000
    url = os.environ.get("TASKLEASE_BENCH_REDIS_URL", "")
    if url:
        asyncio.run(_run(url, many))
        return 0
    if shutil.which("redis-server") is None:
        sys.stdout.write("redis-server is not installed and TASKLEASE_BENCH_REDIS_URL is unset\n")
        return 1
    directory = Path(tempfile.mkdtemp(prefix="tl-bench-redis-"))
    process, url = _private_redis(directory)
    try:
        asyncio.run(_run(url, many))
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
