"""Revocation end to end through the HTTP API on the real stack: workflow completion, TTL
expiry, early release, forced revocation by every selector kind, and OpenBao or PostgreSQL
down while revoking.

The broker is built by ``broker.bootstrap`` with this module's revocation tuning (short
backoffs, a fast sweep; see :func:`_start_engine`). Each test gets its own Redis database
(flushed),
so a forced revocation of "everything" addresses exactly this test's credentials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import psycopg
import pytest
import redis
from aiohttp import web
from structlog.testing import capture_logs

from broker.adapters.clock import SystemClock
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.scheduler import RevocationSweeper
from broker.bootstrap import RunningBroker, build_runtime
from broker.config import RedisSettings, load_settings
from broker.core.model import DelegationChain, DelegationHop, Lease, Sensitivity, TargetKind
from broker.core.ports import LeaseSelector, RevokeOutcome
from broker.devstack import DevStack
from broker.revocation import RevocationSettings, Revoker
from tests.conftest import remember_secret
from tests.integration.clients import call, orders_as
from tests.integration.clients import lease_alive as _lease_alive
from tests.integration.clients import openbao_root as _root
from tests.integration.clients import token_alive as _token_alive

pytestmark = pytest.mark.stack

# Redis logical database of this module: isolated from the other modules' leases (db 0).
_REDIS_DB = 5
SWEEP_INTERVAL = 0.5
# How long a test waits for something the engine does eventually (a sweep finishing a
# revocation, a retry once a backend is back). Generous on purpose: CI runs the whole suite on
# a 2-core VM; a bound on *when* is asserted separately where it is the point of the test.
EVENTUALLY = 30.0
FAST = {
    "backoff_base": timedelta(milliseconds=200),
    "backoff_cap": timedelta(seconds=1),
    "failed_retry_interval": timedelta(seconds=1),
    "revoke_timeout": timedelta(seconds=8),
    "visibility": timedelta(seconds=20),
}


@dataclasses.dataclass
class Engine:
    """A broker serving HTTPS with the revocation engine wired in."""

    broker: RunningBroker
    revoker: Revoker
    sweeper: RevocationSweeper

    async def lease(self, credential_id: str) -> Lease:
        lease = await self.broker.runtime.ledger.get_lease(credential_id)
        assert lease is not None
        return lease


StartEngine = Callable[..., Awaitable[Engine]]


def _isolated_redis_url(stack: DevStack) -> str:
    assert stack.endpoints is not None
    base, _, database = stack.endpoints.redis_url.rpartition("/")
    assert database == "0"
    return f"{base}/{_REDIS_DB}"


async def _start_engine(
    *, sweep_interval: float, tuning: RevocationSettings
) -> tuple[RunningBroker, Revoker, RevocationSweeper]:
    """A broker as bootstrap builds it, with this module's revocation tuning."""
    os.environ["TASKLEASE_REVOCATION__SWEEP_INTERVAL_SECONDS"] = str(sweep_interval)
    try:
        settings = load_settings()
    finally:
        del os.environ["TASKLEASE_REVOCATION__SWEEP_INTERVAL_SECONDS"]
    runtime = await build_runtime(settings, revocation=tuning)
    revoker, sweeper = runtime.revoker, runtime.sweeper
    runner = web.AppRunner(runtime.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, 0, ssl_context=runtime.tls.listener_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await runtime.close()
        raise
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return RunningBroker(runtime=runtime, runner=runner, port=port), revoker, sweeper


@pytest.fixture
async def start(
    broker_env: dict[str, str], stack: DevStack, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartEngine]:
    url = _isolated_redis_url(stack)
    monkeypatch.setenv("TASKLEASE_REDIS__URL", url)
    # This module's ledger is not the other modules' (db 0): its reconciler must not take
    # their live task tokens for orphans. (Their reconcilers cannot take ours: every token
    # here lives less than the default grace of 120 s.)
    monkeypatch.setenv("TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS", "86400")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    started: list[RunningBroker] = []

    async def starter(*, sweep_interval: float = SWEEP_INTERVAL, **tuning: Any) -> Engine:
        broker, revoker, sweeper = await _start_engine(
            sweep_interval=sweep_interval, tuning=RevocationSettings(**{**FAST, **tuning})
        )
        started.append(broker)
        return Engine(broker=broker, revoker=revoker, sweeper=sweeper)

    yield starter
    for broker in started:
        await broker.stop()


# --------------------------------------------------------------------------- actors


def _context(stack: DevStack, directory: Path, spiffe_id: str) -> ssl.SSLContext:
    minted = stack.mint_x509_svid(spiffe_id, ttl_seconds=1800)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=minted["bundle"])
    context.check_hostname = False  # the broker's SVID has a URI SAN, not a DNS name
    stem = spiffe_id.replace("spiffe://", "").replace("/", "_")
    cert, key = directory / f"{stem}-svid.pem", directory / f"{stem}-key.pem"
    cert.write_text(minted["svid"])
    key.write_text(minted["key"])
    key.chmod(0o600)
    context.load_cert_chain(cert, key)
    return context


