"""The broker's own CPU spent in the Redis ledger per credential issuance (issue #4: the
broker's CPU per issuance must stay under 1 ms; the ledger is one part of it).

One issuance makes the ledger calls ``CredentialBroker.request_credential`` makes, in order:
``get_run`` and ``quarantines`` (concurrently, as the service does), ``write_ahead`` with the
request's idempotency binding (one script since the binding moved into it; a ``--baseline``
ledger from before that makes its ``remember_idempotency`` call and then ``write_ahead``, timed
as one step), ``activate(written=...)`` — against a real Redis with the default durability
(``fsync``: on Redis 7.0 every write is fsynced before it is answered and every activation
carries the ``CONFIG GET`` barrier).

Figures, per round and implementation (rounds alternate between implementations so that the
drift of a shared machine is shared too):

* sequential (one issuance at a time): CPU of this process (``time.process_time``) per call
  and per issuance, in µs, and the wall-time median per call;
* concurrent (``--concurrency`` issuances in flight): CPU per issuance and the wall median of
  one issuance, which includes waiting for a pooled connection and for the fsync.

The table shows the median over rounds. The CPU is the client side only (Redis is another
process), measured in-process, so Vault, HTTP and audit are not in it.

Run: ``.venv/bin/python bench/bench_ledger_cpu.py`` (bounded: 5 rounds of 400 issuances by
default, about a minute). Options: ``--issuances``, ``--rounds``, ``--concurrency``, and
``--baseline PATH``: also measure the ``RedisLedger`` of another copy of
``broker/adapters/redis_ledger.py`` (e.g. ``git show HEAD:broker/adapters/redis_ledger.py >
/tmp/old_ledger.py``), interleaved with the current one, for a before/after comparison.

Redis: ``TASKLEASE_BENCH_REDIS_URL`` if set (keys go under fresh ``p…`` namespaces and are
deleted afterwards), else a private ``redis-server`` on a free loopback port in a temporary
directory, configured as the stack's (``appendonly yes``, ``appendfsync always``,
``noeviction``, a password; automatic AOF rewrites off so no fork lands in a measurement),
stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import secrets
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from _common import drop_namespace, with_redis

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    Quarantine,
    QuarantineKind,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)
from broker.core.ports import IdempotencyBinding

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TRUST_DOMAIN = "spiffe://prod.example.org"
ORCHESTRATOR = f"{TRUST_DOMAIN}/ns/ci/sa/argo"
OWNER = "alice@example.org"
OPERATIONS = ("get_run+quarantines", "write_ahead+idempotency", "activate")
IDEMPOTENCY_TTL = timedelta(hours=24)


class LedgerUnderTest(Protocol):
    """The calls of one issuance (both the current and a baseline ``RedisLedger``)."""

    @property
    def namespace(self) -> str: ...
    async def create_run(self, run: WorkflowRun) -> bool: ...
    async def get_run(self, workflow_id: str) -> WorkflowRun | None: ...
    async def set_quarantine(self, quarantine: Quarantine) -> None: ...
    async def quarantines(self, now: datetime) -> list[Quarantine]: ...
    async def write_ahead(
        self, lease: Lease, *, idempotency: IdempotencyBinding | None = None
    ) -> str | None: ...
    async def activate(
        self,
        credential_id: str,
        *,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        written: Lease | None = None,
    ) -> Lease: ...
    async def close(self) -> None: ...


Factory = Callable[[RedisSettings, str], LedgerUnderTest]


@dataclass
class Figures:
    """One implementation's measurements, one entry per round."""

    cpu_us: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    wall_p50_us: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    issuance_cpu_us: list[float] = field(default_factory=list)
    concurrent_cpu_us: list[float] = field(default_factory=list)
    concurrent_p50_ms: list[float] = field(default_factory=list)


async def _write_ahead(
    ledger: LedgerUnderTest, lease: Lease, binding: IdempotencyBinding
) -> str | None:
    """The write-ahead with its idempotency binding: one call, or the two calls of a baseline
    ledger that still binds the key in a command of its own."""
    remember = getattr(ledger, "remember_idempotency", None)
    if remember is None:
        return await ledger.write_ahead(lease, idempotency=binding)
    bound = await remember(binding.key, binding.fingerprint, lease.credential_id, ttl=binding.ttl)
    if bound is not None:
        return str(bound)
    await ledger.write_ahead(lease)
    return None


