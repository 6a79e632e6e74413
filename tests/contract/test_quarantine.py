"""Quarantine storage: the same behaviour from the in-memory fake and from Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

from broker.core.model import Quarantine, QuarantineKind
from broker.core.ports import QuarantineStore
from tests.contract.conftest import Ledgers

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
