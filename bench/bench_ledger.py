"""Measure the Redis ledger: bytes per lease, and the cost of one sweep of a fixed number of
due leases as the number of active leases grows (1 000, 100 000, 1 000 000 by default).

Run: ``.venv/bin/python bench/bench_ledger.py [sizes]`` (``make bench``), e.g. ``1000,20000``
for a quick validation. Knobs (environment): ``TASKLEASE_BENCH_LEDGER_SIZES`` (the same as the
argument), ``TASKLEASE_BENCH_LEDGER_DUE`` (due leases per sweep, 100),
``TASKLEASE_BENCH_LEDGER_ROUNDS`` (25).

Redis: ``TASKLEASE_BENCH_REDIS_URL`` if set (keys go under fresh ``b…`` namespaces and are
deleted afterwards), else a private ``redis-server`` on a free loopback port in a temporary
directory (AOF on, ``everysec``, automatic AOF rewrites off so no fork lands in a
measurement), stopped and removed at the end. The ledger runs with ``durability = "none"``:
this measures memory and sweep cost, not fsync latency.

1. Filling. Every population is written in pipelines of a few thousand leases that write
   what ``RedisLedger.write_ahead`` writes, grouped into one multi-member command per key
   (checked at start: leases written both ways must leave identical keys), so a million
   leases take about a minute instead of many, and the benchmark holds one batch of leases
   in memory at a time, never a population.
   The leases are realistic: a 3-hop chain of SPIFFE IDs, a 24-character accessor and one
   database lease id, 50 leases per run.
2. Bytes per lease, per population: MEMORY USAGE of every key of its namespace (lease records,
   id → run hashes, indexes, due index, the holders' live counts) over its leases, and the
   growth of ``used_memory`` while it was filled. Goal: <= 1 KiB.
3. Sweep cost, in rounds that alternate between the populations (so drift is shared), of
   ``DUE`` due leases among the active (not yet due) ones:
   * ``claim_due(limit=DUE)``: the ledger's claim alone (its Lua scripts, one pipeline per
     round); the claimed items are put back afterwards;
   * ``Revoker.revoke_due``: a whole sweep as the broker runs it (claim in chunks of 16,
     read, mark, confirm, record, acknowledge each lease) against an OpenBao stand-in that
     confirms at once, so what is timed is the ledger's share; the leases are restored
     afterwards. OpenBao's share is per due lease and does not depend on the active count
     (see bench_revocation.py and bench_forced_revocation.py for it).
   Goal: from the smallest to the largest population, per-sweep cost grows <= 1.5x.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
import structlog
from _common import drop_namespace, with_redis

from broker.adapters.redis_ledger import (
    _LIVE_SET_GRACE_MS,
    RedisLedger,
    _encode_lease,
    _Keys,
    _live_minute,
)
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Sensitivity,
    TargetKind,
    epoch_micros,
)
from broker.core.ports import MintedCredential, MintSpec, RevokeOutcome
from broker.revocation import RevocationSettings, Revoker

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SWEEP_AT = NOW + timedelta(minutes=30)
DEFAULT_SIZES = "1000,100000,1000000"
DUE = int(os.environ.get("TASKLEASE_BENCH_LEDGER_DUE", "100"))
ROUNDS = int(os.environ.get("TASKLEASE_BENCH_LEDGER_ROUNDS", "25"))
FILL_BATCH = 5_000
GOAL_BYTES = 1024
GOAL_RATIO = 1.5
TRUST_DOMAIN = "spiffe://prod.example.org"


def _lease(number: int, *, due: bool) -> Lease:
    """A realistic, activated lease: a 3-hop chain, a database target, 50 leases per run."""
    run, task = number // 50, number % 5
    holder = f"{TRUST_DOMAIN}/ns/agents/sa/planner-{number % 500:03d}"
    issued = NOW + timedelta(milliseconds=number % 1000)
    noise = uuid.UUID(int=number * 7919 + 17).hex
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
        token_accessor=noise[-24:],
        vault_lease_ids=(f"database/creds/orders-ro/{noise[:24]}",),
        state=LeaseState.ACTIVE,
    )


# --------------------------------------------------------------------------- filling


async def _write(client: aioredis.Redis, keys: _Keys, leases: Sequence[Lease]) -> None:
    """What ``RedisLedger.write_ahead`` writes for each lease, in one pipeline, grouped by key:
    one multi-member command per key instead of nine commands per lease. The end state is
    the same (checked by :func:`_check_fill_matches_write_ahead`); it also restores leases
    after a measured sweep (the record is overwritten, any claim dropped, the due entry put
    back)."""
    # Field maps typed loosely: redis-py's mapping parameter is invariant in its key type.
    creds: dict[str, dict[Any, str]] = defaultdict(dict)
    records: dict[str, dict[Any, str]] = defaultdict(dict)
    members: dict[str, list[str]] = defaultdict(list)  # holder, owner and target sets
    holders: dict[str, int] = {}
    due: dict[str, dict[str, int]] = defaultdict(dict)
    claims: dict[tuple[str, str], list[str]] = defaultdict(list)
    live: dict[str, dict[int, int]] = defaultdict(dict)  # the holders' live counts
    forget_at: dict[str, int] = {}
    for lease in leases:
        cid, wid = lease.credential_id, lease.workflow_id
        bucket = keys.bucket(cid)
        due_key, in_flight, claimed = keys.due(bucket)
        creds[keys.creds(bucket)][cid] = wid
        records[keys.leases(wid)][cid] = _encode_lease(lease)
        members[keys.holder(lease.holder)].append(cid)
        members[keys.owner(lease.owner)].append(cid)
        members[keys.target(lease.target)].append(cid)
        holders[lease.holder] = 0
        claims[(in_flight, claimed)].append(cid)
        due[due_key][cid] = epoch_micros(lease.expires_at)
        live_key = keys.live(lease.holder)
        minute = _live_minute(lease)
        live[live_key][minute] = live[live_key].get(minute, 0) + 1
        gc_ms = epoch_micros(lease.expires_at) // 1000 + _LIVE_SET_GRACE_MS
        forget_at[live_key] = max(forget_at.get(live_key, 0), gc_ms)
    async with client.pipeline(transaction=False) as pipe:
        for key, mapping in (*creds.items(), *records.items()):
            pipe.hset(key, mapping=mapping)
        for key, ids in members.items():
            pipe.sadd(key, *ids)
        pipe.zadd(keys.holders, holders)
        for (in_flight, claimed), ids in claims.items():
            pipe.zrem(in_flight, *ids)
            pipe.hdel(claimed, *ids)
        for key, scores in due.items():
            pipe.zadd(key, scores)
        for key, counts in live.items():
            for minute, count in counts.items():
                pipe.hincrby(key, str(minute), count)
            pipe.pexpireat(key, forget_at[key], nx=True)
            pipe.pexpireat(key, forget_at[key], gt=True)
        await pipe.execute()


def _batches(first: int, count: int, *, due: bool) -> Iterator[list[Lease]]:
    for start in range(first, first + count, FILL_BATCH):
        yield [_lease(n, due=due) for n in range(start, min(start + FILL_BATCH, first + count))]


async def _fill(client: aioredis.Redis, ledger: RedisLedger, first: int, count: int) -> None:
    """``count`` active leases, two pipelines in flight (one being built, one executing)."""
    keys = ledger._keys
    pending: asyncio.Task[None] | None = None
    for batch in _batches(first, count, due=False):
        if pending is not None:
            await pending
        pending = asyncio.create_task(_write(client, keys, batch))
    if pending is not None:
        await pending


async def _check_fill_matches_write_ahead(client: aioredis.Redis, url: str) -> None:
    """One lease through ``write_ahead`` and one through the pipelined fill must leave the
    same keys with the same contents (namespaces aside): otherwise this benchmark would
    measure another layout than the broker's."""
    settings = RedisSettings(url=url, durability="none", insecure_allow_degraded_durability=True)
    # write_ahead takes issuing leases only; the layout is the same for any state. 120
    # leases: several share a run, a holder, an owner, a target and a due bucket.
    leases = [
        dataclasses.replace(_lease(n, due=n % 2 == 0), state=LeaseState.ISSUING) for n in range(120)
    ]
    dumps = []
    for use_ledger in (True, False):
        ledger = RedisLedger(settings=settings, namespace=f"b{uuid.uuid4().hex[:12]}")
        try:
            if use_ledger:
                for lease in leases:
                    await ledger.write_ahead(lease)
            else:
                await ledger._ensure_layout()
                await _write(client, ledger._keys, leases)
            dumps.append(await _dump(client, ledger.namespace))
        finally:
            await drop_namespace(client, ledger.namespace)
            await ledger.close()
    if dumps[0] != dumps[1]:
        raise SystemExit(f"the pipelined fill differs from write_ahead:\n{dumps[0]}\n{dumps[1]}")


