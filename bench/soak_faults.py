"""A bounded soak under faults that checks SECURITY's two promises end to end: nothing lost
(every issued credential recorded or revoked) and nothing leaked (no credential without a record
and a Vault-enforced expiry).

Starts the real local stack and one broker process (``python -m broker serve``) pointed at
OpenBao through a TCP proxy this process can cut. Agent clients (one SPIFFE ID each, mTLS)
request ``demo-kv`` (vault-token) and ``demo-db`` (database) credentials with short TTLs in a
few workflow runs, each request with its own ``Idempotency-Key``, retrying a 503 (or a lost
answer) with the same key after ``Retry-After``, as a careful client does. Meanwhile a fault
driver, at seeded random intervals, SIGKILLs Redis and restarts it, cuts OpenBao off (every
connection dropped, new ones refused) for a few seconds, completes a run while requests are in
flight (and starts another), force-revokes everything one holder has, or SIGKILLs the broker
itself and starts a new process on the same port (requests cut after a write-ahead, after a
mint, before an answer); TTLs expire throughout.

At the end: the load stops, every run is completed, the sweeper gets a bounded time to revoke
everything, and one reconciler pass runs (as the integration tests construct it). Checked:

* nothing lost: every credential a client got (201), and every one a retry was told exists
  (409 ``idempotency_replayed``), is in the ledger with the accessor the client got; no 5xx
  but the documented 503s (``vault_unavailable``, ``mint_outcome_unknown``,
  ``ledger_unavailable``, ``audit_unavailable``), each with ``Retry-After``; the broker
  still runs;
* nothing leaked: before the reconciler, no task token lives whose lease the ledger says is
  revoked; after it, OpenBao holds no tasklease task token and no ``demo-readonly`` database
  lease (the stack is this soak's own), the ledger no live lease of the soak's runs, and a
  sample of the database logins the clients got is refused by PostgreSQL;
* no secret in this script's output or the broker's log (tests/secret_scan.py, with every
  secret the clients received as known values).

Exit status 1 when a check fails, with the evidence (ids, states, reasons; never a secret).
Not part of ``make test`` or ``make bench``: ``make soak``. Settings (environment):
TASKLEASE_SOAK_SECONDS (load, default 90), TASKLEASE_SOAK_SEED (default random, printed),
TASKLEASE_SOAK_CLIENTS (4), TASKLEASE_SOAK_RUNS (3), TASKLEASE_SOAK_FAULT_GAP ("3,10" s),
TASKLEASE_SOAK_DRAIN_SECONDS (120), TASKLEASE_SOAK_DB_LOGINS (20),
TASKLEASE_SOAK_KEEP_LOGS (keep the broker's log even when every check passed).

    .venv/bin/python bench/soak_faults.py
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psycopg
from _common import broker_env, svid_context, wait_ready

from broker.adapters.clock import SystemClock
from broker.adapters.kinds import all_kinds
from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.vault import HvacVault, VaultMinter
from broker.adapters.workload_api import WorkloadApiSource
from broker.config import RedisSettings, VaultSettings
from broker.core.model import Lease, LeaseState
from broker.core.ports import LeaseSelector, TaskToken
from broker.devstack import (
    REPO_ROOT,
    DevStack,
    ManagedProcess,
    StackEndpoints,
    free_port,
    redis_answers,
)
from broker.errors import TaskleaseError
from broker.reconciler import Reconciler

sys.path.insert(0, str(REPO_ROOT))  # the test suite's secret scanner (tests/ is not installed)
from tests.secret_scan import scan_text

LOAD_SECONDS = float(os.environ.get("TASKLEASE_SOAK_SECONDS", "90"))
SEED = int(os.environ.get("TASKLEASE_SOAK_SEED") or secrets.randbelow(1_000_000))
CLIENTS = int(os.environ.get("TASKLEASE_SOAK_CLIENTS", "4"))
RUNS = int(os.environ.get("TASKLEASE_SOAK_RUNS", "3"))
GAP = tuple(float(x) for x in os.environ.get("TASKLEASE_SOAK_FAULT_GAP", "3,10").split(","))
DRAIN_SECONDS = float(os.environ.get("TASKLEASE_SOAK_DRAIN_SECONDS", "120"))
DB_LOGINS = int(os.environ.get("TASKLEASE_SOAK_DB_LOGINS", "20"))
KEEP_LOGS = os.environ.get("TASKLEASE_SOAK_KEEP_LOGS", "") not in ("", "0")

TARGETS = {"demo-kv": "vault-token", "demo-db": "database"}
TTL_RANGE = (20, 40)
ATTEMPTS = 8  # per request, the first included
DOCUMENTED_503 = {"vault_unavailable", "mint_outcome_unknown", "ledger_unavailable"}
DOCUMENTED_503 |= {"audit_unavailable"}
FAULTS = ("redis_kill", "openbao_cut", "complete_run", "force_revoke_holder", "broker_kill")
OWNER = "soak@example.test"
DB_LEASE_PREFIX = "database/creds/demo-readonly/"

_OUTPUT: list[str] = []  # everything printed, scanned for secrets at the end


def say(line: str = "") -> None:
    """Print ``line`` (and keep it for the secret scan)."""
    _OUTPUT.append(line)
    print(line, flush=True)


# --------------------------------------------------------------------------- OpenBao proxy


class CuttableProxy:
    """Forwards TCP to OpenBao. :meth:`cut` drops every open connection and refuses new ones
    until :meth:`restore`: to the broker, OpenBao is unreachable (a request in flight may have
    been acted on, exactly like a network cut after the server acted)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 8200
        self.blocked = False
        self.dropped = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        self.blocked = True
        for task in list(self._tasks):
            self.dropped += 1
            task.cancel()

    def restore(self) -> None:
        self.blocked = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            self.refused += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)

            async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()

            pumps = [
                asyncio.create_task(pump(reader, up_writer)),
                asyncio.create_task(pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for one in pumps:
                    one.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)


# --------------------------------------------------------------------------- what was seen


@dataclass
class Issued:
    credential_id: str
    accessor: str
    kind: str
    run_id: str
    holder: str


@dataclass
class Seen:
    """What the clients and the fault driver saw (secrets only in ``known`` and ``logins``,
    never printed)."""

    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    issued: list[Issued] = field(default_factory=list)
    replayed: dict[str, str] = field(default_factory=dict)  # credential id → run id
    logins: list[tuple[str, str]] = field(default_factory=list)  # (username, password)
    known: list[str] = field(default_factory=list)
    no_retry_after: int = 0
    server_errors: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    fault_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0


@dataclass
class Soak:
    stack: DevStack
    endpoints: StackEndpoints
    proxy: CuttableProxy
    session: aiohttp.ClientSession
    url: str
    orchestrator: ssl.SSLContext
    admin: ssl.SSLContext
    agents: dict[str, ssl.SSLContext]
    seen: Seen = field(default_factory=Seen)
    active_runs: list[str] = field(default_factory=list)
    all_runs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    broker: ManagedProcess | None = None

    def stamp(self) -> str:
        return f"t+{time.monotonic() - self.started:6.1f}s"

    async def call(
        self,
        context: ssl.SSLContext,
        method: str,
        path: str,
        body: object = None,
        *,
        headers: dict[str, str] | None = None,
        seconds: float = 30,
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        async with self.session.request(
            method,
            f"{self.url}{path}",
            json=body,
            ssl=context,
            headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=seconds),
        ) as response:
            payload = await response.json(content_type=None)
            return response.status, payload if isinstance(payload, dict) else {}, response.headers

    def note(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str], what: str
    ) -> None:
        """Count an answer; remember every 5xx that is not a documented 503."""
        code = str(body.get("code", "")) if status >= 400 else ""
        reason = str(body.get("reason", "")) if status >= 400 else ""
        self.seen.answers[f"{what} {status} {code} {reason}".strip()] += 1
        if status >= 500:
            if status != 503 or code not in DOCUMENTED_503:
                self.seen.server_errors.append(f"{what}: {status} {code} {reason}")
            elif "Retry-After" not in headers:
                self.seen.no_retry_after += 1

    async def orchestrate(self, method: str, path: str, body: object, what: str) -> int:
        """An orchestrator call retried on 503 and lost answers (up to ~30 s): its status."""
        status = 0
        for _ in range(30):
            try:
                status, answer, headers = await self.call(self.orchestrator, method, path, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.seen.answers[f"{what} transport {type(exc).__name__}"] += 1
                await asyncio.sleep(1)
                continue
            self.note(status, answer, headers, what)
            if status != 503:
                return status
            await asyncio.sleep(1)
        return status

    async def start_run(self) -> str:
        run_id = f"wf-soak-{uuid.uuid4().hex[:8]}"
        body = {
            "id": run_id,
            "owner": OWNER,
            "purpose": "fault soak (bench/soak_faults.py)",
            "ttl_seconds": 3600,
            "participants": list(self.agents),
        }
        status = await self.orchestrate("POST", "/v1/workflows", body, "start_run")
        if status != 201:
            raise SystemExit(f"could not start run {run_id}: {status}")
        self.active_runs.append(run_id)
        self.all_runs.append(run_id)
        return run_id

    async def complete_run(self, run_id: str) -> int:
        with contextlib.suppress(ValueError):
            self.active_runs.remove(run_id)
        return await self.orchestrate(
            "POST", f"/v1/workflows/{run_id}/complete", {"outcome": "completed"}, "complete"
        )

    # ------------------------------------------------------------------ the agents

    async def request(self, agent: str, rng: random.Random, number: int) -> None:
        """One credential request, retried with the same key like a careful client."""
        if not self.active_runs:
            await asyncio.sleep(0.5)
            return
        run_id = rng.choice(self.active_runs)
        target = rng.choice(sorted(TARGETS))
        body = {
            "workflow_id": run_id,
            "task_id": f"{agent.rsplit('/', 1)[-1]}-{number}",
            "target": target,
            "ttl_seconds": rng.randint(*TTL_RANGE),
            "justification": "fault soak",
        }
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        self.seen.requests += 1
        for _ in range(ATTEMPTS):
            try:
                status, answer, reply_headers = await self.call(
                    self.agents[agent], "POST", "/v1/credentials", body, headers=headers
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.seen.answers[f"credentials transport {type(exc).__name__}"] += 1
                await asyncio.sleep(1 + rng.random() / 2)
                continue
            self.note(status, answer, reply_headers, "credentials")
            if status == 201:
                secret = answer.get("secret") or {}
                if target == "demo-db":
                    self.seen.logins.append((str(secret["username"]), str(secret["password"])))
                    self.seen.known.append(str(secret["password"]))
                else:
                    self.seen.known.append(str(secret.get("token", "")))
                self.seen.issued.append(
                    Issued(
                        credential_id=str(answer["credential_id"]),
                        accessor=str(answer.get("token_accessor", "")),
                        kind=TARGETS[target],
                        run_id=run_id,
                        holder=agent,
                    )
                )
                self.seen.outcomes["issued"] += 1
                return
            if status == 409 and answer.get("code") == "idempotency_replayed":
                self.seen.replayed[str(answer["credential_id"])] = run_id
                self.seen.outcomes["replayed (secret lost with an earlier answer)"] += 1
                return
            if status != 503:
                self.seen.outcomes[f"refused {status} {answer.get('code', '')}"] += 1
                return
            await asyncio.sleep(float(reply_headers.get("Retry-After", "1")) + rng.random() / 2)
        self.seen.outcomes["gave up after retries"] += 1

    async def agent_loop(self, agent: str, rng: random.Random, stop: asyncio.Event) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            await self.request(agent, rng, number)
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    # ------------------------------------------------------------------ the faults

    async def redis_kill(self, rng: random.Random) -> str:
        down = round(rng.uniform(0, 3), 1)
        process = self.stack.processes["redis"]
        popen = process.popen
        assert popen is not None
        os.kill(popen.pid, signal.SIGKILL)
        await asyncio.to_thread(popen.wait, 10)
        await asyncio.sleep(down)
        # Started from this (the main) thread: the stack's children die with the thread that
        # started them (PR_SET_PDEATHSIG).
        process.start()
        password = urlsplit(self.endpoints.redis_url).password or ""
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(_answers, self.endpoints.redis_port, password):
            if time.monotonic() > deadline:
                raise SystemExit("Redis did not come back within 30 s")
            await asyncio.sleep(0.1)
        return f"SIGKILL, down {down} s, restarted"

    async def broker_kill(self, rng: random.Random) -> str:
        """The broker dies mid-flight (SIGKILL: no shutdown, requests cut wherever they
        were: after a write-ahead, after a mint, before an answer) and a new process starts
        on the same port; clients ask again with the same key."""
        assert self.broker is not None
        popen = self.broker.popen
        assert popen is not None
        os.kill(popen.pid, signal.SIGKILL)
        await asyncio.to_thread(popen.wait, 10)
        down = round(rng.uniform(0, 2), 1)
        await asyncio.sleep(down)
        # Started from this (the main) thread, like the stack's processes.
        self.broker.start()
        started = time.monotonic()
        await wait_ready(self.session, self.url, self.orchestrator)
        return f"SIGKILL, down {down} s, restarted, ready after {time.monotonic() - started:.1f} s"

    async def openbao_cut(self, rng: random.Random) -> str:
        down = round(rng.uniform(1, 4), 1)
        dropped = self.proxy.dropped
        self.proxy.cut()
        await asyncio.sleep(down)
        self.proxy.restore()
        return f"unreachable {down} s, {self.proxy.dropped - dropped} connections dropped"

    async def complete_some_run(self, rng: random.Random) -> str:
        if not self.active_runs:
            return "no active run"
        run_id = rng.choice(self.active_runs)
        status = await self.complete_run(run_id)
        replacement = await self.start_run()
        return f"{run_id} completed ({status}), {replacement} started"

    async def force_revoke_holder(self, rng: random.Random) -> str:
        holder = rng.choice(sorted(self.agents))
        body = {"selector": {"holder": holder}, "reason": "fault soak"}
        try:
            status, report, headers = await self.call(
                self.admin, "POST", "/v1/revocations", body, seconds=120
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.seen.answers[f"revocations transport {type(exc).__name__}"] += 1
            return f"{holder}: no answer ({type(exc).__name__})"
        self.note(status, report, headers, "revocations")
        if status not in (200, 207):
            return f"{holder}: {status} {report.get('code')} {report.get('reason')}"
        live = collections.Counter(str(x.get("reason")) for x in report.get("still_live", []))
        return (
            f"{holder}: {status}, {len(report.get('confirmed_revoked', []))} confirmed, "
            f"still live {dict(live)}"
        )

    async def fault_loop(self, rng: random.Random, until: float) -> None:
        actions = {
            "redis_kill": self.redis_kill,
            "openbao_cut": self.openbao_cut,
            "complete_run": self.complete_some_run,
            "force_revoke_holder": self.force_revoke_holder,
            "broker_kill": self.broker_kill,
        }
        while True:
            gap = rng.uniform(*GAP)
            if time.monotonic() + gap >= until:
                return
            await asyncio.sleep(gap)
            kind = rng.choice(FAULTS)
            at = self.stamp()
            outcome = await actions[kind](rng)
            self.seen.fault_counts[kind] += 1
            line = f"{at} {kind}: {outcome}"
            self.seen.faults.append(line)
            say(f"  fault {line}")


def _answers(port: int, password: str) -> bool:
    try:
        return redis_answers(port, password)
    except OSError:
        return False


# --------------------------------------------------------------------------- the checks


async def drain(ledger: RedisLedger, runs: list[str], within: float) -> dict[str, Lease]:
    """Wait (bounded) until no lease of ``runs`` is live; every lease of them at the end."""
    deadline = time.monotonic() + within
    while True:
        leases: dict[str, Lease] = {}
        try:
            for run_id in runs:
                selector = LeaseSelector(workflow_id=run_id)
                async for batch in ledger.iter_leases(selector, batch=1000):
                    leases.update({lease.credential_id: lease for lease in batch})
        except TaskleaseError as exc:
            say(f"   reading the ledger failed ({exc.reason}); retrying")
            leases = {}
        live = [x for x in leases.values() if x.is_live]
        if leases and not live:
            return leases
        if time.monotonic() > deadline:
            return leases
        await asyncio.sleep(2)


async def db_leases_alive(endpoints: StackEndpoints) -> list[str]:
    """The ``demo-readonly`` database leases OpenBao holds (root token; ids only)."""
    headers = {"X-Vault-Token": endpoints.openbao_root_token}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            "LIST",
            f"{endpoints.openbao_addr}/v1/sys/leases/lookup/{DB_LEASE_PREFIX}",
            headers=headers,
        ) as response,
    ):
        if response.status == 404:
            return []
        body = await response.json()
        return [f"{DB_LEASE_PREFIX}{k}" for k in (body.get("data") or {}).get("keys") or []]


async def token_alive(endpoints: StackEndpoints, accessor: str) -> bool:
    """Whether OpenBao still knows the token behind ``accessor`` (root token lookup)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{endpoints.openbao_addr}/v1/auth/token/lookup-accessor",
            json={"accessor": accessor},
            headers={"X-Vault-Token": endpoints.openbao_root_token},
        ) as response,
    ):
        return response.status == 200


def login_refused(endpoints: StackEndpoints, username: str, password: str) -> bool:
    try:
        psycopg.connect(
            host="127.0.0.1",
            port=endpoints.postgres_port,
            dbname="demo",
            user=username,
            password=password,
            connect_timeout=5,
        ).close()
    except psycopg.OperationalError:
        return True
    return False


def describe(lease: Lease | None) -> str:
    if lease is None:
        return "absent from the ledger"
    return (
        f"{lease.state.value} reason={lease.revoke_reason or '-'} attempts={lease.attempts} "
        f"last_error={lease.last_error[:120] or '-'} expires_at={lease.expires_at.isoformat()}"
    )


async def check(soak: Soak, broker: ManagedProcess, workdir: Path) -> list[str]:
    """Every check; the failures (evidence, never a secret)."""
    failures: list[str] = []
    seen = soak.seen
    endpoints = soak.endpoints
    ledger = RedisLedger(settings=RedisSettings.model_validate({"url": endpoints.redis_url}))
    source = WorkloadApiSource(socket_path=f"unix://{endpoints.spire_agent_socket}")
    await source.start()
    vault = HvacVault(
        settings=VaultSettings(addr=endpoints.openbao_addr),
        jwt_svid=source.fetch_jwt_svid,
        now=SystemClock().now,
    )
    minter = VaultMinter(vault=vault, kinds=all_kinds(), now=SystemClock().now)
    try:
        await vault.login()
        # Right after the completions, while the TTLs still run: which task tokens are alive,
        # and what the ledger says of each. Alive although the ledger says revoked (confirmed
        # once more after reading the ledger: the sweeper works meanwhile) is a lie.
        at_completion = await minter.task_tokens(limit=10_000)
        by_state: collections.Counter[str] = collections.Counter()
        for token in at_completion:
            lease = await ledger.get_lease(token.credential_id)
            recorded = lease is not None and lease.token_accessor == token.accessor
            state = lease.state.value if lease is not None else "absent"
            by_state[state if recorded else f"{state} (accessor not recorded)"] += 1
            if (
                lease is not None
                and lease.state is LeaseState.REVOKED
                and await token_alive(endpoints, token.accessor)
            ):
                failures.append(
                    f"leaked: token of {token.credential_id} alive in OpenBao although the "
                    f"ledger says revoked ({describe(lease)})"
                )
        say(
            f"\n## at completion: {len(at_completion)} task tokens alive in OpenBao; their "
            f"ledger state: {dict(by_state)}"
        )
        say(f"## drain: waiting up to {DRAIN_SECONDS:.0f} s for the sweeper")
        started = time.monotonic()
        leases = await drain(ledger, soak.all_runs, DRAIN_SECONDS)
        live = {cid: x for cid, x in leases.items() if x.is_live}
        states = collections.Counter((x.state.value, x.revoke_reason) for x in leases.values())
        if len(leases) < len(seen.issued):
            failures.append(
                f"the ledger listed {len(leases)} leases for the soak's runs, fewer than the "
                f"{len(seen.issued)} credentials handed out"
            )
        say(
            f"   {len(leases)} leases in the ledger for the soak's {len(soak.all_runs)} runs; "
            f"{len(live)} still live after {time.monotonic() - started:.0f} s; by state and "
            f"reason: {dict(states)}"
        )

        # ---- before the reconciler: a live token the ledger calls revoked is a lie.
        before = await minter.task_tokens(limit=10_000)
        orphans: list[TaskToken] = []
        for token in before:
            lease = leases.get(token.credential_id) or await ledger.get_lease(token.credential_id)
            if (
                lease is not None
                and lease.state is LeaseState.REVOKED
                and await token_alive(endpoints, token.accessor)
            ):
                failures.append(
                    f"leaked: token of {token.credential_id} alive in OpenBao although the "
                    f"ledger says revoked ({describe(lease)})"
                )
            elif lease is None or lease.token_accessor != token.accessor:
                orphans.append(token)
        say(
            f"   before the reconciler: {len(before)} tasklease task tokens alive in OpenBao, "
            f"{len(orphans)} of them unknown to the ledger (orphans)"
        )
        for token in orphans:
            lease = await ledger.get_lease(token.credential_id)
            say(f"     orphan {token.credential_id}: {describe(lease)}")

        reconciler = Reconciler(
            inventory=minter,
            minter=minter,
            ledger=ledger,
            locks=InMemoryLedger(),
            clock=SystemClock(),
            grace=timedelta(0),
        )
        report = await reconciler.reconcile()
        say(
            f"   reconciler pass: examined {report.examined}, revoked {len(report.revoked)}, "
            f"failed {len(report.failed)}, known to the ledger {report.known}"
        )

        # ---- nothing leaked
        after = await minter.task_tokens(limit=10_000)
        for token in after:
            lease = await ledger.get_lease(token.credential_id)
            failures.append(
                f"leaked: task token of {token.credential_id} (accessor {token.accessor}, "
                f"expires {token.expires_at}) still alive after the reconciler: {describe(lease)}"
            )
        for cid, lease in live.items():
            failures.append(f"leaked: lease {cid} ({lease.kind}) still live: {describe(lease)}")
        db_alive = await db_leases_alive(endpoints)
        failures.extend(f"leaked: OpenBao database lease {x} still live" for x in db_alive)
        sample = random.Random(SEED).sample(seen.logins, min(DB_LOGINS, len(seen.logins)))
        refused = await asyncio.gather(
            *(asyncio.to_thread(login_refused, endpoints, u, p) for u, p in sample)
        )
        for (username, _), was_refused in zip(sample, refused, strict=True):
            if not was_refused:
                failures.append(f"leaked: PostgreSQL role {username} can still log in")
        say(
            f"   after: {len(after)} task tokens alive, {len(db_alive)} database leases alive, "
            f"{sum(refused)}/{len(sample)} sampled database logins refused"
        )

        # ---- nothing lost
        missing = 0
        for issued in seen.issued:
            lease = leases.get(issued.credential_id) or await ledger.get_lease(issued.credential_id)
            if lease is None:
                missing += 1
                failures.append(
                    f"lost: {issued.credential_id} ({issued.kind}, run {issued.run_id}, "
                    f"holder {issued.holder}) was handed out (201) but is not in the ledger"
                )
            elif issued.accessor and lease.token_accessor != issued.accessor:
                failures.append(
                    f"lost: {issued.credential_id}: the ledger records another token accessor "
                    f"than the one handed out ({describe(lease)})"
                )
        replay_states: collections.Counter[str] = collections.Counter()
        for cid, run_id in seen.replayed.items():
            lease = leases.get(cid) or await ledger.get_lease(cid)
            replay_states[lease.state.value if lease is not None else "absent"] += 1
            if lease is None and any(t.credential_id == cid for t in before):
                failures.append(
                    f"lost: {cid} (run {run_id}, replayed to its client) has a task token in "
                    "OpenBao but no ledger record"
                )
        say(
            f"   {len(seen.issued)} credentials handed out, {missing} missing from the ledger; "
            f"{len(seen.replayed)} replayed ids, in the ledger as {dict(replay_states)}"
        )
        failures.extend(f"5xx not documented: {x}" for x in seen.server_errors)
        if seen.no_retry_after:
            failures.append(f"{seen.no_retry_after} answers 503 without Retry-After")
        if not broker.alive:
            failures.append("the broker process died during the soak")
    finally:
        await minter.close()
        await ledger.close()
        vault.close()
        source.close()

    # ---- no secret in what was printed or logged
    known = [k for k in seen.known if k]
    findings = scan_text("\n".join(_OUTPUT), path=Path("<stdout>"), known=known)
    findings += scan_text(
        broker.log_path.read_text(errors="replace"), path=broker.log_path, known=known
    )
    failures.extend(f"secret in {f.path} line {f.line}: {f.kind}" for f in findings)
    say(f"   secret scan of stdout and the broker's log: {len(findings)} findings")
    return failures


# --------------------------------------------------------------------------- main


async def main() -> int:
    say(
        f"# fault soak: seed {SEED} (TASKLEASE_SOAK_SEED={SEED} repeats the fault schedule), "
        f"{LOAD_SECONDS:.0f} s of load, {CLIENTS} agents, {RUNS} runs, faults every "
        f"{GAP[0]:g}-{GAP[1]:g} s; the machine may be shared"
    )
    stack = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m")
    endpoints = stack.start()
    workdir = Path(tempfile.mkdtemp(prefix="tl-soak-"))
    proxy = CuttableProxy(endpoints.openbao_addr)
    await proxy.start()
    port = free_port()
    env = broker_env(
        endpoints,
        TASKLEASE_SERVER__PORT=str(port),
        TASKLEASE_VAULT__ADDR=proxy.url,
        TASKLEASE_LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
        # Bounded: retries of a failed revocation come back within the drain window.
        TASKLEASE_REVOCATION__SWEEP_INTERVAL_SECONDS="1",
        TASKLEASE_REVOCATION__BACKOFF_CAP_SECONDS="5",
        TASKLEASE_REVOCATION__FAILED_RETRY_INTERVAL_SECONDS="10",
        # The broker's own reconciler runs during the soak too (its shortest settings).
        TASKLEASE_VAULT__RECONCILE_INTERVAL_SECONDS="30",
        TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS="30",
    )
    broker = ManagedProcess(
        "broker",
        [sys.executable, "-m", "broker", "serve"],
        workdir / "broker.log",
        env=env,
        cwd=REPO_ROOT,
    )
    broker.start()
    failures: list[str] = []
    try:
        url = f"https://127.0.0.1:{port}"
        td = endpoints.trust_domain
        agent_ids = [f"spiffe://{td}/agent/soak-{i}" for i in range(CLIENTS)]
        agents = {a: svid_context(stack, a, workdir, f"agent{i}") for i, a in enumerate(agent_ids)}
        orchestrator = svid_context(stack, endpoints.workload_ids["orchestrator"], workdir, "orch")
        admin = svid_context(stack, endpoints.workload_ids["admin"], workdir, "admin")
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, url, orchestrator)
            soak = Soak(
                stack=stack,
                endpoints=endpoints,
                proxy=proxy,
                session=session,
                url=url,
                orchestrator=orchestrator,
                admin=admin,
                agents=agents,
                broker=broker,
            )
            for _ in range(RUNS):
                await soak.start_run()
            say(f"## load: {len(soak.active_runs)} runs started, {CLIENTS} agents requesting")
            stop = asyncio.Event()
            until = time.monotonic() + LOAD_SECONDS
            clients = [
                asyncio.create_task(soak.agent_loop(a, random.Random(f"{SEED}-{a}"), stop))
                for a in agent_ids
            ]
            await soak.fault_loop(random.Random(SEED), until)
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            stop.set()
            await asyncio.gather(*clients)
            proxy.restore()
            for run_id in list(soak.active_runs):
                status = await soak.complete_run(run_id)
                if status != 202:
                    failures.append(f"completing {run_id} at the end answered {status}")
            seen = soak.seen
            say(
                f"## load over: {seen.requests} credential requests "
                f"({sum(seen.answers[k] for k in seen.answers if k.startswith('credentials'))} "
                f"answers incl. retries), {len(seen.faults)} faults {dict(seen.fault_counts)}"
            )
            say(f"   outcomes: {dict(seen.outcomes)}")
            say("   answers by code/reason:")
            for key, count in sorted(seen.answers.items()):
                say(f"     {count:6d}  {key}")
            failures += await check(soak, broker, workdir)
    finally:
        broker.stop(timeout=20)
        await proxy.close()
        stack.stop()
        for pem in workdir.glob("*-key.pem"):  # noqa: ASYNC240 - a few files, at the end
            pem.unlink()
    say()
    if failures:
        say(f"## FAILED: {len(failures)} invariant violations (seed {SEED})")
        for failure in failures:
            say(f"   - {failure}")
        say(f"   the broker's log is kept: {broker.log_path}")
        return 1
    say(f"## PASSED: nothing lost, nothing leaked (seed {SEED})")
    if KEEP_LOGS:
        say(f"   the broker's log is kept: {broker.log_path}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
