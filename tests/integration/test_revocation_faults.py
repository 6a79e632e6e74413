"""Revocation under process faults, with brokers as separate OS processes (``python -m broker
serve``) on the real stack, sharing one Redis database and one OpenBao:

* two brokers sweeping the same ledger revoke every due lease exactly once (SECURITY 34);
* ``kill -9`` of a broker in the middle of a sweep, then a new broker: every due lease is
  revoked; the dead broker's claims come back after the visibility timeout (SECURITY 35), and
  the only repeated revocations are of leases it held at the moment it died (harmless);
* the broker and Redis down for longer than every TTL: OpenBao has revoked everything by
  itself meanwhile; on restart the overdue backlog drains oldest first, at most one sweep
  batch per sweep (SECURITY 37);
* the ledger flushed under a running broker: its own reconciler (as bootstrap schedules it)
  revokes the orphaned task tokens once their grace has passed.

What reaches OpenBao is observed by a small forwarding proxy in front of it (the brokers are
pointed at the proxy): it counts ``auth/token/revoke-accessor`` calls per accessor and can hold
them, which is how the kill lands while a sweep holds claims. Whether a token is gone is asked
of OpenBao itself with the root token.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import psycopg
import pytest
import redis
from aiohttp import web
from aiohttp.http_parser import HttpRequestParserPy
from prometheus_client.parser import text_string_to_metric_families

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import Lease, LeaseState, epoch_micros
from broker.core.ports import LeaseSelector
from broker.devstack import REPO_ROOT, DevStack, ManagedProcess, free_port
from broker.errors import LedgerUnavailableError
from tests.conftest import LOG_DIR, remember_secret

pytestmark = pytest.mark.stack

# Redis logical database of this module (test_revocation.py uses 5, the rest 0).
_REDIS_DB = 7
_NAMESPACE = "tl"  # the broker's default ledger namespace
_BUCKETS = 16  # redis.due_buckets default


# --------------------------------------------------------------------------- the OpenBao proxy


class VaultProxy:
    """Forwards every request to OpenBao unchanged; counts ``revoke-accessor`` calls per
    accessor (when forwarded) and, once ``hold_after`` of them passed, holds the next ones
    until :meth:`release`. Keeps no token and logs nothing."""

    REVOKE = "/v1/auth/token/revoke-accessor"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.revokes: collections.Counter[str] = collections.Counter()
        self.forwarded_revokes = 0
        self.hold_after: int | None = None
        self.waiting = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def hold_after_more(self, count: int) -> None:
        """Let ``count`` more revocations through, then hold every further one."""
        self._released.clear()
        self.hold_after = self.forwarded_revokes + count

    def release(self) -> None:
        """Forward the held revocations and hold no more."""
        self.hold_after = None
        self._released.set()

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.path == self.REVOKE:
            if self.hold_after is not None and self.forwarded_revokes >= self.hold_after:
                self.waiting += 1
                try:
                    await self._released.wait()
                finally:
                    self.waiting -= 1
            self.forwarded_revokes += 1
            self.revokes[str(json.loads(body or b"{}").get("accessor", ""))] += 1
        headers = {
            name: request.headers[name]
            for name in ("X-Vault-Token", "X-Vault-Request", "Content-Type")
            if name in request.headers
        }
        assert self._session is not None
        async with self._session.request(
            request.method, f"{self.upstream}{request.path_qs}", data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            reply_headers = {}
            if payload:
                reply_headers["Content-Type"] = upstream.headers.get(
                    "Content-Type", "application/json"
                )
            return web.Response(status=upstream.status, body=payload, headers=reply_headers)


# --------------------------------------------------------------------------- broker processes


@dataclass
class BrokerProcess:
    """``python -m broker serve`` in its own process group, logging JSON to its own file."""

    name: str
    env: dict[str, str]
    port: int
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        log = LOG_DIR / "broker-processes" / f"{self.name}-{uuid.uuid4().hex[:6]}.log"
        self.process = ManagedProcess(
            self.name,
            [sys.executable, "-m", "broker", "serve"],
            log,
            env={**self.env, "TASKLEASE_SERVER__PORT": str(self.port)},
            cwd=REPO_ROOT,
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def kill_9(self) -> None:
        """SIGKILL the whole process group: no cleanup, no flush, claims left behind."""
        popen = self.process.popen
        assert popen is not None and popen.poll() is None
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=10)


class Fleet:
    """Starts broker processes against the stack (and stops them at the end of the test)."""

    def __init__(self, stack: DevStack, base_env: dict[str, str], anonymous: ssl.SSLContext):
        self.stack = stack
        self.base_env = base_env
        self.anonymous = anonymous
        self.started: list[BrokerProcess] = []

    async def start(
        self,
        name: str,
        *,
        vault_addr: str | None = None,
        extra_env: dict[str, str] | None = None,
        tuning: dict[str, str] | None = None,
    ) -> BrokerProcess:
        env = {**self.base_env, **(extra_env or {})}
        if vault_addr is not None:
            env["TASKLEASE_VAULT__ADDR"] = vault_addr
        env.update({f"TASKLEASE_REVOCATION__{k.upper()}": v for k, v in (tuning or {}).items()})
        broker = BrokerProcess(name, env, free_port())
        self.started.append(broker)
        broker.process.start()
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                if not broker.process.alive:
                    pytest.fail(f"{name} exited at start-up:\n{broker.process.log_tail()}")
                try:
                    async with session.get(f"{broker.url}/readyz", ssl=self.anonymous) as ready:
                        if ready.status == 200:
                            return broker
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} not ready within 60 s:\n{broker.process.log_tail()}")
                await asyncio.sleep(0.2)

    def stop_all(self) -> None:
        for broker in self.started:
            broker.process.stop(timeout=20)


# --------------------------------------------------------------------------- clients


def _context(stack: DevStack, directory: Path, spiffe_id: str | None) -> ssl.SSLContext:
    minted = stack.mint_x509_svid(
        spiffe_id or f"spiffe://{stack.trust_domain}/test/x", ttl_seconds=1800
    )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=minted["bundle"])
    context.check_hostname = False  # the broker's SVID has a URI SAN, not a DNS name
    if spiffe_id is not None:
        stem = spiffe_id.rsplit("/", 2)[-2]
        cert, key = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert.write_text(minted["svid"])
        key.write_text(minted["key"])
        key.chmod(0o600)
        context.load_cert_chain(cert, key)
    return context


@dataclass
class Actors:
    orchestrator: ssl.SSLContext
    agent: ssl.SSLContext
    anonymous: ssl.SSLContext
    agent_id: str


@pytest.fixture(scope="module")
def actors(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Actors:
    directory = tmp_path_factory.mktemp("fault-svids")
    agent_id = f"spiffe://{stack.trust_domain}/agent/demo"
    return Actors(
        orchestrator=_context(stack, directory, f"spiffe://{stack.trust_domain}/orchestrator/demo"),
        agent=_context(stack, directory, agent_id),
        anonymous=_context(stack, directory, None),
        agent_id=agent_id,
    )


async def _call(
    session: aiohttp.ClientSession,
    broker: BrokerProcess,
    context: ssl.SSLContext,
    method: str,
    path: str,
    *,
    body: object = None,
) -> tuple[int, dict[str, Any]]:
    async with session.request(method, f"{broker.url}{path}", json=body, ssl=context) as response:
        return response.status, await response.json(content_type=None)


async def start_run(broker: BrokerProcess, actors: Actors) -> str:
    run_id = f"wf-fault-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        status, body = await _call(
            session,
            broker,
            actors.orchestrator,
            "POST",
            "/v1/workflows",
            body={
                "id": run_id,
                "owner": "alice@example.test",
                "purpose": "revocation fault tests OPS-35",
                "ttl_seconds": 900,
                "participants": [actors.agent_id],
            },
        )
    assert status == 201, body
    return run_id


async def issue_many(
    broker: BrokerProcess,
    actors: Actors,
    run_id: str,
    count: int,
    *,
    target: str = "demo-kv",
    ttl: int = 600,
    prefix: str = "t",
) -> list[dict[str, Any]]:
    """``count`` credentials, one task each, 16 requests at a time."""
    pending = list(range(count))
    issued: list[dict[str, Any]] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while pending:
            task = pending.pop()
            status, body = await _call(
                session,
                broker,
                actors.agent,
                "POST",
                "/v1/credentials",
                body={
                    "workflow_id": run_id,
                    "task_id": f"{prefix}-{task}",
                    "target": target,
                    "ttl_seconds": ttl,
                },
            )
            assert status == 201, body
            secret = body["secret"]
            remember_secret(secret.get("token") or secret.get("password") or "")
            issued.append(body)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        await asyncio.gather(*(worker(session) for _ in range(16)))
    return issued


async def complete(broker: BrokerProcess, actors: Actors, run_id: str) -> None:
    async with aiohttp.ClientSession() as session:
        status, body = await _call(
            session,
            broker,
            actors.orchestrator,
            "POST",
            f"/v1/workflows/{run_id}/complete",
            body={"outcome": "completed"},
        )
    assert status == 202, body


async def revocation_counts(broker: BrokerProcess, actors: Actors) -> dict[str, float]:
    """``tasklease_revocations_total`` of a running broker, by outcome (vault-token kind)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/metrics", ssl=actors.anonymous) as response,
    ):
        text = await response.text()
    counts: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tasklease_revocations_total":
                counts[sample.labels["outcome"]] += sample.value
    return counts


