"""A sweep of the same process landing between a request's marking of a lease (due now) and
its own revocation of it: a completion with wait, a forced revocation, a release. The request
revokes and reports the lease itself; its credential.revoked names who asked, and comes after
workflow.completed. (Under CPU load a sweeper tick landed in that gap, during the completion's
durable workflow.completed record, and the sweep revoked the lease on its own account.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import pytest

from broker.core.model import Lease
from broker.core.ports import LeaseSelector
from broker.revocation import (
    RevocationReport,
    RevokeReason,
    RunOutcome,
    SettleOutcome,
    SweepReport,
)
from tests.unit.test_audit_emission import (
    ADMIN,
    ADMIN_CALLER,
    AGENT,
    AGENT_CALLER,
    ORCH,
    ORCH_CALLER,
    T,
    World,
)


def _sweep_after_marking(world: World, sweeps: list[SweepReport]) -> None:
    """A sweeper tick right after the request makes the lease due (its first ``schedule``),
    as a loaded machine lets it land anywhere before the request settles the lease."""
    ledger = world.ledger
    real = ledger.schedule

    async def schedule(credential_id: str, due_at: datetime) -> None:
        await real(credential_id, due_at)
        if not sweeps:
            sweeps.append(SweepReport(claimed=0, results=()))  # no tick from the tick itself
            sweeps[0] = await world.revoker.revoke_due(world.clock.now())

    ledger.schedule = schedule  # type: ignore[method-assign]


async def _complete(world: World, _: str) -> RevocationReport:
    result = await world.revoker.complete_workflow(
        ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True
    )
    assert result.report is not None
    return result.report


async def _force(world: World, _: str) -> RevocationReport:
    return await world.revoker.force(
        ADMIN_CALLER, LeaseSelector(workflow_id="wf-1", task_id="t-1"), "INC-7 (test)"
    )


async def _release(world: World, credential_id: str) -> RevocationReport:
    return await world.revoker.release(AGENT_CALLER, credential_id)


@pytest.mark.parametrize(
    ("request_", "cause", "initiated_by", "reason"),
    [
        (_complete, "run_completed", ORCH, ""),
        (_force, "forced", ADMIN, "INC-7 (test)"),
        (_release, "released", AGENT, ""),
    ],
    ids=["completion", "force", "release"],
)
async def test_a_sweep_between_marking_and_settling_leaves_the_lease_to_the_request(
    request_: Callable[[World, str], Awaitable[RevocationReport]],
    cause: str,
    initiated_by: str,
    reason: str,
) -> None:
    world = World()
    await world.start()
    credential_id = await world.issue()
    sweeps: list[SweepReport] = []
    _sweep_after_marking(world, sweeps)

    report = await request_(world, credential_id)

    (sweep,) = sweeps
    assert (sweep.claimed, sweep.results) == (1, ())  # claimed, left to the request
    assert [(r.credential_id, r.outcome) for r in report.results] == [
        (credential_id, SettleOutcome.REVOKED)
    ]
    assert world.minter.revoked == ["acc-1"]  # one revocation in Vault
    revoked = [e for e in world.audit.events if e.type is T.CREDENTIAL_REVOKED]
    assert [e.as_dict()["payload"] for e in revoked] == [
        {"cause": cause, "target": "demo-db", "reason": reason, "initiated_by": initiated_by}
    ]
    if request_ is _complete:
        assert world.types()[-2:] == ["workflow.completed", "credential.revoked"]
    # Nothing is left due: the request's confirmation removed what the sweep put back.
    later = world.clock.now() + timedelta(hours=1)
    assert await world.ledger.claim_due(later, limit=10, visibility=timedelta(seconds=1)) == []


async def test_a_request_that_fails_before_settling_leaves_the_lease_to_the_sweeper() -> None:
    """The reservation ends with the request: a lease it marked but never settled (the ledger
    failed under it) is revoked by a later sweep, due again shortly after the deferred tick."""
    world = World()
    await world.start()
    issued = await world.issue()
    sweeps: list[SweepReport] = []
    _sweep_after_marking(world, sweeps)
    real_get = world.ledger.get_lease
    failing = {"armed": True}

    async def get_lease(credential_id: str) -> Lease | None:
        if failing["armed"] and sweeps and sweeps[0].claimed:
            failing["armed"] = False
            raise RuntimeError("the request dies here")
        return await real_get(credential_id)

    world.ledger.get_lease = get_lease  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await world.revoker.release(AGENT_CALLER, issued)
    assert sweeps[0].results == ()
    world.clock.current += timedelta(seconds=1)  # backoff_base: due again
    swept = await world.revoker.revoke_due(world.clock.now())
    assert swept.revoked == (issued,)
    assert world.minter.revoked == ["acc-1"]


async def test_a_sweep_between_marking_and_settling_leaves_a_broker_decided_revocation_alone() -> (
    None
):
    """``revoke_leases`` (continuous authorization: its caller records credential.revoked):
    a sweep landing in between would have recorded a second event of its own."""
    world = World()
    await world.start()
    credential_id = await world.issue()
    (lease,) = await world.ledger.find_leases(LeaseSelector(workflow_id="wf-1"))
    sweeps: list[SweepReport] = []
    _sweep_after_marking(world, sweeps)

    report = await world.revoker.revoke_leases([lease], RevokeReason.CONTINUOUS_AUTHORIZATION)

    (sweep,) = sweeps
    assert (sweep.claimed, sweep.results) == (1, ())
    assert [(r.credential_id, r.outcome) for r in report.results] == [
        (credential_id, SettleOutcome.REVOKED)
    ]
    assert world.minter.revoked == ["acc-1"]
    # The caller records the revocation; neither the sweep nor this call did.
    assert T.CREDENTIAL_REVOKED not in [e.type for e in world.audit.events]