async def _dump(client: aioredis.Redis, namespace: str) -> dict[str, object]:
    found: dict[str, object] = {}
    for key in await _keys(client, namespace):
        kind = await client.type(key)
        name = key[len(namespace) :]
        if kind == "hash":
            found[name] = await client.hgetall(key)
        elif kind == "set":
            found[name] = sorted(await client.smembers(key))
        elif kind == "zset":
            found[name] = await client.zrange(key, 0, -1, withscores=True)
        else:
            found[name] = await client.get(key)
    return found


# --------------------------------------------------------------------------- memory


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


def _family(key: str) -> str:
    rest = key.split(":", 1)[1]
    if rest.startswith("{wf:"):
        return "lease records (run hashes)"
    if rest.startswith("creds:"):
        return "id -> run (credential hashes)"
    if rest.startswith("{due:"):
        return "due index"
    if rest.startswith("idx:"):
        return "index " + rest.split(":")[1]
    if rest.startswith("live:"):
        return "live counts (limits)"
    return "meta"


async def _bytes_per_lease(
    client: aioredis.Redis, namespace: str, count: int
) -> tuple[float, dict[str, float]]:
    families: dict[str, list[str]] = {}
    for key in await _keys(client, namespace):
        families.setdefault(_family(key), []).append(key)
    per_family = {name: await _usage(client, keys) / count for name, keys in families.items()}
    return sum(per_family.values()), per_family