# --------------------------------------------------------------------------- the stack's view


async def gone_from_openbao(stack: DevStack, accessors: list[str]) -> dict[str, bool]:
    """Per accessor: True when OpenBao no longer knows the token (root token lookups)."""
    assert stack.endpoints is not None
    headers = {"X-Vault-Token": stack.endpoints.openbao_root_token}
    gate = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, accessor: str) -> bool:
        async with (
            gate,
            session.post(
                f"{stack.endpoints.openbao_addr}/v1/auth/token/lookup-accessor",  # type: ignore[union-attr]
                json={"accessor": accessor},
                headers=headers,
            ) as response,
        ):
            # 403: OpenBao's answer for a token in the middle of its revocation; not gone
            # yet as far as this lookup can tell (callers poll).
            if response.status in (200, 403):
                return False
            body = await response.json(content_type=None)
            assert response.status == 400 and "invalid accessor" in json.dumps(body), body
            return True

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, a) for a in accessors))
    return dict(zip(accessors, results, strict=True))


async def lease_gone_from_openbao(stack: DevStack, lease_id: str) -> bool:
    assert stack.endpoints is not None
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{stack.endpoints.openbao_addr}/v1/sys/leases/lookup",
            json={"lease_id": lease_id},
            headers={"X-Vault-Token": stack.endpoints.openbao_root_token},
        ) as response,
    ):
        if response.status == 200:
            return False
        assert "invalid lease" in await response.text()
        return True


