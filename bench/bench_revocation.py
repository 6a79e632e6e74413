"""Revocation latency on the real local stack: workflow completion until every credential is
confirmed revoked, and how late the sweeper revokes credentials whose TTL ran out.

The broker runs as its own process (``python -m broker serve``: bootstrap wires the
revocation engine and its sweeper) with the production defaults (sweep every 1 s, batch 256,
16 concurrent revocations). The client, in this process:

1. completion: for runs of 1, 10 and 100 ``vault-token`` credentials (the cheapest to mint),
   issue them, then time ``POST /v1/workflows/{id}/complete?wait=true`` until its report
   says every credential is confirmed revoked (token revoked, lookup says it is gone);
2. TTL expiry under load: issue ``--expiring`` credentials with a 5 s TTL as fast as the
   broker mints them, then watch the ledger: the sweep lag (``revoked_at`` - ``expires_at``,
   the sweep's claim time) and when each was seen revoked (polled every 50 ms).

Bounded: a fixed number of runs per size. Prints a table; asserts nothing but the set-up.

    .venv/bin/python bench/bench_revocation.py [--expiring N]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import ssl
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    broker_env,
    percentile,
    start_broker,
    svid_context,
    wait_ready,
    wait_start_up_passes,
)

from broker.devstack import DevStack, free_port

RUNS_PER_SIZE = {1: 30, 10: 15, 100: 5}
ISSUE_CONCURRENCY = 16


# --------------------------------------------------------------------------- the client


class Client:
    def __init__(
        self, session: aiohttp.ClientSession, url: str, tls: dict[str, ssl.SSLContext]
    ) -> None:
        self.session, self.url, self.tls = session, url, tls

    async def call(
        self, who: str, method: str, path: str, body: object = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.session.request(
            method, f"{self.url}{path}", json=body, ssl=self.tls[who]
        ) as response:
            return response.status, await response.json(content_type=None)

    async def start_run(self, agent_id: str) -> str:
        run_id = f"bench-{secrets.token_hex(4)}"
        status, body = await self.call(
            "orchestrator",
            "POST",
            "/v1/workflows",
            {
                "id": run_id,
                "owner": "bench@example.test",
                "purpose": "revocation benchmark",
                "ttl_seconds": 3600,
                "participants": [agent_id],
            },
        )
        assert status == 201, body
        return run_id

    async def issue(self, run_id: str, count: int, ttl: int) -> list[dict[str, Any]]:
        issued: list[dict[str, Any]] = []
        pending = list(range(count))

        async def worker() -> None:
            while pending:
                task = pending.pop()
                status, body = await self.call(
                    "agent",
                    "POST",
                    "/v1/credentials",
                    {
                        "workflow_id": run_id,
                        "task_id": f"t{task}",
                        "target": "demo-kv",
                        "ttl_seconds": ttl,
                    },
                )
                assert status == 201, body
                issued.append(body)

        await asyncio.gather(*(worker() for _ in range(min(ISSUE_CONCURRENCY, count))))
        return issued


async def bench_completion(client: Client, agent_id: str) -> None:
    print("## completion → every credential confirmed revoked (POST …/complete?wait=true)")
    print("| credentials per run | runs | p50 ms | p99 ms | max ms | per credential ms |")
    print("|---|---|---|---|---|---|")
    for size, runs in RUNS_PER_SIZE.items():
        latencies: list[float] = []
        for _ in range(runs):
            run_id = await client.start_run(agent_id)
            await client.issue(run_id, size, ttl=600)
            started = time.perf_counter()
            status, body = await client.call(
                "orchestrator",
                "POST",
                f"/v1/workflows/{run_id}/complete?wait=true",
                {"outcome": "completed"},
            )
            latencies.append(time.perf_counter() - started)
            assert status == 200, body
            assert body["report"]["counts"]["confirmed_revoked"] == size, body
        p50, p99 = percentile(latencies, 0.5) * 1e3, percentile(latencies, 0.99) * 1e3
        print(
            f"| {size} | {runs} | {p50:.1f} | {p99:.1f} | {max(latencies) * 1e3:.1f} | "
            f"{p50 / size:.2f} |"
        )


async def bench_direct(session: aiohttp.ClientSession, addr: str, root_token: str) -> None:
    """The floor: the same Vault work without the broker (revoke-accessor, then the
    confirming lookup-accessor), 16 at a time, on tokens created with the root token."""
    headers = {"X-Vault-Token": root_token}
    print("\n## the floor: OpenBao alone, revoke by accessor + confirming lookup, 16 at a time")
    print("| tokens | p50 ms | max ms | per token ms |")
    print("|---|---|---|---|")
    for size, runs in RUNS_PER_SIZE.items():
        latencies: list[float] = []
        for _ in range(runs):
            accessors: list[str] = []
            for _ in range(size):
                async with session.post(
                    f"{addr}/v1/auth/token/create-orphan",
                    json={"ttl": "600s", "policies": ["default"], "renewable": False},
                    headers=headers,
                ) as response:
                    accessors.append((await response.json())["auth"]["accessor"])

            async def revoke(accessor: str, gate: asyncio.Semaphore) -> None:
                async with gate:
                    async with session.post(
                        f"{addr}/v1/auth/token/revoke-accessor",
                        json={"accessor": accessor},
                        headers=headers,
                    ) as response:
                        assert response.status == 204, await response.text()
                    async with session.post(
                        f"{addr}/v1/auth/token/lookup-accessor",
                        json={"accessor": accessor},
                        headers=headers,
                    ) as response:
                        assert response.status == 400, await response.text()

            gate = asyncio.Semaphore(16)
            started = time.perf_counter()
            await asyncio.gather(*(revoke(a, gate) for a in accessors))
            latencies.append(time.perf_counter() - started)
        p50 = percentile(latencies, 0.5) * 1e3
        print(f"| {size} | {p50:.1f} | {max(latencies) * 1e3:.1f} | {p50 / size:.2f} |")


async def bench_ttl_expiry(client: Client, agent_id: str, redis_url: str, count: int) -> None:
    from broker.adapters.redis_ledger import RedisLedger
    from broker.config import RedisSettings
    from broker.core.ports import LeaseSelector

    ledger = RedisLedger(settings=RedisSettings.model_validate({"url": redis_url}))
    try:
        run_id = await client.start_run(agent_id)
        began = time.perf_counter()
        issued = await client.issue(run_id, count, ttl=5)
        issuing = time.perf_counter() - began
        expiries = {x["credential_id"]: datetime.fromisoformat(x["expires_at"]) for x in issued}
        seen: dict[str, datetime] = {}
        deadline = max(expiries.values()) + timedelta(seconds=60)
        while len(seen) < count and datetime.now(UTC) < deadline:
            now = datetime.now(UTC)
            leases = await ledger.find_leases(LeaseSelector(workflow_id=run_id), limit=10_000)
            for lease in leases:
                if lease.state.value == "revoked" and lease.credential_id not in seen:
                    seen[lease.credential_id] = now
            await asyncio.sleep(0.05)
        leases = await ledger.find_leases(LeaseSelector(workflow_id=run_id), limit=10_000)
    finally:
        await ledger.close()
    sweep_lag = [
        (x.revoked_at - x.expires_at).total_seconds() for x in leases if x.revoked_at is not None
    ]
    observed = [(seen[cid] - expiries[cid]).total_seconds() for cid in seen]
    drain = (max(seen.values()) - max(expiries.values())).total_seconds() if seen else float("nan")
    print(
        f"\n## TTL expiry under load: {count} vault-token credentials, TTL 5 s, issued in "
        f"{issuing:.1f} s ({count / issuing:.0f}/s); sweep every 1 s, batch 256, 16 concurrent"
    )
    print("| measure | p50 s | p99 s | max s |")
    print("|---|---|---|---|")
    for name, values in (
        ("sweep lag (revoked_at - expires_at)", sweep_lag),
        ("seen revoked - expires_at (50 ms polls)", observed),
    ):
        if values:
            print(
                f"| {name} | {percentile(values, 0.5):.2f} | {percentile(values, 0.99):.2f} | "
                f"{max(values):.2f} |"
            )
    print(
        f"\nrevoked {len(seen)}/{count}; the last one {drain:.2f} s after the last expiry "
        "(Vault had expired each token at its TTL already)"
    )


async def main(expiring: int) -> None:
    stack = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m")
    endpoints = stack.start()
    port = free_port()
    broker = start_broker(broker_env(endpoints, TASKLEASE_SERVER__PORT=str(port)))
    workdir = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    try:
        tls = {
            who: svid_context(stack, endpoints.workload_ids[who], workdir, who)
            for who in ("agent", "orchestrator")
        }
        url = f"https://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            await wait_ready(session, url, tls["agent"])
            await wait_start_up_passes(session, url, tls["agent"])
            client = Client(session, url, tls)
            agent_id = endpoints.workload_ids["agent"]
            await client.issue(await client.start_run(agent_id), 32, ttl=60)  # warm up
            await bench_completion(client, agent_id)
            await bench_direct(session, endpoints.openbao_addr, endpoints.openbao_root_token)
            await bench_ttl_expiry(client, agent_id, endpoints.redis_url, expiring)
    finally:
        broker.send_signal(signal.SIGINT)
        broker.wait(timeout=20)
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the SVIDs' private keys


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--expiring", type=int, default=500)
    asyncio.run(main(parser.parse_args().expiring))
