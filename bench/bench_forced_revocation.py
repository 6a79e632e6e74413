"""Bulk forced revocation of 10 000 credentials through the broker, against OpenBao's own
``sys/leases/revoke-prefix`` on comparable leases in the same run (the limit).

Everything runs on the real local stack, in one run:

* **the limit** — 10 000 task tokens, then one ``PUT sys/leases/revoke-prefix/auth/token/
  create/tasklease-task`` (root token, ``sync=true``: it answers once every lease under the
  prefix is revoked). OpenBao does the whole job internally, in one request, and confirms
  nothing to anyone.
* **the per-token floor** — 10 000 more, each revoked the way the broker revokes one
  credential in OpenBao (``revoke-accessor``, then the confirming ``lookup-accessor``), 16 at
  a time like the broker's default ``revocation.concurrency``, from this process, with no
  ledger and no HTTP API (``VaultMinter.revoke``). Skip it with
  ``TASKLEASE_BENCH_FORCED_FLOOR=0``.
* **the broker** — 10 000 more, recorded in the broker's ledger exactly as issuance records
  them (write-ahead, mint, activate), then an admin's ``POST /v1/revocations`` selecting them
  by owner, against a broker running as its own process (``python -m broker serve``, default
  revocation settings). Timed from the request until the report says every credential is
  confirmed revoked (one call reaches every match: the report lists at most 10 000 and says
  "truncated" when it matched more, whose leases are due now and revoked by the broker's
  sweeper; the time then runs until the ledger holds none of them live).

Comparable leases: every token is minted the same way, by the broker's own ``VaultMinter``
(logged in with the broker's JWT-SVID) through the ``tasklease-task`` role, as a
``vault-token`` credential of the demo catalog: an orphan service token with the target's
policy, ``ttl = explicit_max_ttl``, the broker's metadata. Token leases rather than database
ones because they isolate the revocation machinery: a database lease adds a PostgreSQL
``DROP ROLE`` to every revocation on all three paths alike (and minting 30 000 of them would
dominate the run). The broker's path does more per credential on purpose — it confirms each
revocation by lookup, records it durably (Redis ``appendfsync always``) and reports each one —
so the ratio is the price of that bookkeeping, not a like-for-like of the same work.

Prints a table, the broker's CPU per revoked credential (from /proc) and its revocation
metrics. Bounded: a fixed number of tokens per path. Asserts nothing but the set-up.

    .venv/bin/python bench/bench_forced_revocation.py [--count N]   (TASKLEASE_BENCH_FORCED_N)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from _common import (
    broker_env,
    cpu_seconds,
    start_broker,
    svid_context,
    wait_ready,
    wait_start_up_passes,
)

from broker.adapters.clock import SystemClock
from broker.adapters.config_files import load_target_catalog
from broker.adapters.kinds import all_kinds
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.vault import HvacVault, VaultMinter
from broker.adapters.workload_api import WorkloadApiSource
from broker.config import RedisSettings, VaultSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Target,
    WorkflowRun,
)
from broker.core.ports import LeaseSelector, MintedCredential, MintSpec
from broker.devstack import REPO_ROOT, DevStack, StackEndpoints, free_port

COUNT = int(os.environ.get("TASKLEASE_BENCH_FORCED_N", "10000"))
FLOOR = os.environ.get("TASKLEASE_BENCH_FORCED_FLOOR", "1") != "0"
MINT_CONCURRENCY = 32
REVOKE_CONCURRENCY = 16  # the broker's default revocation.concurrency
PER_RUN = 100
TTL = timedelta(minutes=30)
OWNER = "bench-forced@example.test"
PREFIX = "auth/token/create/tasklease-task"


async def _bounded(count: int, concurrency: int, work: Callable[[int], Awaitable[None]]) -> None:
    pending = iter(range(count))

    async def worker() -> None:
        for index in pending:
            await work(index)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


class Bench:
    """The stack, the broker process, and this process's own OpenBao and Redis clients."""

    def __init__(self, stack: DevStack, endpoints: StackEndpoints, workdir: Path) -> None:
        self.stack = stack
        self.endpoints = endpoints
        self.workdir = workdir
        self.target: Target = load_target_catalog(REPO_ROOT / "config" / "targets.toml")["demo-kv"]
        self.agent = endpoints.workload_ids["agent"]
        self.orchestrator = endpoints.workload_ids["orchestrator"]
        self.chain = DelegationChain(
            (
                DelegationHop("owner", OWNER, verified=False),
                DelegationHop("orchestrator", self.orchestrator, verified=True),
                DelegationHop("agent", self.agent, verified=True),
            )
        )
        self.root = {"X-Vault-Token": endpoints.openbao_root_token}

    def spec(self, credential_id: str, workflow_id: str, task_id: str) -> MintSpec:
        return MintSpec(
            credential_id=credential_id,
            workflow_id=workflow_id,
            task_id=task_id,
            holder=self.agent,
            owner=OWNER,
            chain=self.chain,
            target=self.target,
            ttl=TTL,
        )

    async def mint_tokens(self, minter: VaultMinter, count: int, tag: str) -> list[str]:
        accessors: list[str] = []

        async def one(index: int) -> None:
            minted = await minter.mint(self.spec(f"cred_{tag}{index:06d}", f"wf-{tag}", "t"))
            accessors.append(minted.token_accessor)

        started = time.perf_counter()
        await _bounded(count, MINT_CONCURRENCY, one)
        elapsed = time.perf_counter() - started
        print(f"   minted {count} task tokens ({tag}) in {elapsed:.1f} s ({count / elapsed:.0f}/s)")
        return accessors

    async def leases_under_prefix(self, session: aiohttp.ClientSession) -> int:
        async with session.request(
            "LIST",
            f"{self.endpoints.openbao_addr}/v1/sys/leases/lookup/{PREFIX}/",
            headers=self.root,
        ) as response:
            if response.status == 404:
                return 0
            body = await response.json()
        return len((body.get("data") or {}).get("keys") or [])

    async def gone(self, session: aiohttp.ClientSession, accessors: Sequence[str]) -> int:
        """How many of ``accessors`` OpenBao no longer knows (root lookups, 16 at a time)."""
        count = 0
        gate = asyncio.Semaphore(16)

        async def one(accessor: str) -> None:
            nonlocal count
            async with (
                gate,
                session.post(
                    f"{self.endpoints.openbao_addr}/v1/auth/token/lookup-accessor",
                    json={"accessor": accessor},
                    headers=self.root,
                ) as response,
            ):
                count += response.status == 400

        await asyncio.gather(*(one(a) for a in accessors))
        return count


