"""Issuance under faults on the real stack: a lost mint response (SECURITY 23), a definite
refusal (24) and Redis restarted or losing data between the write-ahead and the record (32).

The invariant every test checks: no credential leaves the broker without a durable record, and
no credential Vault minted outlives the failure unrecorded (zero live leases afterwards).

A small TCP proxy sits between the broker and OpenBao; told to, it lets one kind of request
reach OpenBao (which does the work) and then swallows the answer and drops the connection —
exactly what a timeout or a network cut after the server acted looks like to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import psycopg
import pytest
import redis

from broker.adapters.clock import SystemClock
from broker.adapters.memory_ledger import InMemoryLedger
from broker.bootstrap import RunningBroker
from broker.core.ports import MintedCredential, MintSpec
from broker.devstack import DevStack
from broker.reconciler import Reconciler
from tests.conftest import remember_secret
from tests.integration.clients import StartBroker, call, client_context, start_run, workload_id
from tests.integration.clients import openbao_root as _root

pytestmark = pytest.mark.stack

DB_LEASES = "database/creds/demo-readonly"


class SwallowingProxy:
    """Forwards TCP to OpenBao; a request whose first bytes contain ``swallow`` is delivered,
    its answer read from OpenBao and thrown away, and the client connection cut."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 8200
        self.swallow: bytes | None = None
        self.swallowed = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            return
        swallowing = asyncio.Event()

        async def client_to_upstream() -> None:
            while chunk := await reader.read(65536):
                if self.swallow is not None and self.swallow in chunk:
                    swallowing.set()
                up_writer.write(chunk)
                await up_writer.drain()

        async def upstream_to_client() -> None:
            while chunk := await up_reader.read(65536):
                if swallowing.is_set():
                    # OpenBao answered, so it did the work; the broker never hears of it.
                    self.swallowed += 1
                    return
                writer.write(chunk)
                await writer.drain()

        pumps = [
            asyncio.create_task(client_to_upstream()),
            asyncio.create_task(upstream_to_client()),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy is closing
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)