def _lease(number: int, workflow_id: str) -> Lease:
    """A realistic issuing lease: a 3-hop chain of SPIFFE IDs, a database target."""
    holder = f"{TRUST_DOMAIN}/ns/agents/sa/planner-{number % 16:02d}"
    return Lease(
        credential_id=f"cred_{secrets.token_hex(12)}",
        workflow_id=workflow_id,
        task_id=f"step-{number % 5}",
        target="db-orders",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.CONFIDENTIAL,
        holder=holder,
        owner=OWNER,
        chain=DelegationChain(
            (
                DelegationHop("owner", OWNER, verified=False),
                DelegationHop("orchestrator", ORCHESTRATOR, verified=True),
                DelegationHop("agent", holder, verified=True),
            )
        ),
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=15),
        tool="psql",
        justification="nightly reconciliation, TICKET-42",
    )


async def _prepare(ledger: LedgerUnderTest) -> str:
    """A run to issue in, and two quarantines that block none of its leases (a realistic
    handful to read and decode per issuance)."""
    workflow_id = f"wf-{uuid.uuid4().hex[:12]}"
    await ledger.create_run(
        WorkflowRun(
            id=workflow_id,
            owner=OWNER,
            purpose="nightly reconciliation, TICKET-42",
            started_by=ORCHESTRATOR,
            created_at=NOW,
            deadline=NOW + timedelta(hours=2),
        )
    )
    for kind, value in (
        (QuarantineKind.IDENTITY, f"{TRUST_DOMAIN}/ns/agents/sa/rogue"),
        (QuarantineKind.TARGET, "db-legacy"),
    ):
        await ledger.set_quarantine(
            Quarantine(
                kind=kind,
                value=value,
                reason="incident INC-7",
                created_by="security@example.org",
                created_at=NOW,
                expires_at=NOW + timedelta(days=1),
            )
        )
    return workflow_id


async def _issue(
    ledger: LedgerUnderTest, workflow_id: str, number: int, timed: dict[str, tuple[float, float]]
) -> None:
    """One issuance's ledger calls; ``timed`` receives (CPU s, wall s) per call."""
    lease = _lease(number, workflow_id)

    async def step(name: str, call: Awaitable[object]) -> object:
        cpu, wall = time.process_time(), time.perf_counter()
        result = await call
        timed[name] = (time.process_time() - cpu, time.perf_counter() - wall)
        return result

    both = await step(
        OPERATIONS[0], asyncio.gather(ledger.get_run(workflow_id), ledger.quarantines(NOW))
    )
    assert isinstance(both, list)
    assert both[0] is not None
    binding = IdempotencyBinding(f"{lease.holder}|{lease.credential_id}", "f" * 64, IDEMPOTENCY_TTL)
    bound = await step(OPERATIONS[1], _write_ahead(ledger, lease, binding))
    assert bound is None
    await step(
        OPERATIONS[2],
        ledger.activate(
            lease.credential_id,
            token_accessor=secrets.token_hex(12),
            vault_lease_ids=(f"database/creds/orders-ro/{secrets.token_hex(12)}",),
            written=lease,
        ),
    )


async def _sequential(
    ledger: LedgerUnderTest, workflow_id: str, issuances: int, figures: Figures
) -> None:
    samples: dict[str, list[tuple[float, float]]] = defaultdict(list)
    gc.collect()
    started = time.process_time()
    for number in range(issuances):
        timed: dict[str, tuple[float, float]] = {}
        await _issue(ledger, workflow_id, number, timed)
        for name, pair in timed.items():
            samples[name].append(pair)
    figures.issuance_cpu_us.append((time.process_time() - started) / issuances * 1e6)
    for name in OPERATIONS:
        figures.cpu_us[name].append(statistics.fmean(c for c, _ in samples[name]) * 1e6)
        figures.wall_p50_us[name].append(statistics.median(w for _, w in samples[name]) * 1e6)


async def _concurrent(
    ledger: LedgerUnderTest, workflow_id: str, issuances: int, concurrency: int, figures: Figures
) -> None:
    walls: list[float] = []
    numbers = iter(range(issuances))

    async def client() -> None:
        for number in numbers:
            started = time.perf_counter()
            await _issue(ledger, workflow_id, number, {})
            walls.append(time.perf_counter() - started)

    gc.collect()
    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    figures.concurrent_cpu_us.append((time.process_time() - started) / issuances * 1e6)
    figures.concurrent_p50_ms.append(statistics.median(walls) * 1e3)