def due_index(client: redis.Redis) -> tuple[int, dict[str, int]]:
    """(items waiting in the due sets, claimed items → their visibility deadline in µs)."""
    waiting = 0
    claimed: dict[str, int] = {}
    for bucket in range(_BUCKETS):
        tag = f"{_NAMESPACE}:{{due:{bucket}}}"
        waiting += int(client.zcard(tag))
        inflight = cast(
            list[tuple[bytes, float]], client.zrange(f"{tag}:inflight", 0, -1, withscores=True)
        )
        for member, score in inflight:
            claimed[member.decode()] = int(score)
    return waiting, claimed


async def leases_of(ledger: RedisLedger, run_id: str) -> dict[str, Lease]:
    found = await ledger.find_leases(LeaseSelector(workflow_id=run_id), limit=10_000)
    return {lease.credential_id: lease for lease in found}


async def until(probe: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    fleet: Fleet
    proxy: VaultProxy
    ledger: RedisLedger
    redis: redis.Redis


@pytest.fixture
async def env(
    stack: DevStack, broker_env: dict[str, str], actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Env]:
    # The proxy must pass the reconciler's `LIST auth/token/accessors`; aiohttp's C parser
    # refuses methods it does not know, its pure-Python one takes any token. Only this test's
    # servers are created meanwhile (the brokers are other processes).
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    assert stack.endpoints is not None
    base, _, database = stack.endpoints.redis_url.rpartition("/")
    assert database == "0"
    url = f"{base}/{_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    base_env = {
        **os.environ,
        "TASKLEASE_REDIS__URL": url,
        "TASKLEASE_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
        # This module's ledger is not the other modules' (db 0): its reconciler must not take
        # their live task tokens for orphans.
        "TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS": "86400",
    }
    proxy = VaultProxy(stack.endpoints.openbao_addr)
    await proxy.start()
    fleet = Fleet(stack, base_env, actors.anonymous)
    ledger = RedisLedger(settings=RedisSettings.model_validate({"url": url}))
    try:
        yield Env(fleet=fleet, proxy=proxy, ledger=ledger, redis=client)
    finally:
        await asyncio.to_thread(fleet.stop_all)
        await proxy.close()
        await ledger.close()
        client.close()