async def bench_prefix(bench: Bench, minter: VaultMinter, session: aiohttp.ClientSession) -> float:
    accessors = await bench.mint_tokens(minter, COUNT, "p")
    under = await bench.leases_under_prefix(session)
    assert under == COUNT, f"{under} leases under {PREFIX}, expected {COUNT}"
    started = time.perf_counter()
    async with session.put(
        f"{bench.endpoints.openbao_addr}/v1/sys/leases/revoke-prefix/{PREFIX}",
        json={"sync": True},
        headers=bench.root,
        timeout=aiohttp.ClientTimeout(total=1800),
    ) as response:
        assert response.status in (200, 204), await response.text()
    elapsed = time.perf_counter() - started
    assert await bench.leases_under_prefix(session) == 0
    sample = accessors[:: max(1, COUNT // 500)]
    assert await bench.gone(session, sample) == len(sample)
    return elapsed


async def bench_floor(bench: Bench, minter: VaultMinter) -> float:
    accessors = await bench.mint_tokens(minter, COUNT, "f")

    async def one(index: int) -> None:
        outcome = await minter.revoke(token_accessor=accessors[index], vault_lease_ids=())
        assert outcome.confirmed

    started = time.perf_counter()
    await _bounded(COUNT, REVOKE_CONCURRENCY, one)
    return time.perf_counter() - started


async def record_credentials(bench: Bench, minter: VaultMinter, ledger: RedisLedger) -> list[str]:
    """``COUNT`` credentials as issuance records them: write-ahead, mint, activate."""
    now = datetime.now(UTC)
    runs = (COUNT + PER_RUN - 1) // PER_RUN
    run_ids = [f"wf-force-{uuid.uuid4().hex[:8]}" for _ in range(runs)]
    for run_id in run_ids:
        await ledger.create_run(
            WorkflowRun(
                id=run_id,
                owner=OWNER,
                purpose="forced revocation benchmark",
                started_by=bench.orchestrator,
                created_at=now,
                deadline=now + timedelta(hours=2),
            )
        )
    accessors: list[str] = []

    async def one(index: int) -> None:
        credential_id = f"cred_{uuid.uuid4().hex[:24]}"
        run_id, task_id = run_ids[index // PER_RUN], f"task-{index:05d}"
        issued_at = datetime.now(UTC)
        lease = Lease(
            credential_id=credential_id,
            workflow_id=run_id,
            task_id=task_id,
            target=bench.target.name,
            kind=bench.target.kind,
            sensitivity=bench.target.sensitivity,
            holder=bench.agent,
            owner=OWNER,
            chain=bench.chain,
            issued_at=issued_at,
            expires_at=issued_at + TTL,
        )
        await ledger.write_ahead(lease)
        minted: MintedCredential = await minter.mint(bench.spec(credential_id, run_id, task_id))
        await ledger.activate(
            credential_id,
            token_accessor=minted.token_accessor,
            vault_lease_ids=minted.vault_lease_ids,
        )
        accessors.append(minted.token_accessor)

    started = time.perf_counter()
    await _bounded(COUNT, MINT_CONCURRENCY, one)
    elapsed = time.perf_counter() - started
    print(
        f"   recorded and minted {COUNT} credentials (broker) in {elapsed:.1f} s "
        f"({COUNT / elapsed:.0f}/s)"
    )
    return accessors


async def bench_broker(
    bench: Bench,
    *,
    minter: VaultMinter,
    ledger: RedisLedger,
    session: aiohttp.ClientSession,
    broker_url: str,
    admin: ssl.SSLContext,
    broker_pid: int,
) -> tuple[float, float, int, dict[str, Any]]:
    accessors = await record_credentials(bench, minter, ledger)
    body = {"selector": {"owner": OWNER}, "reason": "bench: INC-0 bulk forced revocation"}
    cpu_before = cpu_seconds(broker_pid)
    started = time.perf_counter()
    async with session.post(
        f"{broker_url}/v1/revocations",
        json=body,
        ssl=admin,
        timeout=aiohttp.ClientTimeout(total=1800),
    ) as response:
        report = await response.json()
    assert response.status in (200, 207), report
    assert report["counts"]["still_live"] == 0, report["still_live"][:3]
    assert report["scheduled"] == COUNT, f"{report['scheduled']} made due, expected {COUNT}"
    swept = COUNT - report["counts"]["confirmed_revoked"]
    live = LeaseSelector(owner=OWNER, states=frozenset(LeaseState) - {LeaseState.REVOKED})
    while report["truncated"] and await ledger.find_leases(live, limit=1):
        # The leases the report does not list are due now: the sweeper revokes them.
        assert time.perf_counter() - started < 1800, "the sweeper did not finish in 30 min"
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(broker_pid) - cpu_before
    leases = await ledger.find_leases(LeaseSelector(owner=OWNER), limit=10_000)
    assert {lease.state for lease in leases} == {LeaseState.REVOKED}
    sample = accessors[:: max(1, COUNT // 500)]
    assert await bench.gone(session, sample) == len(sample)
    async with session.get(f"{broker_url}/metrics", ssl=admin) as response:
        metrics = await response.text()
    return elapsed, cpu, swept, {"metrics": metrics}


def _revoke_metrics(text: str) -> str:
    """The broker's own view: mean time of one revocation in OpenBao, and the outcomes."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            (
                'tasklease_revoke_duration_seconds_sum{kind="vault-token",outcome="confirmed"}',
                'tasklease_revoke_duration_seconds_count{kind="vault-token",outcome="confirmed"}',
                "tasklease_revocations_total{",
            )
        ):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    count = next((v for k, v in values.items() if "_count" in k), 0.0)
    total = next((v for k, v in values.items() if "_sum" in k), 0.0)
    outcomes = {
        k.split('outcome="')[1].rstrip('"}'): int(v)
        for k, v in values.items()
        if "revocations_total" in k
    }
    mean = total / count * 1e3 if count else float("nan")
    return (
        f"mean OpenBao revocation (revoke + lookup) {mean:.1f} ms over {count:.0f}; "
        f"settle outcomes {outcomes} (already_revoked: the sweeper clearing the due entries "
        "the forced path left, after it revoked them)"
    )


async def main(count: int) -> None:
    global COUNT  # noqa: PLW0603 - the --count option overrides the environment
    COUNT = count
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    stack = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m")
    endpoints = stack.start()
    port = free_port()
    broker = start_broker(
        broker_env(
            endpoints,
            TASKLEASE_SERVER__PORT=str(port),
            # The prefix and floor tokens carry the broker's metadata and no ledger record:
            # the broker's reconciler must not revoke them before they are measured.
            TASKLEASE_VAULT__RECONCILE_INTERVAL_SECONDS="86400",
            TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS="86400",
        ),
        flags="",
    )
    workdir = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    source = WorkloadApiSource(socket_path=f"unix://{endpoints.spire_agent_socket}")
    vault: HvacVault | None = None
    minter: VaultMinter | None = None
    ledger = RedisLedger(settings=RedisSettings.model_validate({"url": endpoints.redis_url}))
    try:
        bench = Bench(stack, endpoints, workdir)
        admin = svid_context(
            stack, endpoints.workload_ids["admin"], workdir, "admin", ttl_seconds=7200
        )
        # This process logs into OpenBao as the broker (same uid: the broker's SVID) and
        # mints with the broker's own minter.
        await source.start()
        vault = HvacVault(
            settings=VaultSettings(addr=endpoints.openbao_addr),
            jwt_svid=source.fetch_jwt_svid,
            now=SystemClock().now,
        )
        await vault.login()
        minter = VaultMinter(vault=vault, kinds=all_kinds(), now=SystemClock().now)
        url = f"https://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            await wait_ready(session, url, admin)
            await wait_start_up_passes(session, url, admin)
            print(f"# {COUNT} vault-token credentials per path; the machine may be shared")
            print("\n## the limit: OpenBao sys/leases/revoke-prefix")
            prefix = await bench_prefix(bench, minter, session)
            floor = None
            if FLOOR:
                print("\n## the per-token floor: revoke-accessor + lookup, 16 at a time")
                floor = await bench_floor(bench, minter)
            print("\n## the broker: POST /v1/revocations (admin, selector: owner)")
            broker_s, cpu, swept, extra = await bench_broker(
                bench,
                minter=minter,
                ledger=ledger,
                session=session,
                broker_url=url,
                admin=admin,
                broker_pid=broker.pid,
            )
        print(f"\n| path | {COUNT} revoked in s | credentials/s | broker time / path time |")
        print("|---|---|---|---|")
        rows = [("OpenBao revoke-prefix (the limit)", prefix)]
        if floor is not None:
            rows.append(("OpenBao per token, revoke + lookup, 16 at a time", floor))
        rows.append((f"broker forced revocation (1 call, {swept} by the sweeper)", broker_s))
        for name, seconds in rows:
            print(f"| {name} | {seconds:.1f} | {COUNT / seconds:.0f} | {broker_s / seconds:.2f} |")
        print(
            f"\nbroker process CPU during the forced revocation: {cpu:.1f} s "
            f"= {cpu / COUNT * 1e3:.2f} ms per credential"
        )
        print(f"broker metrics: {_revoke_metrics(extra['metrics'])}")
    finally:
        await ledger.close()
        if minter is not None:
            await minter.close()
        if vault is not None:
            vault.close()
        source.close()
        broker.send_signal(signal.SIGINT)
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            broker.kill()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the SVIDs' private keys


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=COUNT)
    asyncio.run(main(parser.parse_args().count))