def _current(settings: RedisSettings, namespace: str) -> LedgerUnderTest:
    return RedisLedger(settings=settings, namespace=namespace)


def _baseline(path: Path) -> Factory:
    spec = importlib.util.spec_from_file_location("tasklease_baseline_redis_ledger", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    ledger_class: Any = module.RedisLedger

    def make(settings: RedisSettings, namespace: str) -> LedgerUnderTest:
        ledger: LedgerUnderTest = ledger_class(settings=settings, namespace=namespace)
        return ledger

    return make


async def _run(url: str, args: argparse.Namespace) -> None:
    factories: dict[str, Factory] = {"current": _current}
    if args.baseline is not None:
        factories = {"baseline": _baseline(args.baseline), **factories}
    settings = RedisSettings(url=url)
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    ledgers = {
        name: make(settings, f"p{uuid.uuid4().hex[:12]}") for name, make in factories.items()
    }
    try:
        runs = {name: await _prepare(ledger) for name, ledger in ledgers.items()}
        # Warm up: every connection the concurrent mode uses opened (two per client: the run
        # and the quarantines are read at the same time), scripts loaded, layout and WAITAOF
        # probed.
        for name, ledger in ledgers.items():
            await _sequential(ledger, runs[name], 20, Figures())
            await _concurrent(
                ledger, runs[name], 20 * args.concurrency, args.concurrency, Figures()
            )
        figures = {name: Figures() for name in ledgers}
        for round_number in range(args.rounds):
            for name, ledger in ledgers.items():
                await _sequential(ledger, runs[name], args.issuances, figures[name])
                await _concurrent(
                    ledger, runs[name], args.issuances, args.concurrency, figures[name]
                )
            sys.stdout.write(f"round {round_number + 1}/{args.rounds} done\n")
            sys.stdout.flush()
        _report(figures, args)
    finally:
        for ledger in ledgers.values():
            await drop_namespace(admin, ledger.namespace)
            await ledger.close()
        await admin.aclose()


def _report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    median = statistics.median
    out = sys.stdout.write
    out(
        f"\nledger client CPU, {args.rounds} rounds x {args.issuances} issuances per mode, "
        "medians over rounds (Redis appendfsync always)\n"
    )
    header = "".join(f"{name + ' CPU µs':>18}{name + ' wall p50 µs':>24}" for name in figures)
    out(f"{'sequential, per call':<26}{header}\n")
    for op in OPERATIONS:
        cells = "".join(
            f"{median(data.cpu_us[op]):>18.0f}{median(data.wall_p50_us[op]):>24.0f}"
            for data in figures.values()
        )
        out(f"{op:<26}{cells}\n")
    cells = "".join(f"{median(data.issuance_cpu_us):>18.0f}{'':>24}" for data in figures.values())
    out(f"{'one issuance':<26}{cells}\n")
    out(f"\nconcurrent ({args.concurrency} in flight), per issuance\n")
    for name, data in figures.items():
        out(
            f"{name:<26}CPU {median(data.concurrent_cpu_us):.0f} µs, "
            f"wall p50 {median(data.concurrent_p50_ms):.2f} ms\n"
        )
    if "baseline" in figures:
        before, after = figures["baseline"], figures["current"]
        sequential = median(after.issuance_cpu_us) / median(before.issuance_cpu_us)
        concurrent = median(after.concurrent_cpu_us) / median(before.concurrent_cpu_us)
        out(
            f"\ncurrent / baseline CPU per issuance: sequential {sequential:.2f}, "
            f"concurrent {concurrent:.2f}\n"
        )


def main(argv: list[str]) -> int:
    """Run the benchmark and print the figures (nothing is asserted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--issuances", type=int, default=400, help="issuances per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="another redis_ledger.py to compare with")
    args = parser.parse_args(argv[1:])
    if min(args.issuances, args.rounds, args.concurrency) < 1:
        parser.error("--issuances, --rounds and --concurrency must be positive")
    # The ledger logs nothing per call at info; keep warnings visible.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return with_redis(lambda url: _run(url, args), appendfsync="always")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
