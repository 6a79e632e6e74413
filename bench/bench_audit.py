"""What the audit trail costs issuance: two brokers on one real stack, side by side in one run.

* **sinks on**: structlog JSON on stdout (to a file, as a log shipper would read it), the
  append-only JSONL file (``fsync = batch``) and the Redis stream (durable), all three;
* **sinks off**: no sink (``insecure_allow_no_durable_sink``); events are still redacted,
  chained and queued, so the difference is what the sinks cost.

Both run as their own processes (``python -m broker serve``); an agent (mTLS with its SPIRE
X.509-SVID) asks for ``vault-token`` credentials (the cheapest kind: the audit share is the
largest there), at a fixed concurrency, in alternating rounds (off, on, off, on, …) so drift
on a shared machine hits both alike. Prints per-round and median throughput, p50/p99 latency,
the broker's CPU per issuance, the overhead, and the in-process cost of redacting and sealing
one event. Bounded: a fixed number of requests per round. Asserts nothing.

    .venv/bin/python bench/bench_audit.py [--requests N] [--rounds R] [--clients C]
                                          [--target demo-kv|demo-db]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    broker_env,
    cpu_seconds,
    percentile,
    start_broker,
    svid_context,
    wait_ready,
    wait_start_up_passes,
)
from bench_issuance import FAILURES, _drive

from broker.core.audit import AuditEvent, CredentialIssued
from broker.core.audit_chain import ChainHead, seal_line
from broker.core.audit_redact import redact_event
from broker.core.model import DelegationChain, DelegationHop
from broker.devstack import DevStack, free_port


def _seal_cost(count: int = 20_000) -> float:
    """Microseconds to redact, seal and serialise one credential.issued event."""
    chain = DelegationChain(
        (
            DelegationHop("owner", "alice@example.test", False),
            DelegationHop("orchestrator", "spiffe://tasklease.test/orchestrator/demo", True),
            DelegationHop("agent", "spiffe://tasklease.test/agent/demo", True),
        )
    )
    now = datetime.now(UTC)
    event = AuditEvent(
        event_id="evt_0123456789abcdef01234567",
        time=now,
        actor="spiffe://tasklease.test/agent/demo",
        payload=CredentialIssued(
            target="demo-db",
            kind="database",
            expires_at=now + timedelta(minutes=5),
            ttl_seconds=300,
            token_accessor="hkb0xrKu4ciE6GTfmAYBxf7A",  # noqa: S106 - an accessor, not a token
            vault_lease_count=1,
            policy_ids=("agent-request",),
        ),
        chain=chain,
        workflow_id="wf-42",
        task_id="load-orders",
        credential_id="cred_0123456789abcdef01234567",
        request_id="3f1c1f0e-7a53-4c51-9d3e-4ad3b0a1f00d",
    )

    def vet(data: Mapping[str, Any], text: str) -> Mapping[str, Any] | None:
        clean, redactions = redact_event(data, text)
        return clean if redactions else None

    head = ChainHead.start("bench")
    started = time.perf_counter()
    for _ in range(count):
        _, _, head = seal_line(event.as_dict(), head, vet=vet)
    return (time.perf_counter() - started) / count * 1e6


async def main(requests: int, rounds: int, clients: int, target: str) -> None:
    stack = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m")
    endpoints = stack.start()
    workdir = Path(tempfile.mkdtemp(prefix="tl-bench-audit-"))
    base = broker_env(
        endpoints,
        TASKLEASE_POLICY__WORKING_HOURS_START_UTC="0",
        TASKLEASE_POLICY__WORKING_HOURS_END_UTC="24",
    )
    configs = {
        "off": {
            "TASKLEASE_AUDIT__STDOUT__ENABLED": "false",
            "TASKLEASE_AUDIT__REDIS__ENABLED": "false",
            "TASKLEASE_AUDIT__FILE__PATH": "",
            "TASKLEASE_AUDIT__INSECURE_ALLOW_NO_DURABLE_SINK": "true",
        },
        "on": {
            "TASKLEASE_AUDIT__STDOUT__ENABLED": "true",
            "TASKLEASE_AUDIT__REDIS__ENABLED": "true",
            "TASKLEASE_AUDIT__REDIS__STREAM": f"bench:audit:{secrets.token_hex(3)}",
            "TASKLEASE_AUDIT__FILE__PATH": str(workdir / "audit.jsonl"),
            "TASKLEASE_AUDIT__FILE__FSYNC": "batch",
        },
    }
    ports = {name: free_port() for name in configs}
    logs = {name: (workdir / f"{name}.stdout").open("wb") for name in configs}
    # TASKLEASE_BENCH_PYFLAGS="-m cProfile -o /tmp/on.prof" profiles the broker with sinks on.
    flags = {"off": "", "on": os.environ.get("TASKLEASE_BENCH_PYFLAGS", "")}
    brokers = {
        name: start_broker(
            {**base, "TASKLEASE_SERVER__PORT": str(ports[name]), **configs[name]},
            stdout=logs[name],
            flags=flags[name],
        )
        for name in configs
    }
    try:
        agent_id = endpoints.workload_ids["agent"]
        agent_tls = svid_context(stack, agent_id, workdir, "agent")
        orch_tls = svid_context(stack, endpoints.workload_ids["orchestrator"], workdir, "orch")
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=connector) as session:
            runs: dict[str, str] = {}
            for name, port in ports.items():
                url = f"https://127.0.0.1:{port}"
                await wait_ready(session, url, agent_tls)
                await wait_start_up_passes(session, url, agent_tls)
                runs[name] = f"bench-audit-{name}-{secrets.token_hex(3)}"
                async with session.post(
                    f"{url}/v1/workflows",
                    ssl=orch_tls,
                    json={
                        "id": runs[name],
                        "owner": "bench@example.test",
                        "purpose": "audit benchmark",
                        "ttl_seconds": 3600,
                        "participants": [agent_id],
                    },
                ) as response:
                    assert response.status == 201, await response.text()

            counter = iter(range(10**9))

            def issue(name: str) -> Callable[[], Awaitable[None]]:
                url = f"https://127.0.0.1:{ports[name]}/v1/credentials"

                async def one() -> None:
                    body = {
                        "workflow_id": runs[name],
                        "task_id": f"t{next(counter)}",
                        "target": target,
                        "ttl_seconds": 900,  # no TTL revocations inside the measurement
                    }
                    async with session.post(url, json=body, ssl=agent_tls) as response:
                        if response.status != 201:
                            raise RuntimeError(f"{response.status}: {await response.text()}")
                        await response.read()

                return one

            for name in configs:  # warm both
                await _drive(clients, min(4 * clients, 64), issue(name))
            rps: dict[str, list[float]] = {name: [] for name in configs}
            latencies: dict[str, list[float]] = {name: [] for name in configs}
            cpu: dict[str, list[float]] = {name: [] for name in configs}
            print(
                f"# target {target}, {clients} concurrent clients, {requests} requests per "
                f"round, {rounds} rounds (alternating)"
            )
            print("| round | sinks | req/s | p50 ms | p99 ms | broker CPU/issuance |")
            print("|---|---|---|---|---|---|")
            for round_no in range(1, rounds + 1):
                for name in configs:
                    before = cpu_seconds(brokers[name].pid)
                    lat, wall = await _drive(clients, requests, issue(name))
                    spent = (cpu_seconds(brokers[name].pid) - before) / requests
                    rps[name].append(len(lat) / wall)
                    latencies[name].extend(lat)
                    cpu[name].append(spent)
                    print(
                        f"| {round_no} | {name} | {len(lat) / wall:.0f} | "
                        f"{percentile(lat, 0.5) * 1e3:.1f} | {percentile(lat, 0.99) * 1e3:.1f} "
                        f"| {spent * 1e3:.2f} ms |"
                    )
            off, on = statistics.median(rps["off"]), statistics.median(rps["on"])
            print()
            print("| sinks | median req/s | p50 ms | p99 ms | median CPU/issuance |")
            print("|---|---|---|---|---|")
            for name in configs:
                lat = latencies[name]
                print(
                    f"| {name} | {statistics.median(rps[name]):.0f} | "
                    f"{percentile(lat, 0.5) * 1e3:.1f} | {percentile(lat, 0.99) * 1e3:.1f} | "
                    f"{statistics.median(cpu[name]) * 1e3:.2f} ms |"
                )
            print(
                f"\naudit sinks cost {(1 - on / off) * 100:.1f}% of issuance throughput "
                f"(goal: at most 10%); redact + seal + serialise one event in-process: "
                f"{_seal_cost():.0f} µs"
            )
            audit_file = workdir / "audit.jsonl"
            lines = len(audit_file.read_text().splitlines()) if audit_file.exists() else 0
            print(f"audit file: {lines} records (2 per issuance: policy.decision, issued)")
            if FAILURES:
                print(f"\nfailed requests (excluded): {FAILURES}")
    finally:
        for process in brokers.values():
            process.send_signal(signal.SIGINT)
        for process in brokers.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs.values():
            handle.close()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the SVIDs' private keys, the logs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--target", default="demo-kv", choices=["demo-kv", "demo-db"])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.requests, arguments.rounds, arguments.clients, arguments.target))