async def _used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


# --------------------------------------------------------------------------- sweeps


class ConfirmingMinter:
    """OpenBao's stand-in for the sweep measurement: every revocation is confirmed at once."""

    async def mint(self, spec: MintSpec) -> MintedCredential:
        raise AssertionError("the sweep never mints")

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        return RevokeOutcome(confirmed=True)


class FrozenClock:
    def now(self) -> datetime:
        return SWEEP_AT


@dataclasses.dataclass
class Population:
    active: int
    ledger: RedisLedger
    due: list[Lease]
    revoker: Revoker
    fill_seconds: float = 0.0
    grew: int = 0
    claim_ms: list[float] = dataclasses.field(default_factory=list)
    sweep_ms: list[float] = dataclasses.field(default_factory=list)


async def _restore_due(client: aioredis.Redis, population: Population) -> None:
    await _write(client, population.ledger._keys, population.due)


async def _measure_round(client: aioredis.Redis, population: Population) -> None:
    started = time.perf_counter_ns()
    claimed = await population.ledger.claim_due(
        SWEEP_AT, limit=DUE, visibility=timedelta(seconds=30)
    )
    population.claim_ms.append((time.perf_counter_ns() - started) / 1e6)
    if len(claimed) != DUE:
        raise SystemExit(f"claimed {len(claimed)} of {DUE} due leases")
    await _restore_due(client, population)

    started = time.perf_counter_ns()
    report = await population.revoker.revoke_due(SWEEP_AT)
    population.sweep_ms.append((time.perf_counter_ns() - started) / 1e6)
    if len(report.revoked) != DUE:
        raise SystemExit(f"a sweep revoked {len(report.revoked)} of {DUE} due leases")
    await _restore_due(client, population)


