"""Completing a run that holds more leases than one call lists: every live lease of the run is
made due now and every task tombstoned, batch by batch; a waiting caller's report lists the
first ``MAX_ADDRESSED`` and says ``truncated``, and the sweeper revokes the rest at once.
(The limits are made small here: 2 leases per batch, 5 per report.)"""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.adapters.memory_ledger import InMemoryLedger
from broker.core.model import LeaseState
from broker.errors import ConflictError
from broker.revocation import RevokeReason, RunOutcome, SettleOutcome
from tests.unit.test_revocation import (
    NOW,
    ORCH_CALLER,
    Clock,
    FakeMinter,
    issue,
    revoker,
    start_run,
    stored,
)

LEASES = 12


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.revocation._RUN_BATCH", 2)
    monkeypatch.setattr("broker.revocation.MAX_ADDRESSED", 5)


async def _run_with_leases(ledger: InMemoryLedger) -> list[str]:
    await start_run(ledger)
    ids = [f"c-{n:02d}" for n in range(LEASES)]
    for n, cid in enumerate(ids):
        await issue(ledger, cid, task_id=f"t-{n}")
    return ids


async def test_completion_makes_every_lease_of_a_large_run_due_now() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    ids = await _run_with_leases(ledger)
    engine = revoker(ledger, minter, clock)

    result = await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=False)

    assert sorted(ids) == sorted(result.scheduled)
    for cid in ids:
        lease = await stored(ledger, cid)
        assert (lease.state, lease.revoke_reason) == (
            LeaseState.REVOKING,
            RevokeReason.RUN_COMPLETED.value,
        )
    sweep = await engine.revoke_due(NOW)
    assert sorted(ids) == sorted(sweep.revoked)


async def test_a_waiting_caller_gets_the_first_leases_and_truncated_and_the_rest_are_swept() -> (
    None
):
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    ids = await _run_with_leases(ledger)
    engine = revoker(ledger, minter, clock)

    result = await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)

    report = result.report
    assert report is not None
    assert (len(report.results), report.truncated, report.complete) == (5, True, False)
    assert {SettleOutcome.REVOKED} == {r.outcome for r in report.results}
    assert len(ids) == len(result.scheduled)
    sweep = await engine.revoke_due(NOW)
    listed = {r.credential_id for r in report.results}
    assert sorted(set(ids) - listed) == sorted(sweep.revoked)
    assert {LeaseState.REVOKED} == {(await stored(ledger, cid)).state for cid in ids}


async def test_every_task_of_a_large_run_is_tombstoned() -> None:
    """A mint of the run's last task, written ahead before the completion, cannot activate."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await _run_with_leases(ledger)
    in_flight = await issue(ledger, "c-late", task_id=f"t-{LEASES - 1}", activate=False)
    engine = revoker(ledger, minter, clock)
    await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=False)
    with pytest.raises(ConflictError) as refused:
        await ledger.activate(in_flight.credential_id, token_accessor="acc-x", vault_lease_ids=())
    assert refused.value.reason == "lease.tombstoned"


async def test_a_run_of_exactly_one_report_is_not_truncated() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    for n in range(5):
        await issue(ledger, f"c-{n}", task_id=f"t-{n}", ttl=timedelta(minutes=5))
    result = await revoker(ledger, minter, clock).complete_workflow(
        ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True
    )
    assert result.report is not None
    assert (len(result.report.results), result.report.truncated, result.report.complete) == (
        5,
        False,
        True,
    )