# --------------------------------------------------------------------------- the tests


async def test_two_broker_processes_revoke_every_due_lease_exactly_once(
    stack: DevStack, env: Env, actors: Actors
) -> None:
    """SECURITY 34 across processes: 300 due leases, two brokers sweeping one Redis; small
    batches so both take part. Every token is revoked in OpenBao once, every lease revoked
    once in the ledger, and the brokers' counters add up to exactly 300."""
    count = 300
    tuning = {"sweep_interval_seconds": "0.2", "sweep_batch": "24", "concurrency": "4"}
    first = await env.fleet.start("sweeper-a", vault_addr=env.proxy.url, tuning=tuning)
    second = await env.fleet.start("sweeper-b", vault_addr=env.proxy.url, tuning=tuning)
    run_id = await start_run(first, actors)
    issued = await issue_many(first, actors, run_id, count)
    accessors = {body["credential_id"]: body["token_accessor"] for body in issued}
    await complete(first, actors, run_id)

    async def all_revoked() -> bool:
        leases = await leases_of(env.ledger, run_id)
        return all(lease.state is LeaseState.REVOKED for lease in leases.values())

    await until(all_revoked, within=90, what=f"{count} leases revoked")
    leases = await leases_of(env.ledger, run_id)
    assert set(leases) == set(accessors)
    assert {(x.state, x.revoke_reason, x.attempts) for x in leases.values()} == {
        (LeaseState.REVOKED, "run_completed", 0)
    }
    # What reached OpenBao: one revoke-accessor per token, none for anything else.
    assert env.proxy.revokes == collections.Counter(accessors.values())
    gone = await gone_from_openbao(stack, list(accessors.values()))
    assert all(gone.values())
    # The brokers' own counters: both swept, together exactly once per lease.
    counts = [await revocation_counts(b, actors) for b in (first, second)]
    assert [c["revoked"] > 0 for c in counts] == [True, True], counts
    assert sum(c["revoked"] for c in counts) == count
    assert sum(c.get("already_revoked", 0) + c.get("retrying", 0) for c in counts) == 0
    assert due_index(env.redis) == (0, {})