@pytest.fixture
async def proxy(stack: DevStack) -> AsyncIterator[SwallowingProxy]:
    assert stack.endpoints is not None
    proxy = SwallowingProxy(stack.endpoints.openbao_addr)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def _db_leases(root: hvac.Client) -> set[str]:
    try:
        keys = root.sys.list_leases(prefix=DB_LEASES)["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return set()
    return {str(k) for k in keys}


def _token_alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return False
    return True


async def _run_and_request(
    stack: DevStack, broker: RunningBroker, tmp_path: Path, *, task: str = "task-1"
) -> tuple[str, int, dict[str, Any]]:
    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
    run_id = f"wf-fault-{os.urandom(3).hex()}"
    await start_run(
        stack, broker, orchestrator, run_id, owner="alice@example.test", purpose="fault test"
    )
    status, body = await call(
        broker,
        agent,
        "POST",
        "/v1/credentials",
        json_body={"workflow_id": run_id, "task_id": task, "target": "demo-db", "ttl_seconds": 120},
    )
    return run_id, status, body


async def _credentials(
    stack: DevStack, broker: RunningBroker, tmp_path: Path, run_id: str
) -> list[dict[str, Any]]:
    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    status, run = await call(broker, orchestrator, "GET", f"/v1/workflows/{run_id}")
    assert status == 200, run
    credentials: list[dict[str, Any]] = run["credentials"]
    return credentials


def _after_mint(
    broker: RunningBroker, fault: Callable[[], Awaitable[None]]
) -> Callable[[MintSpec], Coroutine[Any, Any, MintedCredential]]:
    """Wrap the broker's real minter: mint for real, then inject ``fault`` before the record."""
    real = broker.runtime.minter.mint

    async def mint(spec: MintSpec) -> MintedCredential:
        minted = await real(spec)
        await fault()
        return minted

    return mint


# --------------------------------------------------------------------------- SECURITY 23


async def test_a_lost_token_creation_answer_leaves_no_live_credential(
    stack: DevStack, start: StartBroker, proxy: SwallowingProxy, tmp_path: Path
) -> None:
    """OpenBao created the task token but the answer never arrived: 503 mint_outcome_unknown,
    the write-ahead record stays (issuing, due), and the reconciler revokes the token it finds
    by its metadata. Afterwards nothing of it is live."""
    root = _root(stack)
    broker = await start(TASKLEASE_VAULT__ADDR=proxy.url)
    leases_before = _db_leases(root)
    proxy.swallow = b"POST /v1/auth/token/create/"
    run_id, status, body = await _run_and_request(stack, broker, tmp_path)
    proxy.swallow = None
    assert (status, body["code"], body["reason"]) == (
        503,
        "mint_outcome_unknown",
        "vault.mint_outcome_unknown",
    ), body
    assert proxy.swallowed == 1
    [record] = await _credentials(stack, broker, tmp_path, run_id)
    assert record["state"] == "issuing"

    # OpenBao holds the token the broker never saw; only its metadata names the credential.
    tokens = [
        t
        for t in await broker.runtime.minter.task_tokens(limit=10_000)
        if t.credential_id == record["credential_id"]
    ]
    assert len(tokens) == 1
    assert _token_alive(root, tokens[0].accessor)

    reconciler = Reconciler(
        inventory=broker.runtime.minter,
        minter=broker.runtime.minter,
        ledger=broker.runtime.ledger,
        # A lock of its own: the shared one may be held by the broker's own start-up pass
        # (it looks up every task token of the session, and skips this one: younger than its
        # grace) or, for up to its TTL, by a broker an earlier test stopped mid-pass.
        locks=InMemoryLedger(),
        clock=SystemClock(),
        grace=timedelta(0),
    )
    report = await reconciler.reconcile()
    assert tokens[0].accessor in report.revoked
    assert not _token_alive(root, tokens[0].accessor)
    assert _db_leases(root) <= leases_before  # no database credential was ever read


async def test_a_lost_secret_answer_revokes_the_token_and_leaves_no_record(
    stack: DevStack, start: StartBroker, proxy: SwallowingProxy, tmp_path: Path
) -> None:
    """The database credential was created under the task token but its answer was lost: the
    broker still holds the token's accessor, revokes it (and the lease with it), answers 503
    and keeps no record. The lease OpenBao created is gone."""
    root = _root(stack)
    broker = await start(TASKLEASE_VAULT__ADDR=proxy.url)
    leases_before = _db_leases(root)
    proxy.swallow = f"GET /v1/{DB_LEASES}".encode()
    run_id, status, body = await _run_and_request(stack, broker, tmp_path)
    proxy.swallow = None
    assert (status, body["code"]) == (503, "vault_unavailable"), body
    # aiohttp retries an idempotent GET once on a dropped keep-alive connection: OpenBao may
    # have created two credentials under the token; both went with it.
    assert proxy.swallowed >= 1
    assert await _credentials(stack, broker, tmp_path, run_id) == []
    assert _db_leases(root) <= leases_before


# --------------------------------------------------------------------------- SECURITY 24


async def test_a_refused_mint_is_a_clear_error_and_leaves_no_record(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """A 403 on mint (the task token may not read the target: policy revoked in OpenBao) →
    503 vault_unavailable with the reason, no record, and a retry with the same idempotency
    key is not a replay of a credential that never existed."""
    root = _root(stack)
    broker = await start()
    policy = root.sys.read_policy("target-demo-db")["data"]["rules"]
    root.sys.create_or_update_policy("target-demo-db", 'path "sys/nothing" { capabilities = [] }')
    try:
        run_id, status, body = await _run_and_request(stack, broker, tmp_path)
    finally:
        root.sys.create_or_update_policy("target-demo-db", policy)
    assert (status, body["code"], body["reason"]) == (503, "vault_unavailable", "vault.forbidden")
    assert await _credentials(stack, broker, tmp_path, run_id) == []


# --------------------------------------------------------------------------- SECURITY 32


async def test_redis_killed_and_restarted_between_write_ahead_and_record(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """Redis is killed (SIGKILL) and restarted after the write-ahead, while Vault mints: the
    write-ahead survived (appendfsync always), so activation goes through on the restarted
    server, the credential is returned only then, and the record is durable and active."""
    broker = await start()

    async def crash_redis() -> None:
        process = stack.processes["redis"].popen
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        # On this thread, not a worker thread: the stack's children die with the thread that
        # started them (PR_SET_PDEATHSIG), and this Redis must outlive the test.
        stack.restart_redis()

    broker.runtime.minter.mint = _after_mint(broker, crash_redis)  # type: ignore[method-assign,assignment]
    run_id, status, body = await _run_and_request(stack, broker, tmp_path)
    assert status == 201, (body.get("reason"), body.get("detail"))
    remember_secret(body["secret"]["password"])
    [record] = await _credentials(stack, broker, tmp_path, run_id)
    assert (record["credential_id"], record["state"]) == (body["credential_id"], "active")
    assert stack.endpoints is not None
    with psycopg.connect(
        host="127.0.0.1",
        port=stack.endpoints.postgres_port,
        dbname="demo",
        user=body["secret"]["username"],
        password=body["secret"]["password"],
        connect_timeout=5,
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_redis_losing_the_write_ahead_record_fails_closed(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """Redis loses its data between the write-ahead and the record (a failover to a stale
    replica, say): activation finds no record, so the freshly minted credential is revoked at
    once and the agent gets 503 ledger_unavailable, never the secret."""
    root = _root(stack)
    broker = await start()
    leases_before = _db_leases(root)
    assert stack.endpoints is not None
    url = stack.endpoints.redis_url
    minted: list[MintedCredential] = []
    real = broker.runtime.minter.mint

    async def mint_then_lose_data(spec: MintSpec) -> MintedCredential:
        credential = await real(spec)
        minted.append(credential)
        client = redis.Redis.from_url(url)
        try:
            run_keys = f"{broker.runtime.ledger.namespace}:{{wf:{spec.workflow_id}}}:*"
            for key in client.scan_iter(match=run_keys):
                client.delete(key)
        finally:
            client.close()
        return credential

    broker.runtime.minter.mint = mint_then_lose_data  # type: ignore[method-assign]
    _, status, body = await _run_and_request(stack, broker, tmp_path)
    assert (status, body["code"], body["reason"]) == (
        503,
        "ledger_unavailable",
        "ledger.record_lost",
    ), body
    assert "secret" not in body
    [credential] = minted
    assert not _token_alive(root, credential.token_accessor)
    assert _db_leases(root) <= leases_before
