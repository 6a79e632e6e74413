"""Quarantine storage: the same behaviour from the in-memory fake and from Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from broker.core.model import Lease, Quarantine, QuarantineKind
from broker.core.ports import IdempotencyBinding, IssuanceLimits, LeaseSelector, QuarantineStore
from broker.errors import ForbiddenError
from tests.contract.conftest import Ledgers
from tests.contract.test_ledger import make_lease

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def quarantine(kind: QuarantineKind, value: str, minutes: int = 10) -> Quarantine:
    return Quarantine(
        kind=kind,
        value=value,
        reason="incident INC-7",
        created_by="spiffe://tasklease.test/admin/demo",
        created_at=NOW,
        expires_at=NOW + timedelta(minutes=minutes),
    )


async def test_set_list_replace_lift(ledgers: Ledgers) -> None:
    store = cast(QuarantineStore, ledgers.new())
    agent = quarantine(QuarantineKind.IDENTITY, "spiffe://tasklease.test/agent/demo")
    target = quarantine(QuarantineKind.TARGET, "demo-db")
    await store.set_quarantine(agent)
    await store.set_quarantine(target)
    assert await store.quarantines(NOW) == [agent, target]
    longer = quarantine(QuarantineKind.TARGET, "demo-db", minutes=60)
    await store.set_quarantine(longer)
    assert await store.quarantines(NOW) == [agent, longer]
    assert await store.lift_quarantine(QuarantineKind.TARGET, "demo-db") is True
    assert await store.lift_quarantine(QuarantineKind.TARGET, "demo-db") is False
    assert await store.quarantines(NOW) == [agent]


async def test_expired_quarantines_are_gone(ledgers: Ledgers) -> None:
    store = cast(QuarantineStore, ledgers.new())
    await store.set_quarantine(quarantine(QuarantineKind.WORKFLOW, "wf-1", minutes=1))
    assert len(await store.quarantines(NOW + timedelta(seconds=59))) == 1
    assert await store.quarantines(NOW + timedelta(minutes=1)) == []
    # Dropped, not just hidden: a clock stepping back does not revive it.
    assert await store.quarantines(NOW) == []


def test_what_each_kind_blocks() -> None:
    args = {
        "principal": "spiffe://tasklease.test/agent/demo",
        "workflow_id": "wf-1",
        "target": "demo-db",
    }
    assert quarantine(QuarantineKind.IDENTITY, "spiffe://tasklease.test/agent/demo").blocks(**args)
    assert not quarantine(QuarantineKind.IDENTITY, "spiffe://tasklease.test/agent").blocks(**args)
    assert quarantine(QuarantineKind.IDENTITY_PREFIX, "spiffe://tasklease.test/agent/").blocks(
        **args
    )
    assert quarantine(QuarantineKind.WORKFLOW, "wf-1").blocks(**args)
    assert not quarantine(QuarantineKind.WORKFLOW, "wf-2").blocks(**args)
    assert quarantine(QuarantineKind.TARGET, "demo-db").blocks(**args)


# --------------------------------------------------------------------------- at write-ahead
# The write-ahead checks the quarantines in its own atomic command: one stored after the
# issuing request read them (a security team racing an agent) still blocks the credential.

AGENT = "spiffe://tasklease.test/agent/demo"


def lease(credential_id: str, **changes: object) -> Lease:
    changes.setdefault("issued_at", NOW)
    return make_lease(credential_id, holder=AGENT, target="demo-db", **changes)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (QuarantineKind.IDENTITY, AGENT),
        (QuarantineKind.IDENTITY_PREFIX, "spiffe://tasklease.test/agent/"),
        (QuarantineKind.WORKFLOW, "wf-1"),
        (QuarantineKind.TARGET, "demo-db"),
    ],
)
async def test_a_quarantine_in_force_refuses_the_write_ahead(
    ledgers: Ledgers, kind: QuarantineKind, value: str
) -> None:
    ledger = ledgers.new()
    store = cast(QuarantineStore, ledger)
    blocking = quarantine(kind, value)
    await store.set_quarantine(blocking)
    with pytest.raises(ForbiddenError) as caught:
        await ledger.write_ahead(
            lease("cred_q"),
            idempotency=IdempotencyBinding(f"{AGENT}|k1", "fp-1", timedelta(hours=1)),
            limits=IssuanceLimits(per_identity=5, per_minute=60),
        )
    assert caught.value.reason == "quarantine.active"
    assert caught.value.detail == blocking.refusal().detail
    # Nothing written, nothing bound, nothing counted or taken from the bucket.
    assert await ledger.get_lease("cred_q") is None
    assert await ledger.find_leases(LeaseSelector(holder=AGENT), limit=10) == []
    await store.lift_quarantine(kind, value)
    one_a_minute = IssuanceLimits(per_identity=1, per_minute=1)
    bound = IdempotencyBinding(f"{AGENT}|k1", "fp-2", timedelta(hours=1))
    assert await ledger.write_ahead(lease("cred_r"), idempotency=bound, limits=one_a_minute) is None


async def test_a_quarantine_that_covers_someone_else_or_has_ended_does_not(
    ledgers: Ledgers,
) -> None:
    ledger = ledgers.new()
    store = cast(QuarantineStore, ledger)
    for other in (
        quarantine(QuarantineKind.IDENTITY, f"{AGENT}-2"),
        quarantine(QuarantineKind.IDENTITY, "spiffe://tasklease.test/agent"),
        quarantine(QuarantineKind.IDENTITY_PREFIX, "spiffe://tasklease.test/orchestrator/"),
        quarantine(QuarantineKind.WORKFLOW, "wf-2"),
        quarantine(QuarantineKind.TARGET, "demo-db-2"),
        # In force until the very moment the lease is asked for: over by then.
        quarantine(QuarantineKind.IDENTITY, AGENT, minutes=1),
    ):
        await store.set_quarantine(other)
    assert await ledger.write_ahead(lease("cred_a", issued_at=NOW + timedelta(minutes=1))) is None
    # Written already (a retried call whose answer was lost): not refused, whatever came since.
    await store.set_quarantine(quarantine(QuarantineKind.TARGET, "demo-db", minutes=30))
    assert await ledger.write_ahead(lease("cred_a", issued_at=NOW + timedelta(minutes=1))) is None
    with pytest.raises(ForbiddenError):
        await ledger.write_ahead(lease("cred_b", issued_at=NOW + timedelta(minutes=1)))
