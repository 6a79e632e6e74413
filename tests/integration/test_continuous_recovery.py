"""Continuous authorization closes its two fail-open gaps, on the real stack.

* A policy change made while no broker applied it (files edited, then a broker started instead
  of a SIGHUP): the starting broker finds the stored decision-inputs digest stale, decides every
  live lease again in the background, revokes the ones now denied in OpenBao, and stores the
  new digest once that completed.
* Redis goes away in the middle of a re-evaluation: the attempt stops, is retried with backoff
  while Redis is down, and once Redis is back the retry completes and revokes the rest.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from broker.adapters.clock import SystemClock
from broker.adapters.config_files import load_target_catalog
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.redis_reevaluation import RedisReevaluationMarkers, marker_key
from broker.adapters.vault import VaultMinter
from broker.continuous import EVERYTHING, ContinuousAuthorizer
from broker.core.audit import AuditEvent, CredentialRevoked, EventType
from broker.core.model import Lease, LeaseState, WorkflowRun
from broker.core.ports import LeaseSelector
from broker.devstack import DevStack
from broker.policy_reload import LivePolicy
from broker.revocation import Revoker
from tests.conftest import remember_secret
from tests.integration.clients import (
    DEMO_ORCHESTRATOR,
    DEMO_ROLES,
    StartBroker,
    broker_minter_and_ledger,
    call,
    client_context,
    demo_kv_lease,
    demo_policy_engine,
    issue_recorded,
    start_run,
    token_alive,
    workload_id,
)

pytestmark = pytest.mark.stack

_REDIS_DB = 11
CLOSE_DEMO_KV = (
    "// Maintenance: nobody gets demo-kv credentials, and live ones are revoked.\n"
    '@id("demo-kv-closed")\n'
    '@reason("demo-kv is closed")\n'
    'forbid (principal, action == Action::"request_credential", resource)\n'
    'when { resource.name == "demo-kv" };\n'
)


async def until(probe: Callable[[], Awaitable[bool]], *, within: float = 20.0) -> None:
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- start-up


@pytest.fixture
def redis_url(stack: DevStack) -> str:
    """A Redis database of this module's own (flushed): a start-up re-evaluation decides every
    live lease of its ledger, and these tests must only see their own."""
    assert stack.endpoints is not None
    base, _, database = stack.endpoints.redis_url.rpartition("/")
    assert database == "0"
    url = f"{base}/{_REDIS_DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


def stored_marker(url: str) -> dict[str, Any] | None:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        raw = client.get(marker_key("tl"))
    return None if raw is None else dict(json.loads(str(raw)))


async def test_a_policy_change_made_while_no_broker_applied_it_is_applied_at_start_up(
    stack: DevStack, start: StartBroker, redis_url: str, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policies"
    shutil.copytree("config/policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    env = {
        "TASKLEASE_REDIS__URL": redis_url,
        "TASKLEASE_POLICY_DIR": str(policy_dir),
        # Polling off: nothing but a SIGHUP (never sent) or a start would apply a change.
        "TASKLEASE_POLICY__RELOAD_INTERVAL_SECONDS": "0",
        # This module's ledger is not the other modules' (db 0): its reconciler must not take
        # their live task tokens for orphans.
        "TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS": "86400",
    }
    first = await start(**env)
    assert first.runtime.continuous is not None
    permissive = first.runtime.continuous.inputs_digest()
    assert permissive is not None

    async def first_marked() -> bool:
        marker = stored_marker(redis_url)
        return marker is not None and marker["digest"] == permissive

    await until(first_marked)  # a fresh ledger: nothing to decide, the digest is noted

    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
    run_id = f"wf-{secrets.token_hex(4)}"
    await start_run(stack, first, orchestrator, run_id, owner="alice@example.test", purpose="x")
    issued: dict[str, dict[str, Any]] = {}
    for task, target in [("kv-1", "demo-kv"), ("kv-2", "demo-kv"), ("db-1", "demo-db")]:
        body = {"workflow_id": run_id, "task_id": task, "target": target, "ttl_seconds": 300}
        status, answer = await call(first, agent, "POST", "/v1/credentials", json_body=body)
        assert status == 201, answer
        for name in ("token", "password"):
            if name in answer["secret"]:
                remember_secret(str(answer["secret"][name]))
        issued[task] = answer
    for task in issued:
        assert await asyncio.to_thread(token_alive, stack, issued[task]["token_accessor"])

    # The operator tightens the policy set on disk and starts a broker instead of a SIGHUP.
    (policy_dir / "maintenance.cedar").write_text(CLOSE_DEMO_KV)
    with capture_logs() as logs:
        second = await start(**env)
        assert second.runtime.continuous is not None
        tightened = second.runtime.continuous.inputs_digest()
        assert tightened is not None
        assert tightened != permissive

        async def kv_tokens_gone() -> bool:
            alive = [
                await asyncio.to_thread(token_alive, stack, issued[task]["token_accessor"])
                for task in ("kv-1", "kv-2")
            ]
            return not any(alive)

        await until(kv_tokens_gone)

        async def second_marked() -> bool:
            marker = stored_marker(redis_url)
            return marker is not None and marker["digest"] == tightened

        await until(second_marked)

    (changed,) = [e for e in logs if e["event"] == "continuous.inputs_changed"]
    assert (changed["digest"], changed["stored"]) == (tightened[:12], permissive[:12])
    marker = stored_marker(redis_url)
    assert marker is not None
    assert second.runtime.audit is not None
    assert marker["writer"] == second.runtime.audit.writer
    # The allowed database credential stays; the two closed ones are revoked for this reason.
    ledger = second.runtime.ledger
    for task, expected in [("kv-1", "revoked"), ("kv-2", "revoked"), ("db-1", "active")]:
        lease = await ledger.get_lease(issued[task]["credential_id"])
        assert lease is not None
        assert lease.state.value == expected, (task, lease)
        if expected == "revoked":
            assert lease.revoke_reason == "continuous_authorization"
    assert await asyncio.to_thread(token_alive, stack, issued["db-1"]["token_accessor"])
    # The start-up re-evaluation says why in each credential.revoked audit event.
    admin = client_context(stack, tmp_path, workload_id(stack, "admin"))
    status, audit = await call(
        second,
        admin,
        "GET",
        f"/v1/audit?credential_id={issued['kv-1']['credential_id']}&type=credential.revoked",
    )
    assert status == 200, audit
    (event,) = audit["events"]
    assert event["payload"]["cause"] == "continuous_authorization"
    assert "start-up" in event["payload"]["reason"]
    assert "demo-kv-closed" in event["payload"]["reason"]
    # A third broker on the same files finds the digest in force: nothing to decide again.
    with capture_logs() as logs:
        third = await start(**env)
        assert third.runtime.continuous is not None
        await asyncio.wait_for(third.runtime.continuous.drain(), timeout=20)
    assert [e["event"] for e in logs if e["event"].startswith("continuous.inputs")] == [
        "continuous.inputs_unchanged"
    ]
    status, ready = await call(third, admin, "GET", "/readyz")
    assert (status, ready["checks"]["continuous"]["ok"]) == (200, True), ready
    assert not ready["checks"]["continuous"].get("alarm")


# --------------------------------------------------------------------------- Redis down


AGENT = "spiffe://tasklease.test/agent/demo"
TARGETS = load_target_catalog(Path("config/targets.toml"))
LEASES = 6
BATCH = 2


@pytest.fixture
async def parts(stack: DevStack) -> AsyncIterator[tuple[RedisLedger, VaultMinter]]:
    """A Redis ledger in its own namespace, and the broker's minter logged into OpenBao."""
    async with broker_minter_and_ledger(stack, "cr") as (minter, ledger):
        yield ledger, minter


