"""Issuance through the broker against what users would do instead, side by side in one run.

Broker path: an agent (mTLS with its SPIRE X.509-SVID) POSTs /v1/credentials, with an
`Idempotency-Key` as the SDK always sends one, to a broker that runs as its own process
(`python -m broker serve`) on the real local stack.
Direct path: the same agent logs into OpenBao's JWT auth with its JWT-SVID and reads
`database/creds/<role>` itself (for `vault-token`: the JWT login alone).

Floor path: the external work the broker's design cannot skip, done by this process with no
policy, audit, TLS or HTTP server in between: read the run, a write-ahead HSET (fsynced: the
dev stack's Redis runs `appendfsync always`), the task token through the task token role with
a token of the broker's policy, for `database` the `database/creds` read with the task token
and the lease renewal to the task's TTL, then the activation HSET. The broker's time above
the floor is what its own code costs; the floor above the direct path is what the design
costs (a token creation instead of a login, two durable writes, the renewal).

Prints median and p99 latency and throughput at 1, 16 and 64 concurrent clients, the ratios,
the broker's own CPU time per issuance (from /proc), this process's CPU time per issuance on
the floor path (what the mandated calls alone cost a Python client with aiohttp and
redis-py), the bytes a lease takes in Redis, and what one task token creation costs OpenBao
back to back against with the machine idle in between (how one client at a time is paid).

A second table gives each path's CPU per issuance over the whole machine (``/proc/stat``: both
cores, every process and the kernel, during that path's cell) and, for the broker path, the
broker's, OpenBao's, Redis's and this client's own. When a path keeps the machine busy its
throughput is about cores ÷ machine CPU per issuance, so ``direct ÷ floor`` is about the
throughput ratio the design's mandated calls alone allow (made from a Python client, with no
broker in between), and ``direct ÷ broker path`` what the broker reaches at most. "Servers"
leaves this process out (the clients, and the floor's Python caller): ``direct ÷ floor,
servers`` is what OpenBao, Redis and PostgreSQL alone allow, with a client that cost nothing.
Measuring starts once each broker's start-up re-evaluation and its follow-up are done
(``_common.wait_start_up_passes``: one-off work, not issuance). Bounded: a fixed number of
requests per cell. Asserts nothing. ``--openbao-tls``: every path (direct, floor and the
broker's) reaches OpenBao over its HTTPS listener, as in production; by default all use the
stack's plain HTTP listener on loopback.

    .venv/bin/python bench/bench_issuance.py [--requests N] [--openbao-tls]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis
import redis.asyncio
from _common import (
    CpuMeter,
    broker_env,
    cpu_seconds,
    percentile,
    start_broker,
    svid_context,
    wait_ready,
    wait_start_up_passes,
)

from broker.devstack import DevStack, free_port

CONCURRENCY = tuple(int(c) for c in os.environ.get("TASKLEASE_BENCH_CLIENTS", "1,16,64").split(","))
# Broker replicas (processes on one Redis, as deployed behind a load balancer); the client
# spreads requests over them in turn and the CPU column sums them.
REPLICAS = int(os.environ.get("TASKLEASE_BENCH_REPLICAS", "1"))


FAILURES: dict[str, int] = {}


async def _drive(
    concurrency: int, total: int, one: Callable[[], Awaitable[None]]
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            queue.pop()
            started = time.perf_counter()
            try:
                await one()
            except RuntimeError as exc:
                # Counted, not fatal: e.g. PostgreSQL's "tuple concurrently updated" when
                # many GRANTs on one table race (the same for both paths).
                FAILURES[str(exc)[:80]] = FAILURES.get(str(exc)[:80], 0) + 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def _cpu_row(
    kind: str,
    clients: int,
    spent: tuple[dict[str, float], dict[str, float], dict[str, float]],
    requests: int,
) -> str:
    """One row of the CPU table (milliseconds per issuance) from the direct, floor and broker
    cells' :class:`CpuMeter` readings."""
    direct, floor, broker = spent

    def ms(reading: dict[str, float], name: str) -> str:
        return f"{reading.get(name, 0.0) / requests * 1e3:.2f}"

    def servers(reading: dict[str, float]) -> float:
        """Everything but this benchmark's own process (the client)."""
        return reading["machine"] - reading.get("client", 0.0)

    def share(mine: float, theirs: float) -> str:
        return f"{mine / theirs:.2f}" if theirs > 0 else "-"

    return (
        f"| {kind} | {clients} | {ms(direct, 'machine')} | {servers(direct) / requests * 1e3:.2f} "
        f"| {ms(floor, 'machine')} | {servers(floor) / requests * 1e3:.2f} | "
        f"{ms(broker, 'machine')} | {ms(broker, 'broker')} | {ms(broker, 'openbao')} | "
        f"{ms(broker, 'redis')} | {share(direct['machine'], floor['machine'])} | "
        f"{share(servers(direct), servers(floor))} | "
        f"{share(direct['machine'], broker['machine'])} |"
    )