async def _run(url: str, sizes: list[int]) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    settings = RedisSettings(url=url, durability="none", insecure_allow_degraded_durability=True)
    out = sys.stdout
    populations: list[Population] = []
    try:
        server = await client.info("server")
        out.write(
            f"Redis {server['redis_version']}, {settings.due_buckets} due buckets, {DUE} due "
            f"leases per sweep, {ROUNDS} rounds, populations {sizes}\n"
        )
        await _check_fill_matches_write_ahead(client, url)
        out.write("pipelined fill == write_ahead (keys and contents): checked\n")
        for index, size in enumerate(sizes):
            ledger = RedisLedger(settings=settings, namespace=f"b{uuid.uuid4().hex[:12]}")
            await ledger._ensure_layout()
            revoker = Revoker(
                ledger=ledger,
                minter=ConfirmingMinter(),
                clock=FrozenClock(),
                settings=RevocationSettings(sweep_batch=DUE, concurrency=16),
            )
            base = (index + 1) * 100_000_000
            population = Population(size, ledger, [], revoker)
            populations.append(population)
            before = await _used_memory(client)
            started = time.perf_counter()
            await _fill(client, ledger, base, size)
            population.fill_seconds = time.perf_counter() - started
            population.grew = await _used_memory(client) - before
            population.due = [_lease(base + size + n, due=True) for n in range(DUE)]
            await _restore_due(client, population)
            out.write(
                f"filled {size:>9,} active leases in {population.fill_seconds:6.1f} s "
                f"({size / population.fill_seconds:,.0f}/s)\n"
            )
            out.flush()

        out.write("\n1. bytes per lease (goal <= 1 KiB)\n")
        out.write("| active leases | MEMORY USAGE B/lease | used_memory growth B/lease |\n")
        out.write("|---|---|---|\n")
        details: dict[str, float] = {}
        for population in populations:
            total, per_family = await _bytes_per_lease(
                client, population.ledger.namespace, population.active + DUE
            )
            details = per_family
            out.write(
                f"| {population.active:,} | {total:.0f} | "
                f"{population.grew / population.active:.0f} |\n"
            )
        out.write(f"   by family, largest population ({populations[-1].active:,}):\n")
        for name in sorted(details):
            out.write(f"   {name:<34} {details[name]:7.1f} B/lease\n")

        for population in populations:  # warm-up: scripts loaded, connections open
            await _measure_round(client, population)
            population.claim_ms.clear()
            population.sweep_ms.clear()
        for _ in range(ROUNDS):
            for population in populations:
                await _measure_round(client, population)
        first = populations[0]
        base_claim = statistics.median(first.claim_ms)
        base_sweep = statistics.median(first.sweep_ms)
        out.write(f"\n2. one sweep of {DUE} due leases among N active (median of {ROUNDS})\n")
        out.write(
            "| active leases | claim_due p50 ms | claim_due best ms | x vs smallest | "
            "revoke_due p50 ms | revoke_due best ms | x vs smallest |\n"
        )
        out.write("|---|---|---|---|---|---|---|\n")
        for population in populations:
            claim = statistics.median(population.claim_ms)
            sweep = statistics.median(population.sweep_ms)
            out.write(
                f"| {population.active:,} | {claim:.2f} | {min(population.claim_ms):.2f} | "
                f"{claim / base_claim:.2f} | {sweep:.1f} | {min(population.sweep_ms):.1f} | "
                f"{sweep / base_sweep:.2f} |\n"
            )
        last = populations[-1]
        ratio = statistics.median(last.sweep_ms) / base_sweep
        best = min(last.sweep_ms) / min(first.sweep_ms)
        out.write(
            f"\n   revoke_due {first.active:,} -> {last.active:,} active: {ratio:.2f}x by "
            f"median, {best:.2f}x by best  goal <= {GOAL_RATIO}x  "
            f"{'OK' if ratio <= GOAL_RATIO else 'MISS'}\n"
        )
    finally:
        for population in populations:
            await drop_namespace(client, population.ledger.namespace)
            await population.ledger.close()
        await client.aclose()


def main(argv: list[str]) -> int:
    """Run the benchmark and print the figures (``make bench`` asserts nothing)."""
    raw = argv[1] if len(argv) > 1 else os.environ.get("TASKLEASE_BENCH_LEDGER_SIZES", "")
    sizes = [int(s) for s in (raw or DEFAULT_SIZES).split(",")]
    # The sweep logs a line per revoked lease at info; this measures the ledger, not logging.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return with_redis(lambda url: _run(url, sizes), appendfsync="everysec")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