class Actors:
    """Real SPIRE SVIDs for the orchestrator, three agents, an admin (one set per module)."""

    def __init__(self, stack: DevStack, directory: Path) -> None:
        td = stack.trust_domain
        self.ids = {
            "orchestrator": f"spiffe://{td}/orchestrator/demo",
            "agent": f"spiffe://{td}/agent/demo",
            "agent2": f"spiffe://{td}/agent/demo-2",
            "other": f"spiffe://{td}/agent/other",
            "admin": f"spiffe://{td}/admin/demo",
        }
        self.contexts = {name: _context(stack, directory, sid) for name, sid in self.ids.items()}

    async def start_run(self, engine: Engine, owner: str = "alice@example.test") -> str:
        run_id = f"wf-{secrets.token_hex(4)}"
        body = {
            "id": run_id,
            "owner": owner,
            "purpose": "revocation tests OPS-77",
            "ttl_seconds": 600,
            "participants": [f"spiffe://{self.ids['agent'].split('/')[2]}/agent/*"],
        }
        status, run = await call(
            engine.broker, self.contexts["orchestrator"], "POST", "/v1/workflows", json_body=body
        )
        assert status == 201, run
        return run_id

    async def issue(
        self,
        engine: Engine,
        run_id: str,
        target: str,
        *,
        task: str = "task-1",
        ttl: int = 90,
        agent: str = "agent",
    ) -> dict[str, Any]:
        body = {"workflow_id": run_id, "task_id": task, "target": target, "ttl_seconds": ttl}
        status, issued = await call(
            engine.broker, self.contexts[agent], "POST", "/v1/credentials", json_body=body
        )
        assert status == 201, issued
        secret = issued["secret"]
        for name in ("password", "token", "private_key"):
            if name in secret:
                remember_secret(secret[name] if name != "private_key" else secret[name][40:120])
        return issued

    async def complete(
        self, engine: Engine, run_id: str, *, wait: bool = True, who: str = "orchestrator"
    ) -> tuple[int, dict[str, Any]]:
        query = "?wait=true" if wait else ""
        return await call(
            engine.broker,
            self.contexts[who],
            "POST",
            f"/v1/workflows/{run_id}/complete{query}",
            json_body={"outcome": "completed"},
        )

    async def credential(
        self, engine: Engine, credential_id: str, who: str = "agent", method: str = "GET"
    ) -> tuple[int, dict[str, Any]]:
        return await call(
            engine.broker, self.contexts[who], method, f"/v1/credentials/{credential_id}"
        )