async def test_a_broker_killed_mid_sweep_leaves_nothing_unrevoked(
    stack: DevStack, env: Env, actors: Actors
) -> None:
    """SECURITY 35: kill -9 while a sweep holds claims (its revocations held at OpenBao's
    door); a new broker revokes every lease, the dead one's claims only after their
    visibility timeout, and repeats only revocations of leases the dead one held."""
    count = 200
    tuning = {
        "sweep_interval_seconds": "0.2",
        "sweep_batch": "64",
        "concurrency": "4",
        "visibility_seconds": "10",
        "revoke_timeout_seconds": "4",
    }
    doomed = await env.fleet.start("doomed", vault_addr=env.proxy.url, tuning=tuning)
    run_id = await start_run(doomed, actors)
    issued = await issue_many(doomed, actors, run_id, count)
    accessors = {body["credential_id"]: body["token_accessor"] for body in issued}
    env.proxy.hold_after_more(40)
    await complete(doomed, actors, run_id)

    async def mid_sweep() -> bool:
        return env.proxy.waiting >= 1

    await until(mid_sweep, within=30, what="a sweep to be waiting on OpenBao")
    doomed.kill_9()
    killed_at = datetime.now(UTC)
    _, stranded = due_index(env.redis)
    at_kill = await leases_of(env.ledger, run_id)
    revoked_by_doomed = sum(1 for x in at_kill.values() if x.state is LeaseState.REVOKED)
    assert stranded, "the kill must land while the sweep holds claims"
    assert 0 < revoked_by_doomed <= 40
    assert all(deadline > epoch_micros(killed_at) for deadline in stranded.values())
    # The held calls reach OpenBao after the broker is gone, as a request in flight would.
    env.proxy.release()

    successor = await env.fleet.start("successor", vault_addr=env.proxy.url, tuning=tuning)

    async def all_revoked() -> bool:
        leases = await leases_of(env.ledger, run_id)
        return all(lease.state is LeaseState.REVOKED for lease in leases.values())

    await until(all_revoked, within=90, what=f"{count} leases revoked after the restart")
    leases = await leases_of(env.ledger, run_id)
    gone = await gone_from_openbao(stack, list(accessors.values()))
    assert all(gone.values())
    for cid, deadline in stranded.items():
        if at_kill[cid].state is not LeaseState.REVOKED:
            revoked_at = leases[cid].revoked_at
            assert revoked_at is not None and epoch_micros(revoked_at) >= deadline, cid
    # At-least-once: a lease revoked twice in OpenBao is one the dead broker held.
    repeated = {a for a, n in env.proxy.revokes.items() if n > 1}
    assert repeated <= {accessors[cid] for cid in stranded}
    assert set(env.proxy.revokes) == set(accessors.values())
    counts = await revocation_counts(successor, actors)
    assert counts["revoked"] == count - revoked_by_doomed
    assert due_index(env.redis) == (0, {})


async def test_broker_and_redis_down_past_every_ttl_then_the_backlog_drains_oldest_first(
    stack: DevStack, env: Env, actors: Actors
) -> None:
    """SECURITY 37: with the broker killed and Redis stopped, OpenBao ends every credential
    at its TTL by itself (lookups say so, the database login fails); on restart the overdue
    backlog is confirmed oldest first, at most one sweep batch per sweep."""
    batch = 8
    tuning = {"sweep_interval_seconds": "1", "sweep_batch": str(batch), "concurrency": "4"}
    first = await env.fleet.start("before-outage", tuning=tuning)
    run_id = await start_run(first, actors)
    issued = await issue_many(first, actors, run_id, 30, ttl=5)
    databases = await issue_many(first, actors, run_id, 2, target="demo-db", ttl=5, prefix="db")
    accessors = [body["token_accessor"] for body in issued + databases]
    lease_ids = [
        lease_id
        for lease in (await leases_of(env.ledger, run_id)).values()
        for lease_id in lease.vault_lease_ids
    ]
    assert len(lease_ids) == 2
    first.kill_9()
    stack.processes["redis"].stop()
    try:
        last_expiry = max(datetime.fromisoformat(b["expires_at"]) for b in issued + databases)
        await asyncio.sleep(max(0.0, (last_expiry - datetime.now(UTC)).total_seconds()) + 1)

        async def openbao_ended_everything() -> bool:
            gone = await gone_from_openbao(stack, accessors)
            leases = [await lease_gone_from_openbao(stack, x) for x in lease_ids]
            return all(gone.values()) and all(leases)

        await until(openbao_ended_everything, within=60, what="OpenBao to end every credential")
        for body in databases:
            with pytest.raises(psycopg.OperationalError):
                await asyncio.to_thread(_pg_login, stack, body["secret"])
    finally:
        stack.restart_redis()

    await env.fleet.start("after-outage", tuning=tuning)

    async def all_revoked() -> bool:
        try:
            leases = await leases_of(env.ledger, run_id)
        except LedgerUnavailableError:
            return False  # this test's own client: pooled connections from before the restart
        return all(lease.state is LeaseState.REVOKED for lease in leases.values())

    await until(all_revoked, within=60, what="the overdue backlog to drain")
    # In due order: expiry, then id (how Redis orders equal scores).
    leases = sorted(
        (await leases_of(env.ledger, run_id)).values(),
        key=lambda x: (x.expires_at, x.credential_id),
    )
    assert {x.revoke_reason for x in leases} == {"ttl_expired"}
    revoked_at = [x.revoked_at for x in leases]
    assert all(r is not None for r in revoked_at)
    # Oldest first: in expiry order, each lease was revoked no later than the next one.
    assert revoked_at == sorted(revoked_at)  # type: ignore[type-var]
    # Bounded: each sweep (one revoked_at) settled at most one batch.
    per_sweep = collections.Counter(revoked_at)
    assert max(per_sweep.values()) <= batch
    assert len(per_sweep) >= len(leases) // batch


