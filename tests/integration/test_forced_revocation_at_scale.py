"""One forced revocation reaches every lease it matches, not only the ones its report lists, on
the real stack: live leases with real OpenBao task tokens (minted by the broker's minter) in a
namespaced real Redis ledger, a force by holder with the report made small (10 leases) and the
ledger read in batches of 4. The call revokes the listed ones, makes the rest due now and
tombstones every task (a mint in flight for one of them cannot activate); one sweep then
revokes the rest, and OpenBao no longer knows any of the holder's tokens. Another holder's
lease is untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from broker.adapters.clock import SystemClock
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.vault import VaultMinter
from broker.core.audit import EventType
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import Lease, LeaseState, WorkflowRun
from broker.core.ports import LeaseSelector
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.devstack import DevStack
from broker.errors import ConflictError
from broker.revocation import Revoker, RevokeReason, SettleOutcome
from tests.integration.clients import (
    DEMO_ORCHESTRATOR,
    broker_minter_and_ledger,
    demo_kv_lease,
    issue_recorded,
    mint_task_token,
    token_alive,
)

pytestmark = pytest.mark.stack

LEASES = 24
LISTED = 10
BATCH = 4
RUNS = ("wf-force-1", "wf-force-2")
AGENT = "spiffe://tasklease.test/agent/force-scale"
OTHER = "spiffe://tasklease.test/agent/force-scale-other"
ADMIN = "spiffe://tasklease.test/admin/demo"


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.revocation.MAX_ADDRESSED", LISTED)
    monkeypatch.setattr("broker.revocation._RUN_BATCH", BATCH)


@pytest.fixture
async def parts(stack: DevStack) -> AsyncIterator[tuple[RedisLedger, VaultMinter]]:
    """A Redis ledger in its own namespace, and the broker's minter logged into OpenBao."""
    async with broker_minter_and_ledger(stack, "fr") as (minter, ledger):
        yield ledger, minter


def _lease(credential_id: str, run: str, task: str, holder: str, now: datetime) -> Lease:
    return demo_kv_lease(
        credential_id,
        workflow_id=run,
        task_id=task,
        holder=holder,
        now=now,
        justification="forced revocation at scale (test)",
    )


def _admin() -> Caller:
    identity = WorkloadIdentity(
        SpiffeId.parse(ADMIN), SystemClock().now() + timedelta(hours=1), AuthMethod.X509_SVID
    )
    return Caller(identity, frozenset({Role.ADMIN}))


async def _alive(stack: DevStack, accessors: list[str]) -> list[bool]:
    return list(
        await asyncio.gather(*(asyncio.to_thread(token_alive, stack, a) for a in accessors))
    )


async def test_a_force_by_holder_revokes_every_lease_with_one_call_and_one_sweep(
    stack: DevStack, parts: tuple[RedisLedger, VaultMinter]
) -> None:
    ledger, minter = parts
    clock = SystemClock()
    now = clock.now()
    for run in RUNS:
        assert await ledger.create_run(
            WorkflowRun(
                id=run,
                owner="alice@example.test",
                purpose="forced revocation at scale",
                started_by=DEMO_ORCHESTRATOR,
                created_at=now,
                deadline=now + timedelta(hours=1),
            )
        )
    leases = [
        _lease(f"cred_force_{n:03d}", RUNS[n % 2], f"t-{n}", AGENT, now) for n in range(LEASES)
    ]
    issued = await asyncio.gather(*(issue_recorded(ledger, minter, x) for x in leases))
    accessors = {x.credential_id: x.token_accessor for x in issued}
    other = _lease("cred_force_other", RUNS[0], "t-other", OTHER, now)
    other_accessor = (await issue_recorded(ledger, minter, other)).token_accessor
    # A mint in flight for one more task of the holder: written ahead, minted, not recorded.
    in_flight = _lease("cred_force_in_flight", RUNS[1], "t-in-flight", AGENT, now)
    await ledger.write_ahead(in_flight)
    in_flight_accessor = await mint_task_token(minter, in_flight)
    assert all(await _alive(stack, [*accessors.values(), other_accessor, in_flight_accessor]))

    audit = MemoryAuditTrail()
    revoker = Revoker(ledger=ledger, minter=minter, clock=clock, audit=audit)
    try:
        report = await revoker.force(_admin(), LeaseSelector(holder=AGENT), "INC-4242 (test)")

        listed = {r.credential_id for r in report.results}
        # Every lease is marked; the ones not listed are due now, their tokens still alive.
        rest = [cid for cid in accessors if cid not in listed]
        for cid in accessors:
            stored = await ledger.get_lease(cid)
            assert stored is not None
            expected = LeaseState.REVOKED if cid in listed else LeaseState.REVOKING
            assert (stored.state, stored.revoke_reason) == (expected, RevokeReason.FORCED.value)
        assert [cid in listed for cid in accessors] == [
            not alive for alive in await _alive(stack, list(accessors.values()))
        ]
        assert (len(report.results), report.truncated, report.scheduled) == (
            LISTED,
            True,
            LEASES + 1,
        )
        assert {SettleOutcome.REVOKED} == {
            r.outcome for r in report.results if r.credential_id != in_flight.credential_id
        }
        # The in-flight mint's task is tombstoned wherever its lease was read.
        with pytest.raises(ConflictError) as refused:
            await ledger.activate(
                in_flight.credential_id, token_accessor=in_flight_accessor, vault_lease_ids=()
            )
        assert refused.value.reason == "lease.tombstoned"

        sweep = await revoker.revoke_due(clock.now())

        assert set(rest) <= set(sweep.revoked)
        states: dict[str, LeaseState] = {}
        async for found in ledger.iter_leases(LeaseSelector(holder=AGENT), batch=100):
            states.update((x.credential_id, x.state) for x in found)
        assert {*accessors, in_flight.credential_id} == set(states)
        assert {LeaseState.REVOKED} == set(states.values())
        assert not any(await _alive(stack, [*accessors.values(), in_flight_accessor]))
        # Only the holder's: the other lease and its token are untouched.
        kept = await ledger.get_lease(other.credential_id)
        assert kept is not None
        assert kept.state is LeaseState.ACTIVE
        assert await asyncio.to_thread(token_alive, stack, other_accessor)
        (forced,) = [e for e in audit.events if e.type is EventType.REVOCATION_FORCED]
        payload = forced.as_dict()["payload"]
        assert (payload["matched"], payload["scheduled"], payload["confirmed"]) == (
            LEASES + 1,
            LEASES + 1,
            len(report.confirmed_revoked),
        )
        revoked = [e.credential_id for e in audit.events if e.type is EventType.CREDENTIAL_REVOKED]
        assert sorted(states) == sorted(revoked)
    finally:
        await minter.revoke(token_accessor=other_accessor, vault_lease_ids=())
        await minter.revoke(token_accessor=in_flight_accessor, vault_lease_ids=())