@pytest.fixture(scope="module")
def actors(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Actors:
    return Actors(stack, tmp_path_factory.mktemp("svids"))


# --------------------------------------------------------------------------- checks in Vault/PG


def _pg_login(stack: DevStack, secret: dict[str, Any]) -> int:
    return orders_as(stack, secret["username"], secret["password"])


async def _pg_login_fails(stack: DevStack, secret: dict[str, Any]) -> bool:
    try:
        await asyncio.to_thread(_pg_login, stack, secret)
    except psycopg.OperationalError:
        return True
    return False


async def _until(
    probe: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.1
) -> float:
    """Seconds until ``probe`` holds (fails the test after ``within`` seconds)."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


def _ids(items: list[dict[str, Any]]) -> set[str]:
    return {item["credential_id"] for item in items}


# --------------------------------------------------------------------------- completion


async def test_completing_a_run_revokes_database_pki_and_token_credentials(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    engine = await start()
    run_id = await actors.start_run(engine)
    db = await actors.issue(engine, run_id, "demo-db", task="query")
    cert = await actors.issue(engine, run_id, "demo-cert", task="call-api")
    kv = await actors.issue(engine, run_id, "demo-kv", task="read-config")
    assert await asyncio.to_thread(_pg_login, stack, db["secret"]) == 3
    (db_lease_id,) = (await engine.lease(db["credential_id"])).vault_lease_ids
    assert _lease_alive(stack, db_lease_id)

    status, body = await actors.complete(engine, run_id)
    assert status == 200, body
    assert (body["workflow"]["state"], body["report"]["complete"]) == ("completed", True)
    issued_ids = {db["credential_id"], cert["credential_id"], kv["credential_id"]}
    assert _ids(body["report"]["confirmed_revoked"]) == issued_ids
    assert body["report"]["still_live"] == []
    assert {x["reason"] for x in body["report"]["confirmed_revoked"]} == {"run_completed"}

    # What OpenBao and PostgreSQL say, not what the broker says.
    assert await _pg_login_fails(stack, db["secret"])
    assert not _lease_alive(stack, db_lease_id)
    for issued in (db, cert, kv):
        assert not _token_alive(stack, issued["token_accessor"])
    serial = cert["secret"]["serial_number"]
    assert _root(stack).read(f"pki/cert/{serial}")["data"]["revocation_time"] > 0
    assert stack.endpoints is not None
    task_token = hvac.Client(url=stack.endpoints.openbao_addr, token=kv["secret"]["token"])
    with pytest.raises(hvac.exceptions.Forbidden):
        task_token.auth.token.lookup_self()

    # A duplicate completion changes nothing and reports the same.
    again_status, again = await actors.complete(engine, run_id)
    assert again_status == 200
    assert again["workflow"] == body["workflow"]
    assert _ids(again["report"]["confirmed_revoked"]) == issued_ids
    # The run is over: no new credential for it.
    status, refused = await call(
        engine.broker,
        actors.contexts["agent"],
        "POST",
        "/v1/credentials",
        json_body={"workflow_id": run_id, "task_id": "late", "target": "demo-kv"},
    )
    assert (status, refused["reason"]) == (409, "workflow.not_active")


async def test_completion_without_wait_is_finished_by_the_sweeper(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    engine = await start()
    run_id = await actors.start_run(engine)
    kv = await actors.issue(engine, run_id, "demo-kv")
    status, body = await actors.complete(engine, run_id, wait=False)
    assert (status, body["scheduled"]) == (202, [kv["credential_id"]])

    async def revoked() -> bool:
        return bool((await actors.credential(engine, kv["credential_id"]))[1]["state"] == "revoked")

    await _until(revoked, within=EVENTUALLY)
    assert not _token_alive(stack, kv["token_accessor"])


async def test_only_the_runs_orchestrator_or_an_admin_completes_it(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    engine = await start()
    run_id = await actors.start_run(engine)
    kv = await actors.issue(engine, run_id, "demo-kv")
    status, body = await actors.complete(engine, run_id, who="agent")
    assert (status, body["reason"]) == (403, "auth.role_required")
    assert _token_alive(stack, kv["token_accessor"])
    status, body = await actors.complete(engine, run_id, who="admin")
    assert (status, body["workflow"]["state"]) == (200, "completed")
    status, body = await actors.complete(engine, "wf-does-not-exist")
    assert (status, body["reason"]) == (404, "workflow.not_found")


# --------------------------------------------------------------------------- TTL


async def test_a_credential_is_revoked_within_one_sweep_of_its_ttl(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    engine = await start()
    run_id = await actors.start_run(engine)
    db = await actors.issue(engine, run_id, "demo-db", ttl=3)
    assert await asyncio.to_thread(_pg_login, stack, db["secret"]) == 3
    expires_at = datetime.fromisoformat(db["expires_at"])
    await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()))

    async def revoked() -> bool:
        status, lease = await actors.credential(engine, db["credential_id"])
        return status == 200 and lease["state"] == "revoked"

    await _until(revoked, within=EVENTUALLY, interval=0.05)
    _, lease = await actors.credential(engine, db["credential_id"])
    assert lease["revoke_reason"] == "ttl_expired"
    # Taken by the first sweep after its expiry: revoked_at is that sweep's own time (the
    # tick's clock reading), so neither the revocation in OpenBao and PostgreSQL nor this
    # test's polling (all slow on a loaded machine) counts; one interval plus tick latency.
    picked_up = datetime.fromisoformat(lease["revoked_at"]) - expires_at
    assert timedelta(0) <= picked_up <= timedelta(seconds=SWEEP_INTERVAL + 1.0), picked_up
    assert await _pg_login_fails(stack, db["secret"])
    (lease_id,) = (await engine.lease(db["credential_id"])).vault_lease_ids
    assert not _lease_alive(stack, lease_id)


# --------------------------------------------------------------------------- release


async def test_the_holder_releases_a_credential_early_and_strangers_see_nothing(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    engine = await start()
    run_id = await actors.start_run(engine)
    db = await actors.issue(engine, run_id, "demo-db")
    cid = db["credential_id"]
    for stranger in ("other", "orchestrator"):
        for method in ("GET", "DELETE"):
            status, body = await actors.credential(engine, cid, who=stranger, method=method)
            assert (status, body["reason"]) == (404, "credential.not_found"), (stranger, method)
    status, absent = await actors.credential(engine, "cred_000000000000000000000000", who="other")
    assert (status, absent["reason"]) == (404, "credential.not_found")
    assert await asyncio.to_thread(_pg_login, stack, db["secret"]) == 3

    status, metadata = await actors.credential(engine, cid)
    assert (status, metadata["state"], metadata["holder"]) == (200, "active", actors.ids["agent"])
    assert "secret" not in metadata
    status, report = await actors.credential(engine, cid, method="DELETE")
    assert (status, report["complete"], _ids(report["confirmed_revoked"])) == (200, True, {cid})
    assert await _pg_login_fails(stack, db["secret"])
    assert not _token_alive(stack, db["token_accessor"])
    status, metadata = await actors.credential(engine, cid, who="admin")
    assert (status, metadata["state"], metadata["revoke_reason"]) == (200, "revoked", "released")
    # Releasing again is harmless.
    status, report = await actors.credential(engine, cid, method="DELETE")
    assert (status, report["complete"]) == (200, True)


# --------------------------------------------------------------------------- forced revocation


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"workflow_id": "@run1"}, {"a", "b"}),
        ({"task_id": "t-1"}, {"a", "c"}),
        ({"workflow_id": "@run2", "task_id": "t-9"}, {"d"}),
        ({"holder": "@other"}, {"b", "d"}),
        ({"holder_prefix": "@agent"}, {"a", "c"}),
        ({"owner": "bob@example.test"}, {"c", "d"}),
        ({"target": "demo-kv"}, {"a", "b"}),
        ({"sensitivity": "confidential"}, {"d"}),
        ({"everything": True}, {"a", "b", "c", "d"}),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
async def test_forced_revocation_reports_exactly_what_the_selector_revoked(
    stack: DevStack,
    start: StartEngine,
    actors: Actors,
    selector: dict[str, Any],
    expected: set[str],
) -> None:
    engine = await start()
    run1 = await actors.start_run(engine)
    run2 = await actors.start_run(engine, owner="bob@example.test")
    fleet = {
        "a": await actors.issue(engine, run1, "demo-kv", task="t-1", agent="agent"),
        "b": await actors.issue(engine, run1, "demo-kv", task="t-2", agent="other"),
        "c": await actors.issue(engine, run2, "demo-db", task="t-1", agent="agent2"),
        "d": await actors.issue(engine, run2, "demo-cert", task="t-9", agent="other"),
    }
    names = {
        "@run1": run1,
        "@run2": run2,
        "@other": actors.ids["other"],
        "@agent": actors.ids["agent"],  # a prefix of agent/demo and agent/demo-2
    }
    body = {
        "selector": {k: names.get(v, v) if isinstance(v, str) else v for k, v in selector.items()},
        "reason": "INC-2042 suspected key leak",
    }
    with capture_logs() as logs:
        status, report = await call(
            engine.broker, actors.contexts["admin"], "POST", "/v1/revocations", json_body=body
        )
    assert status == 200, report
    by_id = {issued["credential_id"]: name for name, issued in fleet.items()}
    assert {by_id[x] for x in _ids(report["confirmed_revoked"])} == expected
    assert (report["complete"], report["still_live"]) == (True, [])
    for name, issued in fleet.items():
        assert _token_alive(stack, issued["token_accessor"]) == (name not in expected), name
        _, metadata = await actors.credential(engine, issued["credential_id"], who="admin")
        assert (metadata["state"] == "revoked") == (name in expected), name
    (forced,) = [e for e in logs if e["event"] == "revocation.forced"]
    assert (forced["actor"], forced["confirmed_revoked"]) == (actors.ids["admin"], len(expected))
    # Only admins force.
    status, refused = await call(
        engine.broker, actors.contexts["orchestrator"], "POST", "/v1/revocations", json_body=body
    )
    assert (status, refused["reason"]) == (403, "auth.role_required")


# --------------------------------------------------------------------------- faults


async def test_openbao_down_during_a_sweep_is_retried_and_completed_when_it_is_back(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    engine = await start()
    run_id = await actors.start_run(engine)
    db = await actors.issue(engine, run_id, "demo-db")
    cid = db["credential_id"]
    stack.stop_openbao()
    try:
        status, body = await actors.complete(engine, run_id)
        # Never reported done: still live, with a reason code and a next attempt.
        assert (status, body["report"]["complete"]) == (207, False)
        (live,) = body["report"]["still_live"]
        assert (live["credential_id"], live["reason"]) == (cid, "retrying")
        assert live["last_error"].startswith("vault.unreachable")

        async def retried() -> bool:
            return (await engine.lease(cid)).attempts >= 2

        await _until(retried, within=EVENTUALLY)
        assert (await engine.lease(cid)).state.value == "revoking"
    finally:
        stack.start_openbao_again()

    async def revoked() -> bool:
        return (await engine.lease(cid)).state.value == "revoked"

    await _until(revoked, within=EVENTUALLY)
    assert not _token_alive(stack, db["token_accessor"])
    assert await _pg_login_fails(stack, db["secret"])


async def test_postgres_down_during_revocation_is_revoke_failed_then_recovered(
    stack: DevStack, start: StartEngine, actors: Actors
) -> None:
    """SECURITY 26: surfaced (state, last_error, alert log, metric), retried, never done."""
    engine = await start(max_attempts=2)
    run_id = await actors.start_run(engine)
    db = await actors.issue(engine, run_id, "demo-db")
    cid = db["credential_id"]
    (lease_id,) = (await engine.lease(cid)).vault_lease_ids
    stack.stop_postgres()
    try:
        with capture_logs() as logs:
            status, report = await actors.credential(engine, cid, method="DELETE")
            assert (status, report["complete"]) == (207, False)
            (live,) = report["still_live"]
            # What OpenBao says depends on how far PostgreSQL's shutdown got: a refused
            # connection ("Bad request") or a timeout; either way a Vault error, surfaced.
            assert str(live["last_error"]).startswith("vault."), live

            async def failed() -> bool:
                _, metadata = await actors.credential(engine, cid)
                return bool(metadata["state"] == "revoke_failed")

            await _until(failed, within=EVENTUALLY)
        alerts = [e for e in logs if e["event"] == "credential.revoke_failed"]
        # At least one alert, each for this credential (a loaded machine may reach the slow
        # retry, which alerts again, before the state is polled).
        assert alerts
        assert {(e["credential_id"], e["alert"]) for e in alerts} == {(cid, True)}
        assert engine.revoker.metrics.registry.get_sample_value("tasklease_revoke_failed_total")
        assert _lease_alive(stack, lease_id)  # OpenBao could not drop the role either
    finally:
        stack.start_postgres_again()

    async def revoked() -> bool:
        _, metadata = await actors.credential(engine, cid)
        return bool(metadata["state"] == "revoked")

    await _until(revoked, within=EVENTUALLY)
    assert not _lease_alive(stack, lease_id)
    assert await _pg_login_fails(stack, db["secret"])
    _, metadata = await actors.credential(engine, cid)
    assert (metadata["revoke_reason"], metadata["last_error"]) == ("released", "")


# --------------------------------------------------------------------------- two replicas


class CountingMinter:
    """Counts revocations per accessor; yields so replicas interleave."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.calls.append(token_accessor)
        await asyncio.sleep(0.001)
        return RevokeOutcome(confirmed=True)

    async def mint(self, spec: Any) -> Any:
        raise AssertionError("the revoker never mints")


async def test_two_replicas_sweeping_one_redis_never_double_revoke_or_skip(
    stack: DevStack,
) -> None:
    """SECURITY 34 on the real ledger: three sweepers, one Redis, 120 due leases."""
    url = _isolated_redis_url(stack)
    namespace = f"rv{secrets.token_hex(3)}"
    ledgers = [
        RedisLedger(settings=RedisSettings.model_validate({"url": url}), namespace=namespace)
        for _ in range(3)
    ]
    minter = CountingMinter()
    now = datetime.now(UTC)
    chain = DelegationChain((DelegationHop("owner", "alice", verified=False),))
    try:
        ids = [f"c-{i:04d}" for i in range(120)]
        for i, cid in enumerate(ids):
            lease = Lease(
                credential_id=cid,
                workflow_id=f"wf-{i % 7}",
                task_id="t",
                target="demo-kv",
                kind=TargetKind.VAULT_TOKEN,
                sensitivity=Sensitivity.PUBLIC,
                holder="spiffe://tasklease.test/agent/demo",
                owner="alice",
                chain=chain,
                issued_at=now - timedelta(minutes=5),
                expires_at=now - timedelta(seconds=i + 1),
            )
            await ledgers[0].write_ahead(lease)
            await ledgers[0].activate(cid, token_accessor=f"acc-{cid}", vault_lease_ids=())
        replicas = [
            Revoker(
                ledger=ledger,
                minter=minter,
                clock=SystemClock(),
                settings=RevocationSettings(sweep_batch=16, concurrency=4),
            )
            for ledger in ledgers
        ]
        revoked: list[str] = []
        for _ in range(6):
            reports = await asyncio.gather(*(r.revoke_due(now) for r in replicas))
            revoked.extend(cid for report in reports for cid in report.revoked)
        assert sorted(revoked) == ids
        assert sorted(minter.calls) == sorted(f"acc-{cid}" for cid in ids)
        leases = await ledgers[0].find_leases(LeaseSelector(everything=True), limit=1000)
        assert {x.state.value for x in leases} == {"revoked"}
        assert (
            await ledgers[1].claim_due(
                now + timedelta(hours=1), limit=10, visibility=timedelta(seconds=1)
            )
            == []
        )
    finally:
        for ledger in ledgers:
            await ledger.close()