class RedisStoppingAudit(MemoryAuditTrail):
    """Stops the stack's Redis right after recording the first revocation (so in the middle of
    a re-evaluation, between two batches), and starts it again ``down_for`` seconds later."""

    def __init__(self, stack: DevStack, down_for: float) -> None:
        super().__init__()
        self._stack = stack
        self._down_for = down_for
        self.restarted: asyncio.Task[None] | None = None

    async def record(self, event: AuditEvent) -> None:
        await super().record(event)
        if self.restarted is None:
            await asyncio.to_thread(self._stack.processes["redis"].stop)
            self.restarted = asyncio.create_task(self._restart_later())

    async def _restart_later(self) -> None:
        await asyncio.sleep(self._down_for)
        await asyncio.to_thread(self._stack.restart_redis)


async def _states(ledger: RedisLedger, leases: list[Lease]) -> set[LeaseState]:
    found: set[LeaseState] = set()
    for lease in leases:
        stored = await ledger.get_lease(lease.credential_id)
        assert stored is not None
        found.add(stored.state)
    return found


async def test_redis_lost_mid_reevaluation_is_retried_until_every_denied_lease_is_revoked(
    stack: DevStack, parts: tuple[RedisLedger, VaultMinter]
) -> None:
    ledger, minter = parts
    clock = SystemClock()
    now = clock.now()
    assert await ledger.create_run(
        WorkflowRun(
            id="wf-recovery",
            owner="alice@example.test",
            purpose="continuous authorization recovers",
            started_by=DEMO_ORCHESTRATOR,
            created_at=now,
            deadline=now + timedelta(hours=1),
        )
    )
    now = SystemClock().now()
    leases = [
        await issue_recorded(
            ledger,
            minter,
            demo_kv_lease(
                f"cred_recovery_{n:03d}",
                workflow_id="wf-recovery",
                task_id=f"t-{n}",
                holder=AGENT,
                now=now,
            ),
        )
        for n in range(LEASES)
    ]
    accessors = [lease.token_accessor for lease in leases]
    assert all([await asyncio.to_thread(token_alive, stack, a) for a in accessors])

    audit = RedisStoppingAudit(stack, down_for=2.0)
    revoker = Revoker(ledger=ledger, minter=minter, clock=clock, audit=audit)
    policy = LivePolicy(demo_policy_engine())
    markers = RedisReevaluationMarkers(client=ledger.client, namespace=ledger.namespace)
    continuous = ContinuousAuthorizer(
        ledger=ledger,
        policy=policy,
        targets=TARGETS,
        roles=DEMO_ROLES,
        revoker=revoker,
        clock=clock,
        audit=audit,
        batch=BATCH,
        markers=markers,
        inputs=lambda: "c" * 64,
        writer="recovery-test",
        retry_base=timedelta(milliseconds=200),
        retry_cap=timedelta(seconds=1),
    )
    policy.replace(demo_policy_engine(CLOSE_DEMO_KV))
    try:
        with capture_logs() as logs:
            await continuous.policy_changed(trigger="test")

            async def pending() -> bool:
                return bool(continuous.pending())

            await until(pending)  # Redis is down: the attempt failed, a retry waits
            (waiting,) = continuous.pending()
            assert waiting.scope.kind == EVERYTHING
            check = continuous.check_result()
            assert (check.ok, check.alarm) == (True, True)
            await asyncio.wait_for(continuous.drain(), timeout=60)
    finally:
        if audit.restarted is not None:
            await audit.restarted
        await continuous.close()

    assert audit.restarted is not None
    events = [e["event"] for e in logs]
    assert events.count("continuous.incomplete") >= 1
    assert events.count("continuous.retry_scheduled") >= 1
    (recovered,) = [e for e in logs if e["event"] == "continuous.recovered"]
    assert recovered["failed_attempts"] >= 1
    assert (continuous.pending(), continuous.check_result().alarm) == ([], False)
    # A lease an interrupted attempt marked revoking (intent recorded, due now) is the
    # sweeper's to finish, as in a running broker.
    for _ in range(50):
        if await _states(ledger, leases) == {LeaseState.REVOKED}:
            break
        await revoker.revoke_due(clock.now())
        await asyncio.sleep(0.2)
    # Every lease revoked (the first batch by the first attempt, the rest by the retry), each
    # audited once, and OpenBao no longer knows any of the tokens.
    for lease in leases:
        stored = await ledger.get_lease(lease.credential_id)
        assert stored is not None
        assert (stored.state, stored.revoke_reason) == (
            LeaseState.REVOKED,
            "continuous_authorization",
        )
    revoked = [e for e in audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert sorted(e.credential_id for e in revoked) == sorted(x.credential_id for x in leases)
    assert all(isinstance(e.payload, CredentialRevoked) for e in revoked)
    alive = [await asyncio.to_thread(token_alive, stack, a) for a in accessors]
    assert not any(alive)
    # The completed re-evaluation of every live lease noted its inputs.
    marker = await markers.last_reevaluated()
    assert marker is not None
    assert (marker.digest, marker.writer) == ("c" * 64, "recovery-test")
    async for found in ledger.iter_leases(LeaseSelector(everything=True), batch=100):
        assert {x.state for x in found} == {LeaseState.REVOKED}
