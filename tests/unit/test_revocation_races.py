"""Races between a completion in progress and sweeps, found with two broker processes
(tests/integration/test_revocation_faults.py) and pinned down here with fakes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from structlog.testing import capture_logs

from broker.adapters.memory_ledger import InMemoryLedger
from broker.core.model import Lease, LeaseState
from broker.revocation import RunOutcome
from tests.unit.test_revocation import (
    ORCH_CALLER,
    Clock,
    FakeMinter,
    issue,
    revoker,
    start_run,
)


class SlowMarkingLedger(InMemoryLedger):
    """Holds the first write of ``held`` as revoking (a completion marking it) until
    ``release`` is set, as a slow Redis would during the marking of a large run."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self._passed = False

    async def save_lease(self, lease: Lease) -> None:
        if (
            lease.credential_id == self.held
            and lease.state is LeaseState.REVOKING
            and not self._passed
        ):
            self._passed = True
            self.holding.set()
            await self.release.wait()
        await super().save_lease(lease)


async def test_a_run_still_being_marked_is_not_rechecked_for_late_mints() -> None:
    """A sweep past the first late-mint recheck, while the completion is still marking: the
    leases not marked yet are not late mints (marking them a second time would move them out
    from under another replica's claim). Each lease is revoked once."""
    ledger, minter, clock = SlowMarkingLedger(held="c-2"), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1", task_id="t-1")
    await issue(ledger, "c-2", task_id="t-2")
    engine = revoker(ledger, minter, clock, concurrency=1)
    completion = asyncio.create_task(
        engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=False)
    )
    await asyncio.wait_for(ledger.holding.wait(), timeout=5)
    with capture_logs() as logs:
        during = await engine.revoke_due(clock.advance(timedelta(seconds=2)))
    assert (during.revoked, during.late_mints) == (("c-1",), 0)
    assert [e for e in logs if e["event"] == "revocation.late_mint_found"] == []

    ledger.release.set()
    done = await completion
    assert done.scheduled == ("c-1", "c-2")
    after = await engine.revoke_due(clock.advance(timedelta(seconds=1)))
    assert (after.revoked, after.late_mints) == (("c-2",), 0)
    assert minter.calls == ["acc-c-1", "acc-c-2"]