async def test_a_running_broker_reconciles_a_flushed_ledger_by_itself(
    stack: DevStack, env: Env, actors: Actors
) -> None:
    """The reconciler as bootstrap runs it (its own schedule, its lock) in a broker process:
    Redis loses the ledger; once the grace has passed, the broker finds the task tokens of the
    credentials it issued and revokes them, and the database login ends."""
    broker = await env.fleet.start(
        "reconciling",
        extra_env={
            "TASKLEASE_VAULT__RECONCILE_INTERVAL_SECONDS": "10",
            "TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS": "30",
        },
    )
    run_id = await start_run(broker, actors)
    issuing = time.monotonic()
    tokens = await issue_many(broker, actors, run_id, 3)
    databases = await issue_many(broker, actors, run_id, 1, target="demo-db", prefix="db")
    accessors = [body["token_accessor"] for body in tokens + databases]
    env.redis.flushdb()
    assert not any((await gone_from_openbao(stack, accessors)).values())

    async def orphans_revoked() -> bool:
        return all((await gone_from_openbao(stack, accessors)).values())

    await until(orphans_revoked, within=75, what="the broker's reconciler to revoke the orphans")
    # Not before the grace: a mint in flight is never cut short. (OpenBao keeps a token's
    # creation time in whole seconds.)
    assert time.monotonic() - issuing >= 29
    with pytest.raises(psycopg.OperationalError):
        await asyncio.to_thread(_pg_login, stack, databases[0]["secret"])


def _pg_login(stack: DevStack, secret: dict[str, Any]) -> None:
    assert stack.endpoints is not None
    psycopg.connect(
        host="127.0.0.1",
        port=stack.endpoints.postgres_port,
        dbname="demo",
        user=secret["username"],
        password=secret["password"],
        connect_timeout=5,
    ).close()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_serve_runs_on_the_configured_event_loop(
    stack: DevStack, env: Env, actors: Actors, event_loop: str
) -> None:
    """``server.event_loop``: a ``serve`` process reports the loop it runs on, and on either
    loop issues over mTLS (keep-alive connections, 16 at a time) and revokes at completion.
    Every line it prints is a JSON object (APScheduler's records included)."""
    broker = await env.fleet.start(
        f"loop-{event_loop}",
        extra_env={"TASKLEASE_SERVER__EVENT_LOOP": event_loop},
        tuning={"sweep_interval_seconds": "0.2"},
    )
    listening = [
        json.loads(line)
        for line in broker.log_path.read_text().splitlines()
        if '"broker.listening"' in line
    ]
    assert [entry["event_loop"] for entry in listening] == [event_loop]
    run_id = await start_run(broker, actors)
    issued = await issue_many(broker, actors, run_id, 40)
    accessors = [body["token_accessor"] for body in issued]
    assert len(set(accessors)) == 40
    assert not any((await gone_from_openbao(stack, accessors)).values())
    await complete(broker, actors, run_id)

    async def all_gone() -> bool:
        return all((await gone_from_openbao(stack, accessors)).values())

    await until(all_gone, within=60, what="every task token revoked at completion")
    broker.process.stop(timeout=20)
    lines = broker.log_path.read_text().splitlines()
    assert all(line.startswith("{") and isinstance(json.loads(line), dict) for line in lines)
    loggers = {json.loads(line).get("logger") for line in lines}
    assert "apscheduler.scheduler" in loggers, loggers
