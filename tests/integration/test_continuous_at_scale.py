"""Continuous authorization decides every live lease again, not only the first batch (nor the
first 10 000): 2 500 live leases in a real Redis ledger over five runs, a policy change that
denies all of them, a re-evaluation in batches of 500 through the real revocation engine and
OpenBao, and every one ends revoked.

A sample of the leases hold real OpenBao task tokens minted by the broker's minter (spread
through the ledger, so most are read after the first batch); OpenBao no longer knows them
afterwards. The others hold accessors OpenBao never issued, which the revocation engine counts
as revoked only once OpenBao's lookup says the accessor is unknown: the same confirmation,
without minting 2 500 tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.adapters.clock import SystemClock
from broker.adapters.config_files import load_target_catalog
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.vault import VaultMinter
from broker.continuous import ContinuousAuthorizer
from broker.core.audit import EventType
from broker.core.model import Lease, LeaseState, WorkflowRun
from broker.core.ports import LeaseSelector
from broker.devstack import DevStack
from broker.policy_reload import LivePolicy
from broker.revocation import Revoker
from tests.integration.clients import (
    DEMO_ORCHESTRATOR,
    DEMO_ROLES,
    broker_minter_and_ledger,
    demo_kv_lease,
    demo_policy_engine,
    issue_recorded,
    token_alive,
)

pytestmark = pytest.mark.stack

LEASES = 2500
RUNS = 5
REAL_TOKENS = 25  # one in a hundred
BATCH = 500
AGENT = "spiffe://tasklease.test/agent/demo"
TARGETS = load_target_catalog(Path("config/targets.toml"))
CLOSE_DEMO_KV = (
    '@id("demo-kv-closed") @reason("demo-kv is closed")\n'
    'forbid (principal, action, resource) when { resource.name == "demo-kv" };\n'
)


@pytest.fixture
async def parts(stack: DevStack) -> AsyncIterator[tuple[RedisLedger, VaultMinter]]:
    """A Redis ledger in its own namespace, and the broker's minter logged into OpenBao."""
    async with broker_minter_and_ledger(stack, "ca") as (minter, ledger):
        yield ledger, minter


def _run(number: int, now: datetime) -> WorkflowRun:
    return WorkflowRun(
        id=f"wf-scale-{number}",
        owner="alice@example.test",
        purpose="continuous authorization at scale",
        started_by=DEMO_ORCHESTRATOR,
        created_at=now,
        deadline=now + timedelta(hours=1),
    )


def _lease(number: int, now: datetime) -> Lease:
    return demo_kv_lease(
        f"cred_scale_{number:05d}",
        workflow_id=f"wf-scale-{number % RUNS}",
        task_id=f"t-{number}",
        holder=AGENT,
        now=now,
    )


async def test_a_policy_change_revokes_every_live_lease_beyond_the_first_batch(
    stack: DevStack, parts: tuple[RedisLedger, VaultMinter]
) -> None:
    ledger, minter = parts
    clock = SystemClock()
    now = clock.now()
    for number in range(RUNS):
        assert await ledger.create_run(_run(number, now))
    leases = [_lease(number, now) for number in range(LEASES)]
    real = set(range(0, LEASES, LEASES // REAL_TOKENS))
    accessors: dict[str, str] = {}
    for start in range(0, LEASES, 250):
        chunk = list(range(start, min(start + 250, LEASES)))
        issued = await asyncio.gather(
            *(issue_recorded(ledger, minter, leases[n], real=n in real) for n in chunk)
        )
        accessors.update((x.credential_id, x.token_accessor) for x in issued)
    real_accessors = [accessors[leases[n].credential_id] for n in sorted(real)]
    assert await asyncio.to_thread(token_alive, stack, real_accessors[-1])

    audit = MemoryAuditTrail()
    policy = LivePolicy(demo_policy_engine())
    continuous = ContinuousAuthorizer(
        ledger=ledger,
        policy=policy,
        targets=TARGETS,
        roles=DEMO_ROLES,
        revoker=Revoker(ledger=ledger, minter=minter, clock=clock),
        clock=clock,
        audit=audit,
        batch=BATCH,
    )

    # Under the set in force every lease is still allowed: nothing is revoked.
    kept = await continuous.reevaluate(LeaseSelector(everything=True), "nothing changed")
    assert (kept.examined, kept.denied, kept.batches) == (LEASES, 0, LEASES // BATCH)

    policy.replace(demo_policy_engine(CLOSE_DEMO_KV))
    with capture_logs() as logs:
        report = await continuous.reevaluate(
            LeaseSelector(everything=True), "the policy set changed (test)"
        )

    totals = (LEASES, LEASES, LEASES, 0, LEASES // BATCH)
    assert totals == (
        report.examined,
        report.denied,
        report.confirmed_revoked,
        report.still_live,
        report.batches,
    )
    (summary,) = [e for e in logs if e["event"] == "continuous.reevaluated"]
    assert totals == (
        summary["examined"],
        summary["denied"],
        summary["confirmed_revoked"],
        summary["still_live"],
        summary["batches"],
    )
    # Every lease in the ledger is revoked, for this reason, and audited once.
    states: dict[str, tuple[LeaseState, str]] = {}
    async for found in ledger.iter_leases(LeaseSelector(everything=True), batch=1000):
        states.update((x.credential_id, (x.state, x.revoke_reason)) for x in found)
    assert {x.credential_id for x in leases} == set(states)
    assert {(LeaseState.REVOKED, "continuous_authorization")} == set(states.values())
    revoked_events = [e for e in audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert sorted(states) == sorted(e.credential_id for e in revoked_events)
    # OpenBao confirms for the real tokens.
    alive = await asyncio.gather(
        *(asyncio.to_thread(token_alive, stack, a) for a in real_accessors)
    )
    assert not any(alive)