async def _openbao_idle_cost(
    session: aiohttp.ClientSession,
    addr: str,
    bao_ssl: ssl.SSLContext | bool,
    broker_token: str,
    stack: DevStack,
) -> None:
    """One task token creation at a time, back to back and with the machine idle in between.

    One client at a time, the broker keeps OpenBao idle while it does its own part of each
    issuance, and on this kind of machine (a VM; Go parks its threads) the same call then
    costs more time and more OpenBao CPU than back to back, as the direct path calls it."""
    process = stack.processes["openbao"].popen
    assert process is not None
    body = {"policies": ["target-demo-kv"], "ttl": "900s", "explicit_max_ttl": "900s"}
    print()
    for gap_ms in (0, 4, 8):
        latencies: list[float] = []
        cpu_before = cpu_seconds(process.pid)
        for _ in range(200):
            if gap_ms:
                await asyncio.sleep(gap_ms / 1e3)
            started = time.perf_counter()
            async with session.post(
                f"{addr}/v1/auth/token/create/tasklease-task",
                json=body,
                headers={"X-Vault-Token": broker_token},
                ssl=bao_ssl,
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
            latencies.append(time.perf_counter() - started)
        cpu = (cpu_seconds(process.pid) - cpu_before) / len(latencies)
        print(
            f"OpenBao task token creation, one at a time, {gap_ms} ms idle between calls: "
            f"p50 {percentile(latencies, 0.5) * 1e3:.2f} ms, OpenBao CPU {cpu * 1e3:.2f} ms"
        )


async def main(requests_per_cell: int, *, openbao_tls: bool) -> None:
    stack = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m")
    endpoints = stack.start()
    # Every path reaches OpenBao the same way: plain HTTP on loopback, or (--openbao-tls) its
    # HTTPS listener, trusting the stack's CA, as anywhere but a dev machine.
    bao = endpoints.openbao_tls_addr if openbao_tls else endpoints.openbao_addr
    bao_ssl: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=endpoints.openbao_ca_file) if openbao_tls else True
    )
    over_tls = (
        {"TASKLEASE_VAULT__ADDR": bao, "TASKLEASE_VAULT__CA_FILE": endpoints.openbao_ca_file}
        if openbao_tls
        else {}
    )
    broker_ports = [free_port() for _ in range(REPLICAS)]
    brokers = [
        start_broker(broker_env(endpoints, TASKLEASE_SERVER__PORT=str(port), **over_tls))
        for port in broker_ports
    ]
    workdir = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    try:
        agent_id = endpoints.workload_ids["agent"]
        agent_tls = svid_context(stack, agent_id, workdir, "agent")
        orch_tls = svid_context(stack, endpoints.workload_ids["orchestrator"], workdir, "orch")
        jwt_svid = stack.mint_jwt_svid(agent_id, audience="openbao", ttl_seconds=3600)
        urls = [f"https://127.0.0.1:{port}" for port in broker_ports]
        url = urls[0]
        connector = aiohttp.TCPConnector(limit=128)
        async with aiohttp.ClientSession(connector=connector) as session:
            for replica in urls:
                await wait_ready(session, replica, agent_tls)
            for replica in urls:
                await wait_start_up_passes(session, replica, agent_tls)
            run_id = f"bench-{secrets.token_hex(3)}"
            async with session.post(
                f"{url}/v1/workflows",
                ssl=orch_tls,
                json={
                    "id": run_id,
                    "owner": "bench@example.test",
                    "purpose": "benchmark",
                    "ttl_seconds": 3600,
                    "participants": [agent_id],
                },
            ) as response:
                assert response.status == 201, await response.text()

            counter = iter(range(10**9))

            def broker_call(target: str) -> Callable[[], Awaitable[None]]:
                async def one() -> None:
                    number = next(counter)
                    body = {
                        "workflow_id": run_id,
                        "task_id": f"t{number}",
                        "target": target,
                        "ttl_seconds": 900,  # no TTL revocations inside the measurement
                    }
                    async with session.post(
                        f"{urls[number % REPLICAS]}/v1/credentials",
                        json=body,
                        ssl=agent_tls,
                        # As the SDK sends with every credential request.
                        headers={"Idempotency-Key": f"tlk-{secrets.token_hex(16)}"},
                    ) as response:
                        if response.status != 201:
                            raise RuntimeError(f"{response.status}: {await response.text()}")
                        await response.read()

                return one

            def direct_call(read_creds: bool) -> Callable[[], Awaitable[None]]:
                async def one() -> None:
                    async with session.post(
                        f"{bao}/v1/auth/spiffe-jwt/login",
                        json={"role": "direct-agent", "jwt": jwt_svid},
                        ssl=bao_ssl,
                    ) as response:
                        token = (await response.json())["auth"]["client_token"]
                    if read_creds:
                        async with session.get(
                            f"{bao}/v1/database/creds/demo-readonly",
                            headers={"X-Vault-Token": token},
                            ssl=bao_ssl,
                        ) as response:
                            if response.status != 200:
                                raise RuntimeError(await response.text())
                            await response.read()

                return one

            async with session.post(
                f"{bao}/v1/auth/token/create",
                ssl=bao_ssl,
                headers={"X-Vault-Token": endpoints.openbao_root_token},
                json={"policies": ["tasklease-broker"], "ttl": "2h", "no_default_policy": True},
            ) as response:
                broker_token = (await response.json())["auth"]["client_token"]
            floor_redis = redis.asyncio.Redis.from_url(endpoints.redis_url)
            floor_key = f"tl:bench-floor:{{{run_id}}}"
            await floor_redis.set(f"{floor_key}:run", "r" * 400)
            record = "x" * 600  # about a lease record

            def floor_call(read_creds: bool) -> Callable[[], Awaitable[None]]:
                async def vault(method: str, path: str, token: str, body: object) -> dict[str, Any]:
                    async with session.request(
                        method,
                        f"{bao}/v1/{path}",
                        json=body,
                        headers={"X-Vault-Token": token},
                        ssl=bao_ssl,
                    ) as response:
                        if response.status != 200:
                            raise RuntimeError(f"{path}: {await response.text()}")
                        return await response.json()  # type: ignore[no-any-return]

                async def one() -> None:
                    cid = f"cred_{secrets.token_hex(12)}"
                    await floor_redis.get(f"{floor_key}:run")
                    await floor_redis.hset(floor_key, cid, record)
                    created = await vault(
                        "POST",
                        "auth/token/create/tasklease-task",
                        broker_token,
                        {
                            "policies": ["target-demo-db" if read_creds else "target-demo-kv"],
                            "ttl": "900s",
                            "explicit_max_ttl": "900s",
                            "renewable": False,
                            "meta": {"tasklease": "1", "credential_id": cid},
                        },
                    )
                    if read_creds:
                        task_token = created["auth"]["client_token"]
                        creds = await vault("GET", "database/creds/demo-readonly", task_token, None)
                        await vault(
                            "PUT",
                            "sys/leases/renew",
                            broker_token,
                            {"lease_id": creds["lease_id"], "increment": 898},
                        )
                    await floor_redis.hset(floor_key, cid, record + "a")

                return one

            print(
                f"# {requests_per_cell} requests per cell; latency in ms; throughput in req/s; "
                f"{REPLICAS} broker process(es); OpenBao over "
                f"{'TLS' if openbao_tls else 'plain HTTP'} on every path"
            )
            print(
                "| kind | clients | direct p50 | direct p99 | direct rps | floor p50 | "
                "broker p50 | broker p99 | broker rps | p50 ratio | rps ratio | "
                "broker/floor p50 | broker CPU/issuance | floor CPU/issuance |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            pids = {
                "client": [os.getpid()],
                "broker": [broker.pid for broker in brokers],
                **{
                    name: [process.popen.pid]
                    for name in ("openbao", "redis")
                    if (process := stack.processes[name]).popen is not None
                },
            }
            cpu_rows: list[str] = []
            for kind, target, read_creds in (
                ("database", "demo-db", True),
                ("vault-token", "demo-kv", False),
            ):
                for clients in CONCURRENCY:
                    await _drive(clients, min(clients * 2, 32), direct_call(read_creds))  # warm
                    direct_meter = CpuMeter(pids)
                    direct_meter.start()
                    d_lat, d_wall = await _drive(
                        clients, requests_per_cell, direct_call(read_creds)
                    )
                    direct_cpu = direct_meter.stop()
                    await _drive(clients, min(clients * 2, 32), floor_call(read_creds))  # warm
                    floor_meter = CpuMeter(pids)
                    floor_meter.start()
                    floor_cpu_before = time.process_time()
                    f_lat, _ = await _drive(clients, requests_per_cell, floor_call(read_creds))
                    floor_cpu = (time.process_time() - floor_cpu_before) / requests_per_cell
                    floor_machine = floor_meter.stop()
                    await floor_redis.delete(floor_key)
                    await _drive(clients, min(clients * 2, 32), broker_call(target))  # warm
                    broker_meter = CpuMeter(pids)
                    broker_meter.start()
                    b_lat, b_wall = await _drive(clients, requests_per_cell, broker_call(target))
                    broker_cpu = broker_meter.stop()
                    cpu = broker_cpu["broker"] / requests_per_cell
                    cpu_rows.append(
                        _cpu_row(
                            kind,
                            clients,
                            (direct_cpu, floor_machine, broker_cpu),
                            requests_per_cell,
                        )
                    )
                    d50, d99 = percentile(d_lat, 0.5) * 1e3, percentile(d_lat, 0.99) * 1e3
                    f50 = percentile(f_lat, 0.5) * 1e3
                    b50, b99 = percentile(b_lat, 0.5) * 1e3, percentile(b_lat, 0.99) * 1e3
                    d_rps, b_rps = requests_per_cell / d_wall, requests_per_cell / b_wall
                    print(
                        f"| {kind} | {clients} | {d50:.1f} | {d99:.1f} | {d_rps:.0f} | "
                        f"{f50:.1f} | {b50:.1f} | {b99:.1f} | {b_rps:.0f} | {b50 / d50:.2f} | "
                        f"{b_rps / d_rps:.2f} | {b50 / f50:.2f} | {cpu * 1e3:.2f} ms | "
                        f"{floor_cpu * 1e3:.2f} ms |"
                    )
            print(
                "\nCPU per issuance (ms): the whole machine's busy time during each path's cell "
                "(both cores: every process and the kernel), and some processes' own. On a "
                "machine a path keeps busy, its throughput is about cores ÷ machine CPU per "
                "issuance, so throughput ÷ direct can reach at most direct ÷ that path's "
                "machine CPU (for the floor: what the mandated calls alone allow). 'servers': "
                "the machine less this benchmark's own process (the clients, and the floor's "
                "Python caller); 'broker', 'OpenBao', 'Redis': those processes in the broker "
                "path's cell"
            )
            print(
                "| kind | clients | direct: machine | direct: servers | floor: machine | "
                "floor: servers | broker path: machine | broker | OpenBao | Redis | "
                "direct ÷ floor | direct ÷ floor, servers | direct ÷ broker path |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            print("\n".join(cpu_rows))
            await floor_redis.delete(f"{floor_key}:run")
            await floor_redis.aclose()
            await _openbao_idle_cost(session, bao, bao_ssl, broker_token, stack)
            if FAILURES:
                print(f"\nfailed requests (excluded from latencies): {FAILURES}")
            # Bytes per lease in Redis: every key the ledger holds, over the leases it holds.
            client = redis.Redis.from_url(endpoints.redis_url)
            every_key = list(client.scan_iter(count=1000))
            # The audit streams (tl:audit, tl:audit:run:<id>) are not the ledger: counted apart.
            audit_keys = [k for k in every_key if k.startswith(b"tl:audit")]
            keys = [k for k in every_key if not k.startswith(b"tl:audit")]
            total = sum(client.memory_usage(k) or 0 for k in keys)
            audit_total = sum(client.memory_usage(k) or 0 for k in audit_keys)
            # Leases are fields of their run's `…:leases` hash (see redis_ledger's layout).
            leases = sum(int(client.hlen(k)) for k in keys if k.endswith(b":leases"))
            client.close()
            if leases:
                print(
                    f"\nRedis ledger: {total} bytes in {len(keys)} keys for {leases} leases = "
                    f"{total / leases:.0f} bytes per lease (all indexes included); audit "
                    f"streams: {audit_total} bytes ({audit_total / leases:.0f} per issuance)"
                )
    finally:
        for broker in brokers:
            broker.send_signal(signal.SIGINT)
        for broker in brokers:
            broker.wait(timeout=10)
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)  # the SVIDs' private keys


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument(
        "--openbao-tls",
        action="store_true",
        help="every path reaches OpenBao over its HTTPS listener (default: plain HTTP)",
    )
    arguments = parser.parse_args()
    asyncio.run(main(arguments.requests, openbao_tls=arguments.openbao_tls))
