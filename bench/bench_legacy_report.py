"""The legacy burn-down report (``LegacyReporter.report``, what ``GET /v1/reports/legacy``
serves) on a real Redis: how long it takes to read a legacy target's leases through the
target index and summarise them, up to the per-report bound (``broker.legacy.SCAN_LIMIT``).

Population: ``--leases`` leases of one legacy target (written with ``appendfsync no`` for
speed) in runs of 50, held by 20 agents for 5 owners, and the same number of another, not
legacy, target (which the report must not read). Measured: the report, ``--rounds`` times
(wall time and this process's CPU), and leases read per second. Then the same population
with the bound below it, to show the cut (``complete: false``).

Bounded by the sizes given; asserts only that the report counted what was written.

    .venv/bin/python bench/bench_legacy_report.py [--leases 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from _common import drop_namespace, with_redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Sensitivity,
    Target,
    TargetKind,
    WorkflowRun,
)
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.legacy import LegacyReporter

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ORCHESTRATOR = "spiffe://example.org/ns/ci/sa/argo"
PER_RUN = 50
ADMIN = Caller(
    WorkloadIdentity(
        SpiffeId.parse("spiffe://example.org/admin"), T0 + timedelta(days=1), AuthMethod.X509_SVID
    ),
    frozenset({Role.ADMIN}),
)


def _target(name: str, *, legacy: bool) -> Target:
    return Target(
        name=name,
        kind=TargetKind.VAULT_TOKEN,
        policies=(f"target-{name}",),
        system="crm",
        environment="prod",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=15),
        legacy=legacy,
    )


CATALOG = {
    "legacy-crm": _target("legacy-crm", legacy=True),
    "crm-api": _target("crm-api", legacy=False),
}


def _run(number: int) -> WorkflowRun:
    return WorkflowRun(
        id=f"wf-{number:06}",
        owner=f"owner{number % 5}@example.org",
        purpose="legacy report benchmark",
        started_by=ORCHESTRATOR,
        created_at=T0,
        deadline=T0 + timedelta(days=30),
    )


def _lease(run: WorkflowRun, number: int, target: str) -> Lease:
    holder = f"spiffe://example.org/agent/{number % 20}"
    return Lease(
        credential_id=f"cred_{target[:3]}{number:09}",
        workflow_id=run.id,
        task_id=f"t{number}",
        target=target,
        kind=TargetKind.VAULT_TOKEN,
        sensitivity=Sensitivity.INTERNAL,
        holder=holder,
        owner=run.owner,
        chain=DelegationChain(
            (
                DelegationHop("owner", run.owner, verified=False),
                DelegationHop("orchestrator", ORCHESTRATOR, verified=True),
                DelegationHop("agent", holder, verified=True),
            )
        ),
        issued_at=T0 + timedelta(seconds=number),
        expires_at=T0 + timedelta(seconds=number, minutes=5),
        state=LeaseState.ISSUING,
    )


class _Clock:
    """The report's now: after every lease expired (none live)."""

    def now(self) -> datetime:
        return T0 + timedelta(days=31)


async def _populate(ledger: RedisLedger, leases: int) -> float:
    started = time.perf_counter()
    for first in range(0, leases, PER_RUN * 10):
        runs = [
            _run(n // PER_RUN) for n in range(first, min(first + PER_RUN * 10, leases), PER_RUN)
        ]
        await asyncio.gather(*(ledger.create_run(run) for run in runs))
        writes = [
            ledger.write_ahead(_lease(_run(n // PER_RUN), n, target))
            for n in range(first, min(first + PER_RUN * 10, leases))
            for target in ("legacy-crm", "crm-api")
        ]
        await asyncio.gather(*writes)
    return time.perf_counter() - started


async def main(url: str, leases: int, rounds: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    ledger = RedisLedger(settings=RedisSettings(url=url), namespace="bench-legacy")
    try:
        written = await _populate(ledger, leases)
        print(
            f"# {leases} leases of legacy-crm and {leases} of crm-api (not legacy) written in "
            f"{written:.1f} s; {leases // PER_RUN} runs, 20 holders, 5 owners"
        )
        print("| report | read bound | leases counted | complete | wall (s) | CPU (s) | leases/s |")
        print("|---|---|---|---|---|---|---|")
        for bound in (max(leases, 1), max(leases // 2, 1)):
            reporter = LegacyReporter(
                ledger=ledger,
                targets=lambda: CATALOG,
                clock=_Clock(),
                ledger_retention=timedelta(days=30),
                scan_limit=bound,
            )
            walls, cpus = [], []
            for _ in range(rounds):
                cpu, wall = time.process_time(), time.perf_counter()
                report = await reporter.report(ADMIN)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            [usage] = report.targets
            assert usage.credentials == min(leases, bound), usage.credentials
            assert usage.complete == (bound >= leases)
            if usage.complete:  # a cut reads whichever runs come first
                assert (usage.holder_count, usage.owner_count) == (20, 5)
            wall = statistics.median(walls)
            print(
                f"| {'all' if bound >= leases else 'cut'} | {bound} | {usage.credentials} | "
                f"{usage.complete} | {wall:.2f} | {statistics.median(cpus):.2f} | "
                f"{usage.credentials / wall:,.0f} |"
            )
    finally:
        await drop_namespace(ledger.client, "bench-legacy")
        await ledger.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leases", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    sys.exit(
        with_redis(lambda url: main(url, arguments.leases, arguments.rounds), appendfsync="no")
    )
