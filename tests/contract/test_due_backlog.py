"""``due_backlog`` (the revocation backlog behind /metrics) agrees on the fake and real Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

from broker.adapters.memory_ledger import DueBacklog, InMemoryLedger
from broker.adapters.redis_ledger import RedisLedger
from broker.core.model import DelegationChain, DelegationHop, Lease, Sensitivity, TargetKind
from tests.contract.conftest import Ledgers

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
CHAIN = DelegationChain((DelegationHop("owner", "alice", verified=False),))


def _lease(credential_id: str, expires_at: datetime) -> Lease:
    return Lease(
        credential_id=credential_id,
        workflow_id="wf-1",
        task_id=f"t-{credential_id}",
        target="demo-kv",
        kind=TargetKind.VAULT_TOKEN,
        sensitivity=Sensitivity.PUBLIC,
        holder="spiffe://tasklease.test/agent/demo",
        owner="alice",
        chain=CHAIN,
        issued_at=NOW - timedelta(minutes=5),
        expires_at=expires_at,
    )


async def test_the_backlog_counts_due_claimed_and_expired_claims(ledgers: Ledgers) -> None:
    ledger = cast(InMemoryLedger | RedisLedger, ledgers.new())
    assert await ledger.due_backlog(NOW) == DueBacklog(0, 0, 0, None)
    for i, age in enumerate([40, 30, 20, 10]):
        await ledger.write_ahead(_lease(f"c-{i}", NOW - timedelta(seconds=age)))
    await ledger.write_ahead(_lease("later", NOW + timedelta(minutes=1)))
    # c-0 claimed by a claimer whose visibility ended 5 s ago; c-1 by one still working.
    assert await ledger.claim_due(
        NOW - timedelta(seconds=35), limit=1, visibility=timedelta(seconds=30)
    ) == ["c-0"]
    assert await ledger.claim_due(
        NOW - timedelta(seconds=6), limit=1, visibility=timedelta(seconds=30)
    ) == ["c-1"]
    assert await ledger.due_backlog(NOW) == DueBacklog(
        due=2, claimed=2, claim_expired=1, oldest_due_at=NOW - timedelta(seconds=20)
    )
    await ledger.ack("c-1")
    await ledger.schedule("c-2", NOW + timedelta(seconds=1))
    assert await ledger.due_backlog(NOW) == DueBacklog(
        due=1, claimed=1, claim_expired=1, oldest_due_at=NOW - timedelta(seconds=10)
    )
