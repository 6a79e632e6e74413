"""The revocation engine with fakes: the in-memory ledger, a scripted minter, frozen clocks."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from broker.adapters.config_files import load_policy_engine, load_target_catalog
from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.scheduler import RevocationSweeper
from broker.core.authn import Caller, CallerAuthenticator
from broker.core.identity import AuthMethod, HumanIdentity, WorkloadIdentity
from broker.core.model import (
    CredentialRequest,
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    RunState,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)
from broker.core.ports import (
    IdempotencyBinding,
    IssuanceLimits,
    LeaseSelector,
    MintedCredential,
    MintSpec,
    RevokeOutcome,
)
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    LedgerUnavailableError,
    NotFoundError,
    TaskleaseError,
    VaultUnavailableError,
)
from broker.http.app import create_app
from broker.http.revocation_routes import register_revocation_routes
from broker.revocation import (
    RevocationSettings,
    Revoker,
    RevokeReason,
    RunOutcome,
    SettleOutcome,
)
from broker.service import CredentialBroker, IssuedCredential, Readiness

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
OTHER_AGENT = "spiffe://tasklease.test/agent/other"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
ADMIN = "spiffe://tasklease.test/admin/demo"
SECOND = timedelta(seconds=1)
CONFIRMED = RevokeOutcome(confirmed=True)


class Clock:
    """A frozen clock the test moves (forwards or backwards) by hand."""

    def __init__(self, now: datetime = NOW) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> datetime:
        self.current += delta
        return self.current


class FakeMinter:
    """Revokes by script: each call takes the next scripted answer (an outcome or an
    exception to raise), then ``default``. Mints like the issuance tests' fake."""

    def __init__(self, default: RevokeOutcome | BaseException = CONFIRMED) -> None:
        self.default = default
        self.script: list[RevokeOutcome | BaseException] = []
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        self.active = 0
        self.max_active = 0
        self.minted: list[MintSpec] = []
        self.mint_gate: asyncio.Event | None = None
        self.minting = asyncio.Event()

    async def mint(self, spec: MintSpec) -> MintedCredential:
        self.minting.set()
        if self.mint_gate is not None:
            await self.mint_gate.wait()
        self.minted.append(spec)
        return MintedCredential(
            token_accessor=f"acc-minted-{len(self.minted)}",
            vault_lease_ids=(f"database/creds/demo/minted-{len(self.minted)}",),
            expires_at=NOW + spec.ttl,
            secret={"password": "s3cret"},
        )

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.calls.append(token_accessor)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            if self.gate is not None:
                await self.gate.wait()
            answer = self.script.pop(0) if self.script else self.default
            if isinstance(answer, BaseException):
                raise answer
            return answer
        finally:
            self.active -= 1


def settings(**overrides: Any) -> RevocationSettings:
    return dataclasses.replace(RevocationSettings(), **overrides)


def revoker(
    ledger: InMemoryLedger,
    minter: FakeMinter,
    clock: Clock,
    *,
    rng: random.Random | None = None,
    **overrides: Any,
) -> Revoker:
    return Revoker(
        ledger=ledger,
        minter=minter,
        clock=clock,
        settings=settings(**overrides),
        rng=rng or random.Random(7),
    )


def caller(principal: str, *roles: Role) -> Caller:
    identity = WorkloadIdentity(
        SpiffeId.parse(principal), NOW + timedelta(hours=1), AuthMethod.X509_SVID
    )
    return Caller(identity, frozenset(roles))


AGENT_CALLER = caller(AGENT, Role.AGENT)
OTHER_CALLER = caller(OTHER_AGENT, Role.AGENT)
ORCH_CALLER = caller(ORCH, Role.ORCHESTRATOR)
ADMIN_CALLER = caller(ADMIN, Role.ADMIN)
PERSON_ADMIN = Caller(
    HumanIdentity("https://idp.test", "sec-1", "Sec One", NOW + timedelta(hours=1)),
    frozenset({Role.ADMIN}),
)


def chain(holder: str = AGENT) -> DelegationChain:
    return DelegationChain(
        (
            DelegationHop("owner", "alice", verified=False),
            DelegationHop("orchestrator", ORCH, verified=True),
            DelegationHop("agent", holder, verified=True),
        )
    )


async def start_run(
    ledger: InMemoryLedger, run_id: str = "wf-1", deadline: datetime = NOW + timedelta(hours=1)
) -> WorkflowRun:
    run = WorkflowRun(
        id=run_id,
        owner="alice",
        purpose="tests",
        started_by=ORCH,
        created_at=NOW - timedelta(minutes=1),
        deadline=deadline,
    )
    assert await ledger.create_run(run)
    return run


async def issue(
    ledger: InMemoryLedger,
    credential_id: str,
    *,
    workflow_id: str = "wf-1",
    task_id: str = "t-1",
    issued_at: datetime = NOW - timedelta(seconds=10),
    ttl: timedelta = timedelta(seconds=60),
    holder: str = AGENT,
    owner: str = "alice",
    target: str = "demo-db",
    kind: TargetKind = TargetKind.DATABASE,
    sensitivity: Sensitivity = Sensitivity.INTERNAL,
    revocable: bool = True,
    activate: bool = True,
) -> Lease:
    """A lease written ahead (and by default activated with Vault references)."""
    lease = Lease(
        credential_id=credential_id,
        workflow_id=workflow_id,
        task_id=task_id,
        target=target,
        kind=kind,
        sensitivity=sensitivity,
        holder=holder,
        owner=owner,
        chain=chain(holder),
        issued_at=issued_at,
        expires_at=issued_at + ttl,
        revocable=revocable,
    )
    await ledger.write_ahead(lease)
    if not activate:
        return lease
    lease_ids = (f"database/creds/demo/{credential_id}",) if kind is TargetKind.DATABASE else ()
    return await ledger.activate(
        credential_id, token_accessor=f"acc-{credential_id}", vault_lease_ids=lease_ids
    )


async def stored(ledger: InMemoryLedger, credential_id: str) -> Lease:
    lease = await ledger.get_lease(credential_id)
    assert lease is not None
    return lease


async def claimable(ledger: InMemoryLedger, at: datetime) -> list[str]:
    """What a sweeper could claim at ``at`` (claims are then dropped again)."""
    ids = await ledger.claim_due(at, limit=1000, visibility=timedelta(microseconds=1))
    for cid in ids:
        await ledger.schedule(cid, at)  # put back exactly as due
    return ids


# --------------------------------------------------------------------------- TTL sweeps


async def test_a_due_lease_is_revoked_confirmed_and_acknowledged() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock)
    before = await engine.revoke_due(lease.expires_at - timedelta(microseconds=1))
    assert (before.claimed, minter.calls) == (0, [])
    report = await engine.revoke_due(lease.expires_at)
    assert (report.claimed, report.revoked) == (1, ("c-1",))
    assert minter.calls == ["acc-c-1"]
    revoked = await stored(ledger, "c-1")
    assert (revoked.state, revoked.revoke_reason, revoked.revoked_at) == (
        LeaseState.REVOKED,
        RevokeReason.TTL_EXPIRED.value,
        lease.expires_at,
    )
    # Acknowledged: not claimable again, even after any visibility timeout.
    again = await engine.revoke_due(lease.expires_at + timedelta(hours=1))
    assert (again.claimed, minter.calls) == (0, ["acc-c-1"])


async def test_a_failed_revocation_backs_off_with_jitter_and_counts_attempts() -> None:
    ledger, clock = InMemoryLedger(), Clock()
    minter = FakeMinter(default=VaultUnavailableError("down", reason="vault.unreachable"))
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock, backoff_base=2 * SECOND, max_attempts=10)
    now = lease.expires_at
    for attempt in range(1, 5):
        report = await engine.revoke_due(now)
        (result,) = report.results
        assert result.outcome is SettleOutcome.RETRYING
        current = await stored(ledger, "c-1")
        assert (current.state, current.attempts) == (LeaseState.REVOKING, attempt)
        ceiling = 2 * SECOND * 2 ** (attempt - 1)
        assert result.next_attempt_at is not None
        assert now + ceiling / 2 <= result.next_attempt_at <= now + ceiling
        # Due exactly then: not a microsecond before.
        assert await claimable(ledger, result.next_attempt_at - timedelta(microseconds=1)) == []
        now = result.next_attempt_at
        assert await claimable(ledger, now) == ["c-1"]
    assert len(minter.calls) == 4


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (5, 5.0, 10.0), (49, 5.0, 10.0), (50, 30, 60)],
)
def test_the_retry_delay_is_jittered_within_half_to_full_of_the_capped_exponential(
    attempts: int, low: float, high: float
) -> None:
    """base 1 s, cap 10 s; revoke_failed after 50 attempts → 60 s cadence."""
    engine = Revoker(
        ledger=InMemoryLedger(),
        minter=FakeMinter(),
        clock=Clock(),
        settings=settings(
            backoff_cap=10 * SECOND, max_attempts=50, failed_retry_interval=60 * SECOND
        ),
        rng=random.Random(1),
    )
    delays = [engine.retry_delay(attempts).total_seconds() for _ in range(500)]
    assert low <= min(delays) < low + (high - low) * 0.05
    assert high - (high - low) * 0.05 < max(delays) <= high


async def test_after_max_attempts_the_lease_is_revoke_failed_alerted_and_still_retried() -> None:
    ledger, clock = InMemoryLedger(), Clock()
    minter = FakeMinter(default=VaultUnavailableError("db down", reason="vault.invalid_request"))
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    engine = revoker(
        ledger, minter, clock, max_attempts=3, failed_retry_interval=timedelta(minutes=10)
    )
    now = lease.expires_at
    outcomes = []
    with capture_logs() as logs:
        for _ in range(4):
            (result,) = (await engine.revoke_due(now)).results
            outcomes.append(result.outcome)
            assert result.next_attempt_at is not None
            now = result.next_attempt_at
    assert outcomes == [
        SettleOutcome.RETRYING,
        SettleOutcome.RETRYING,
        SettleOutcome.REVOKE_FAILED,
        SettleOutcome.REVOKE_FAILED,
    ]
    failed = await stored(ledger, "c-1")
    assert (failed.state, failed.attempts, failed.revoked_at) == (LeaseState.REVOKE_FAILED, 4, None)
    alerts = [e for e in logs if e["event"] == "credential.revoke_failed"]
    assert [(e["alert"], e["attempts"], e["credential_id"]) for e in alerts] == [(True, 3, "c-1")]
    assert "credential.revoked" not in [e["event"] for e in logs]
    registry = engine.metrics.registry
    assert registry.get_sample_value("tasklease_revoke_failed_total") == 1
    assert registry.get_sample_value("tasklease_revoke_failed_leases") == 1
    # Slow cadence: the retry after revoke_failed is 5-10 minutes away.
    assert lease.expires_at + timedelta(minutes=5) < now
    # The backend recovers: the next slow retry confirms it.
    minter.default = CONFIRMED
    (result,) = (await engine.revoke_due(now)).results
    assert result.outcome is SettleOutcome.REVOKED
    assert (await stored(ledger, "c-1")).state is LeaseState.REVOKED
    assert registry.get_sample_value("tasklease_revoke_failed_leases") == 0


async def test_an_unconfirmed_revocation_is_never_marked_revoked() -> None:
    """SECURITY 25: Vault said success but a lookup still finds the lease."""
    ledger, clock = InMemoryLedger(), Clock()
    minter = FakeMinter(
        default=RevokeOutcome(confirmed=False, still_live=("database/creds/demo/c-1",))
    )
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock)
    (result,) = (await engine.revoke_due(lease.expires_at)).results
    current = await stored(ledger, "c-1")
    assert (result.outcome, current.state, current.revoked_at) == (
        SettleOutcome.RETRYING,
        LeaseState.REVOKING,
        None,
    )
    assert current.last_error == "revoke.unconfirmed: 1 item(s) still known to Vault"


async def test_last_error_is_a_reason_code_never_the_backend_message() -> None:
    ledger, clock = InMemoryLedger(), Clock()
    leaky = BadRequestError(
        "OpenBao refused (400): failed to connect to postgres://vaultadmin:hunter2@db",
        reason="vault.invalid_request",
    )
    minter = FakeMinter(default=leaky)
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    with capture_logs() as logs:
        await revoker(ledger, minter, clock).revoke_due(lease.expires_at)
    current = await stored(ledger, "c-1")
    assert current.last_error == "vault.invalid_request: Bad request"
    assert "hunter2" not in repr(logs)


async def test_a_revocation_that_hangs_counts_as_failed_after_the_timeout() -> None:
    ledger, clock = InMemoryLedger(), Clock()
    minter = FakeMinter()
    minter.delay = 5.0
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    engine = revoker(
        ledger, minter, clock, revoke_timeout=timedelta(milliseconds=50), visibility=SECOND
    )
    (result,) = (await engine.revoke_due(lease.expires_at)).results
    assert result.outcome is SettleOutcome.RETRYING
    assert (await stored(ledger, "c-1")).last_error.startswith("revoke.timeout")


async def test_an_issuing_lease_without_vault_references_is_left_until_it_expires() -> None:
    """The mint never recorded: nothing to revoke; its token (if any) expires in Vault."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    lease = await issue(ledger, "c-1", activate=False)
    engine = revoker(ledger, minter, clock, unrecorded_recheck=5 * SECOND)
    # Made due early (as a completion does): looked at again soon, never revoked early.
    await ledger.schedule("c-1", NOW)
    (early,) = (await engine.revoke_due(NOW)).results
    assert (early.outcome, early.next_attempt_at) == (
        SettleOutcome.MINT_IN_FLIGHT,
        NOW + 5 * SECOND,
    )
    assert (await stored(ledger, "c-1")).state is LeaseState.ISSUING
    (late,) = (await engine.revoke_due(lease.expires_at)).results
    ended = await stored(ledger, "c-1")
    assert (late.outcome, ended.state, ended.revoke_reason) == (
        SettleOutcome.EXPIRED,
        LeaseState.REVOKED,
        RevokeReason.EXPIRED_UNRECORDED.value,
    )
    assert minter.calls == []


async def test_a_non_revocable_lease_is_live_until_its_expiry_then_revoked_as_expired() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    lease = await issue(ledger, "ssh-1", kind=TargetKind.SSH, target="demo-ssh", revocable=False)
    engine = revoker(ledger, minter, clock)
    result = await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    assert result.report is not None
    (live,) = result.report.still_live
    assert (live.outcome, live.lease.state if live.lease else None) == (
        SettleOutcome.NOT_REVOCABLE,
        LeaseState.ACTIVE,
    )
    assert result.report.complete is False
    assert await claimable(ledger, lease.expires_at - timedelta(microseconds=1)) == []
    (expired,) = (await engine.revoke_due(lease.expires_at)).results
    ended = await stored(ledger, "ssh-1")
    assert (expired.outcome, ended.state, ended.revoke_reason) == (
        SettleOutcome.EXPIRED,
        LeaseState.REVOKED,
        RevokeReason.EXPIRED.value,
    )
    assert minter.calls == []


async def test_a_sweep_settles_at_most_its_batch_oldest_first() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    for i in range(10):
        await issue(ledger, f"c-{i:02d}", issued_at=NOW + i * SECOND)
    engine = revoker(ledger, minter, clock, sweep_batch=4, concurrency=3)
    later = NOW + timedelta(hours=1)
    first = await engine.revoke_due(later)
    assert first.claimed == 4
    assert sorted(first.revoked) == ["c-00", "c-01", "c-02", "c-03"]
    second = await engine.revoke_due(later)
    assert sorted(second.revoked) == ["c-04", "c-05", "c-06", "c-07"]
    assert minter.max_active <= 3


async def test_sweep_metrics_report_lag_and_overdue() -> None:
    ledger, clock = InMemoryLedger(), Clock()
    minter = FakeMinter()
    await start_run(ledger)
    old = await issue(ledger, "c-old", issued_at=NOW - timedelta(minutes=5))
    await issue(ledger, "c-new", issued_at=NOW - timedelta(seconds=70))
    minter.script = [VaultUnavailableError("down", reason="vault.unreachable")]
    engine = revoker(ledger, minter, clock)
    report = await engine.revoke_due(NOW)
    # c-old (oldest) failed; c-new revoked 10 s after its expiry.
    assert report.lag == timedelta(seconds=10)
    registry = engine.metrics.registry
    assert registry.get_sample_value("tasklease_revocation_sweep_lag_seconds") == 10.0
    assert registry.get_sample_value("tasklease_revocations_overdue") == 1
    assert (
        registry.get_sample_value(
            "tasklease_revocations_total", {"kind": "database", "outcome": "revoked"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "tasklease_revocations_total", {"kind": "database", "outcome": "retrying"}
        )
        == 1
    )
    assert old.expires_at < NOW


async def test_a_sweep_marks_a_run_past_its_deadline_expired() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    deadline = NOW + timedelta(minutes=1)
    await start_run(ledger, deadline=deadline)
    # TTLs never pass the deadline: the last lease expires with the run.
    await issue(ledger, "c-1", issued_at=NOW, ttl=timedelta(minutes=1))
    engine = revoker(ledger, minter, clock)
    await engine.revoke_due(deadline)
    run = await ledger.get_run("wf-1")
    assert run is not None
    assert (run.state, run.ended_at, run.outcome) == (RunState.EXPIRED, deadline, "deadline")


# --------------------------------------------------------------------------- completion


@pytest.mark.parametrize(
    ("outcome", "state", "reason"),
    [
        (RunOutcome.COMPLETED, RunState.COMPLETED, RevokeReason.RUN_COMPLETED),
        (RunOutcome.FAILED, RunState.FAILED, RevokeReason.RUN_FAILED),
        (RunOutcome.CANCELLED, RunState.CANCELLED, RevokeReason.RUN_CANCELLED),
    ],
)
async def test_completion_revokes_every_credential_of_the_run_and_reports_it(
    outcome: RunOutcome, state: RunState, reason: RevokeReason
) -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await start_run(ledger, "wf-other")
    await issue(ledger, "c-1", task_id="t-1")
    await issue(ledger, "c-2", task_id="t-2")
    await issue(ledger, "c-x", workflow_id="wf-other")
    engine = revoker(ledger, minter, clock)
    result = await engine.complete_workflow(ORCH_CALLER, "wf-1", outcome, wait=True)
    assert (result.run.state, result.run.ended_at, result.run.outcome) == (
        state,
        NOW,
        outcome.value,
    )
    assert result.report is not None
    assert result.report.complete is True
    assert sorted(r.credential_id for r in result.report.confirmed_revoked) == ["c-1", "c-2"]
    assert sorted(minter.calls) == ["acc-c-1", "acc-c-2"]
    for cid in ("c-1", "c-2"):
        lease = await stored(ledger, cid)
        assert (lease.state, lease.revoke_reason) == (LeaseState.REVOKED, reason.value)
    assert (await stored(ledger, "c-x")).state is LeaseState.ACTIVE
    saved = await ledger.get_run("wf-1")
    assert saved is not None
    assert saved.state is state


async def test_a_second_completion_is_idempotent() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock)
    first = await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    clock.advance(timedelta(minutes=1))
    second = await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.FAILED, wait=True)
    assert second.run == first.run  # same state, outcome and end time: nothing changed
    assert second.report is not None
    assert [(r.credential_id, r.outcome) for r in second.report.results] == [
        ("c-1", SettleOutcome.ALREADY_REVOKED)
    ]
    assert second.report.complete is True
    assert minter.calls == ["acc-c-1"]


async def test_completion_without_wait_makes_everything_due_for_the_sweeper() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1")
    await issue(ledger, "ssh-1", kind=TargetKind.SSH, target="demo-ssh", revocable=False)
    engine = revoker(ledger, minter, clock)
    result = await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=False)
    assert (result.scheduled, result.report, minter.calls) == (("c-1",), None, [])
    lease = await stored(ledger, "c-1")
    assert (lease.state, lease.revoke_reason) == (
        LeaseState.REVOKING,
        RevokeReason.RUN_COMPLETED.value,
    )
    report = await engine.revoke_due(NOW)
    assert report.revoked == ("c-1",)
    assert (await stored(ledger, "c-1")).revoke_reason == RevokeReason.RUN_COMPLETED.value


async def test_completion_after_the_deadline_records_the_run_as_expired() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger, deadline=NOW + timedelta(minutes=1))
    clock.advance(timedelta(minutes=2))
    result = await revoker(ledger, minter, clock).complete_workflow(
        ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True
    )
    assert (result.run.state, result.run.ended_at) == (RunState.EXPIRED, NOW + timedelta(minutes=1))


@pytest.mark.parametrize(
    ("who", "allowed"),
    [
        (ORCH_CALLER, True),
        (ADMIN_CALLER, True),
        (PERSON_ADMIN, True),
        (caller("spiffe://tasklease.test/orchestrator/other", Role.ORCHESTRATOR), False),
        (AGENT_CALLER, False),
    ],
)
async def test_only_the_runs_orchestrator_or_an_admin_completes_it(
    who: Caller, allowed: bool
) -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    engine = revoker(ledger, minter, clock)
    if allowed:
        result = await engine.complete_workflow(who, "wf-1", RunOutcome.COMPLETED, wait=True)
        assert result.run.state is RunState.COMPLETED
        return
    with pytest.raises(NotFoundError) as caught:
        await engine.complete_workflow(who, "wf-1", RunOutcome.COMPLETED, wait=True)
    assert caught.value.reason == "workflow.not_found"
    # A run that does not exist answers the same.
    with pytest.raises(NotFoundError):
        await engine.complete_workflow(who, "wf-nope", RunOutcome.COMPLETED, wait=True)
    run = await ledger.get_run("wf-1")
    assert run is not None
    assert run.state is RunState.ACTIVE


async def test_completion_reports_a_failing_revocation_as_still_live() -> None:
    """SECURITY 30: success only when every lease is confirmed revoked."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1", task_id="t-1")
    await issue(ledger, "c-2", task_id="t-2")
    minter.script = [CONFIRMED, VaultUnavailableError("sealed", reason="vault.sealed")]
    result = await revoker(ledger, minter, clock).complete_workflow(
        ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True
    )
    assert result.report is not None
    assert result.report.complete is False
    assert len(result.report.confirmed_revoked) == 1
    (live,) = result.report.still_live
    assert (live.outcome, live.detail) == (
        SettleOutcome.RETRYING,
        "vault.sealed: Vault unavailable",
    )


# --------------------------------------------------------------------------- SECURITY 29


def _broker(ledger: InMemoryLedger, minter: FakeMinter, clock: Clock) -> CredentialBroker:
    return CredentialBroker(
        policy=load_policy_engine(Path("config/policies")),
        minter=minter,
        ledger=ledger,
        targets=load_target_catalog(Path("config/targets.toml")),
        clock=clock,
    )


async def _wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_a_mint_racing_completion_is_revoked_within_one_sweep() -> None:
    """SECURITY 29: the lease is written ahead, completion tombstones its task while the mint
    is in flight; the late activation is refused, and the next sweep revokes the token even
    though the issuance path's own clean-up revoke failed."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    service = _broker(ledger, minter, clock)
    engine = revoker(ledger, minter, clock)
    minter.mint_gate = asyncio.Event()
    request = CredentialRequest(
        workflow_id="wf-1", task_id="t-1", target="demo-db", ttl=timedelta(minutes=5)
    )
    issuing = asyncio.create_task(service.request_credential(AGENT_CALLER, request, params={}))
    await minter.minting.wait()
    (written,) = await ledger.find_leases(LeaseSelector(workflow_id="wf-1"))
    assert written.state is LeaseState.ISSUING

    completion = await engine.complete_workflow(
        ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True
    )
    assert completion.report is not None
    (in_flight,) = completion.report.still_live
    assert in_flight.outcome is SettleOutcome.MINT_IN_FLIGHT

    # The mint finishes; the issuance path's revoke of it fails (OpenBao hiccup).
    minter.script = [VaultUnavailableError("down", reason="vault.unreachable")]
    minter.mint_gate.set()
    with pytest.raises(ConflictError) as refused:
        await issuing
    assert refused.value.reason == "lease.tombstoned"
    late = await stored(ledger, written.credential_id)
    assert (late.state, late.token_accessor) == (LeaseState.REVOKING, "acc-minted-1")

    report = await engine.revoke_due(clock.now())
    assert report.revoked == (written.credential_id,)
    ended = await stored(ledger, written.credential_id)
    assert (ended.state, ended.revoke_reason) == (
        LeaseState.REVOKED,
        RevokeReason.RUN_COMPLETED.value,
    )
    assert minter.calls == ["acc-minted-1", "acc-minted-1"]


class GatedWriteAheadLedger(InMemoryLedger):
    """Holds write-ahead until the test opens the gate (a request slow between reading the
    run and writing its lease). ``blind``: the write-ahead does not see that the run ended (as
    after a Redis failover that lost the completion's write, or on a replica of an older
    version)."""

    def __init__(self, *, blind: bool = False) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.blind = blind

    async def write_ahead(
        self,
        lease: Lease,
        *,
        idempotency: IdempotencyBinding | None = None,
        limits: IssuanceLimits | None = None,
    ) -> str | None:
        self.waiting.set()
        await self.gate.wait()
        ended = self._runs[lease.workflow_id]
        if self.blind:
            self._runs[lease.workflow_id] = dataclasses.replace(ended, state=RunState.ACTIVE)
        try:
            return await super().write_ahead(lease, idempotency=idempotency, limits=limits)
        finally:
            self._runs[lease.workflow_id] = ended


async def _completed_during_write_ahead(
    ledger: GatedWriteAheadLedger, minter: FakeMinter, clock: Clock
) -> tuple[asyncio.Task[IssuedCredential], Revoker]:
    """A request for a new task that read its run as active and waits to write ahead while
    the run is completed; then its write-ahead goes on (the request, and the revoker)."""
    await start_run(ledger)
    service = _broker(ledger, minter, clock)
    engine = revoker(ledger, minter, clock)
    request = CredentialRequest(
        workflow_id="wf-1", task_id="t-new", target="demo-db", ttl=timedelta(minutes=5)
    )
    issuing = asyncio.create_task(service.request_credential(AGENT_CALLER, request, params={}))
    await ledger.waiting.wait()
    await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    ledger.gate.set()
    return issuing, engine


async def test_a_request_whose_run_ended_while_it_was_decided_is_refused_at_write_ahead() -> None:
    """A request read the run as active, then completion ran: the write-ahead sees the ended
    run in its own atomic step and refuses; nothing is written or minted."""
    ledger, minter, clock = GatedWriteAheadLedger(), FakeMinter(), Clock()
    issuing, _ = await _completed_during_write_ahead(ledger, minter, clock)
    with pytest.raises(ConflictError) as refused:
        await issuing
    assert refused.value.reason == "workflow.not_active"
    assert minter.minted == []
    assert await ledger.find_leases(LeaseSelector(workflow_id="wf-1")) == []


async def test_a_lease_written_ahead_after_completion_listed_the_run_is_revoked() -> None:
    """A request read the run as active, then completion ran, then its lease (for a task not
    seen before, so not tombstoned) was written, blind to the ended run, and activated: the
    completing replica's watch finds it at the next sweep."""
    ledger, minter, clock = GatedWriteAheadLedger(blind=True), FakeMinter(), Clock()
    issuing, engine = await _completed_during_write_ahead(ledger, minter, clock)
    issued = await issuing  # the activation passed: no tombstone named this task
    clock.advance(SECOND)
    with capture_logs() as logs:
        report = await engine.revoke_due(clock.now())
    assert (report.late_mints, report.revoked) == (1, (issued.lease.credential_id,))
    lease = await stored(ledger, issued.lease.credential_id)
    assert (lease.state, lease.revoke_reason) == (
        LeaseState.REVOKED,
        RevokeReason.RUN_COMPLETED.value,
    )
    assert "revocation.late_mint_found" in [e["event"] for e in logs]


# --------------------------------------------------------------------------- SECURITY 34-36


async def test_two_sweepers_never_double_count_and_never_skip() -> None:
    """SECURITY 34: two replicas on one ledger, interleaving at every await."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    ids = [f"c-{i:03d}" for i in range(60)]
    for i, cid in enumerate(ids):
        await issue(ledger, cid, issued_at=NOW - timedelta(minutes=2) + i * SECOND)
    a = revoker(ledger, minter, clock, sweep_batch=8, concurrency=4)
    b = revoker(ledger, minter, clock, sweep_batch=8, concurrency=4)
    revoked: list[str] = []
    for _ in range(10):
        reports = await asyncio.gather(a.revoke_due(NOW), b.revoke_due(NOW))
        for report in reports:
            revoked.extend(report.revoked)
    assert sorted(revoked) == ids
    assert sorted(minter.calls) == [f"acc-{cid}" for cid in ids]
    assert {(await stored(ledger, cid)).state for cid in ids} == {LeaseState.REVOKED}
    counted = sum(
        r.metrics.registry.get_sample_value(
            "tasklease_revocations_total", {"kind": "database", "outcome": "revoked"}
        )
        or 0
        for r in (a, b)
    )
    assert counted == len(ids)


async def test_a_claim_that_expires_during_a_long_pause_is_a_harmless_duplicate() -> None:
    """SECURITY 34: sweeper A stalls past the visibility timeout; B takes the lease over and
    revokes it; A's late revoke is a duplicate, counted once as revoked."""
    ledger, clock = InMemoryLedger(), Clock()
    stalled, healthy = FakeMinter(), FakeMinter()
    stalled.gate = asyncio.Event()
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    a = revoker(ledger, stalled, clock, visibility=30 * SECOND)
    b = revoker(ledger, healthy, clock, visibility=30 * SECOND)
    sweep_a = asyncio.create_task(a.revoke_due(lease.expires_at))
    await _wait_for(lambda: stalled.active == 1)
    assert (await b.revoke_due(lease.expires_at + 29 * SECOND)).claimed == 0
    taken_over = await b.revoke_due(lease.expires_at + 30 * SECOND)
    assert taken_over.revoked == ("c-1",)
    stalled.gate.set()
    (late,) = (await sweep_a).results
    assert late.outcome is SettleOutcome.ALREADY_REVOKED
    assert (await stored(ledger, "c-1")).revoked_at == lease.expires_at + 30 * SECOND
    assert (await b.revoke_due(lease.expires_at + timedelta(hours=1))).claimed == 0


async def test_an_item_claimed_by_a_crashed_sweeper_returns_after_the_visibility_timeout() -> None:
    """SECURITY 35: the sweeper dies after claiming (its task is cancelled mid-revoke)."""
    ledger, clock = InMemoryLedger(), Clock()
    dying = FakeMinter()
    dying.gate = asyncio.Event()
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    crashed = revoker(ledger, dying, clock, visibility=20 * SECOND, revoke_timeout=5 * SECOND)
    sweep = asyncio.create_task(crashed.revoke_due(lease.expires_at))
    await _wait_for(lambda: dying.active == 1)
    sweep.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sweep
    assert (await stored(ledger, "c-1")).state is LeaseState.REVOKING  # not done, not lost
    survivor = revoker(
        ledger, FakeMinter(), clock, visibility=20 * SECOND, revoke_timeout=5 * SECOND
    )
    early = await survivor.revoke_due(lease.expires_at + 20 * SECOND - timedelta(microseconds=1))
    assert early.claimed == 0
    back = await survivor.revoke_due(lease.expires_at + 20 * SECOND)
    assert back.revoked == ("c-1",)


async def test_a_clock_stepping_forward_revokes_everything_now_expired_oldest_first() -> None:
    """SECURITY 36: due times are compared with the one clock's now, whatever it did."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    for i in range(5):
        await issue(ledger, f"c-{i}", issued_at=NOW + i * timedelta(minutes=1))
    engine = revoker(ledger, minter, clock, sweep_batch=2, concurrency=1)
    clock.advance(timedelta(hours=3))
    first = await engine.revoke_due(clock.now())
    assert first.revoked == ("c-0", "c-1")
    rest = await engine.revoke_due(clock.now())
    assert rest.revoked == ("c-2", "c-3")


async def test_a_clock_stepping_backward_revokes_nothing_early_and_loses_nothing() -> None:
    """SECURITY 36: after a step back, a non-revocable lease is not marked expired early and
    a backoff retry waits for its due time on the new clock; nothing is dropped."""
    ledger, clock = InMemoryLedger(), Clock()
    minter = FakeMinter()
    await start_run(ledger)
    ssh = await issue(ledger, "ssh-1", kind=TargetKind.SSH, target="demo-ssh", revocable=False)
    db = await issue(ledger, "c-1")
    minter.script = [VaultUnavailableError("down", reason="vault.unreachable")]
    engine = revoker(ledger, minter, clock)
    # A completion makes both due now; the database revoke fails once.
    await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    clock.advance(-timedelta(hours=1))
    stepped_back = await engine.revoke_due(clock.now())
    assert stepped_back.claimed == 0
    assert (await stored(ledger, "ssh-1")).state is LeaseState.ACTIVE
    clock.advance(timedelta(hours=2))
    final = await engine.revoke_due(clock.now())
    assert sorted(final.revoked) == ["c-1", "ssh-1"]
    assert ssh.expires_at < clock.now()
    assert db.expires_at < clock.now()


# --------------------------------------------------------------------------- release


async def test_the_holder_releases_a_credential_early() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock)
    report = await engine.release(AGENT_CALLER, "c-1")
    assert (report.complete, [r.outcome for r in report.results]) == (
        True,
        [SettleOutcome.REVOKED],
    )
    lease = await stored(ledger, "c-1")
    assert (lease.state, lease.revoke_reason, lease.revoked_at) == (
        LeaseState.REVOKED,
        RevokeReason.RELEASED.value,
        NOW,
    )
    again = await engine.release(AGENT_CALLER, "c-1")
    assert [r.outcome for r in again.results] == [SettleOutcome.ALREADY_REVOKED]
    assert minter.calls == ["acc-c-1"]


@pytest.mark.parametrize("who", [OTHER_CALLER, ORCH_CALLER])
async def test_anyone_but_the_holder_or_an_admin_gets_not_found(who: Caller) -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock)
    for action in (engine.release, engine.get_credential):
        with pytest.raises(NotFoundError) as caught:
            await action(who, "c-1")
        assert caught.value.reason == "credential.not_found"
        with pytest.raises(NotFoundError) as absent:
            await action(who, "c-nope")
        assert absent.value.detail.replace("c-nope", "c-1") == caught.value.detail
    assert (await stored(ledger, "c-1")).state is LeaseState.ACTIVE
    assert (await engine.release(ADMIN_CALLER, "c-1")).complete is True


async def test_releasing_a_credential_still_being_minted_changes_nothing() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1", activate=False)
    report = await revoker(ledger, minter, clock).release(AGENT_CALLER, "c-1")
    assert [r.outcome for r in report.still_live] == [SettleOutcome.MINT_IN_FLIGHT]
    # Its activation still works (and records the token): nothing was moved under it.
    active = await ledger.activate("c-1", token_accessor="acc", vault_lease_ids=())
    assert active.state is LeaseState.ACTIVE


# --------------------------------------------------------------------------- forced revocation


async def _fleet(ledger: InMemoryLedger) -> None:
    await start_run(ledger, "wf-1")
    await start_run(ledger, "wf-2")
    await issue(ledger, "a", workflow_id="wf-1", task_id="t-1")
    await issue(ledger, "b", workflow_id="wf-1", task_id="t-2", holder=OTHER_AGENT)
    await issue(
        ledger,
        "c",
        workflow_id="wf-2",
        task_id="t-1",
        owner="bob",
        target="demo-kv",
        kind=TargetKind.VAULT_TOKEN,
        sensitivity=Sensitivity.PUBLIC,
    )
    await issue(
        ledger,
        "d",
        workflow_id="wf-2",
        task_id="t-9",
        holder="spiffe://tasklease.test/agents-evil/x",
        owner="bob",
        sensitivity=Sensitivity.CONFIDENTIAL,
    )
    await issue(ledger, "gone", workflow_id="wf-2", task_id="t-9")
    await ledger.save_lease(
        dataclasses.replace(await stored(ledger, "gone"), state=LeaseState.REVOKED, revoked_at=NOW)
    )


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (LeaseSelector(workflow_id="wf-1"), {"a", "b"}),
        (LeaseSelector(task_id="t-1"), {"a", "c"}),
        (LeaseSelector(workflow_id="wf-2", task_id="t-9"), {"d"}),
        (LeaseSelector(holder=OTHER_AGENT), {"b"}),
        (LeaseSelector(holder_prefix="spiffe://tasklease.test/agent/"), {"a", "b", "c"}),
        (LeaseSelector(owner="bob"), {"c", "d"}),
        (LeaseSelector(target="demo-kv"), {"c"}),
        (LeaseSelector(sensitivity=Sensitivity.CONFIDENTIAL), {"d"}),
        (LeaseSelector(everything=True), {"a", "b", "c", "d"}),
    ],
)
async def test_forced_revocation_revokes_exactly_what_the_selector_matches(
    selector: LeaseSelector, expected: set[str]
) -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await _fleet(ledger)
    engine = revoker(ledger, minter, clock)
    with capture_logs() as logs:
        report = await engine.force(ADMIN_CALLER, selector, "INC-42 leaked agent key")
    assert report.complete is True
    assert {r.credential_id for r in report.confirmed_revoked} == expected
    for cid in "abcd":
        lease = await stored(ledger, cid)
        assert (lease.state is LeaseState.REVOKED) == (cid in expected), cid
        if cid in expected:
            assert lease.revoke_reason == RevokeReason.FORCED.value
    (forced,) = [e for e in logs if e["event"] == "revocation.forced"]
    assert (forced["actor"], forced["confirmed_revoked"], forced["still_live"]) == (
        ADMIN,
        len(expected),
        0,
    )
    assert sorted(forced["credential_ids"]) == sorted(expected)


async def test_forced_revocation_lists_what_is_still_live_and_why() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "a-ok", task_id="t-1")
    await issue(ledger, "b-bad", task_id="t-2")
    await issue(ledger, "ssh", task_id="t-3", kind=TargetKind.SSH, revocable=False)
    await issue(ledger, "minting", task_id="t-4", activate=False)
    minter.default = VaultUnavailableError("x", reason="vault.unreachable")
    minter.script = [CONFIRMED]
    report = await revoker(ledger, minter, clock, concurrency=1).force(
        ADMIN_CALLER, LeaseSelector(workflow_id="wf-1"), "INC-7"
    )
    assert report.complete is False
    assert [r.credential_id for r in report.confirmed_revoked] == ["a-ok"]
    assert {r.credential_id: r.outcome for r in report.still_live} == {
        "b-bad": SettleOutcome.RETRYING,
        "ssh": SettleOutcome.NOT_REVOCABLE,
        "minting": SettleOutcome.MINT_IN_FLIGHT,
    }


async def test_forced_revocation_by_task_blocks_a_mint_of_that_task_in_flight() -> None:
    """SECURITY 29: a lease of the task written ahead before the force (even one the force
    did not see) cannot activate; its refused activation makes it due for the sweeper."""
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    engine = revoker(ledger, minter, clock)
    report = await engine.force(
        ADMIN_CALLER, LeaseSelector(workflow_id="wf-1", task_id="t-1"), "INC-9"
    )
    assert (report.complete, report.results) == (True, ())
    # Written ahead a moment before the force, minted after it.
    await issue(ledger, "late", task_id="t-1", issued_at=NOW - SECOND, activate=False)
    with pytest.raises(ConflictError) as refused:
        await ledger.activate("late", token_accessor="acc-late", vault_lease_ids=())
    assert refused.value.reason == "lease.tombstoned"
    swept = await engine.revoke_due(NOW)
    assert swept.revoked == ("late",)
    assert (await stored(ledger, "late")).revoke_reason == RevokeReason.ACTIVATION_REFUSED.value


async def test_forced_revocation_keeps_concurrency_toward_vault_bounded() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    minter.delay = 0.001
    await start_run(ledger)
    for i in range(40):
        await issue(ledger, f"c-{i}", task_id=f"t-{i}")
    report = await revoker(ledger, minter, clock, concurrency=5).force(
        ADMIN_CALLER, LeaseSelector(everything=True), "INC-1"
    )
    assert len(report.confirmed_revoked) == 40
    assert minter.max_active == 5


@pytest.mark.parametrize(
    ("who", "selector", "reason", "error"),
    [
        (AGENT_CALLER, LeaseSelector(everything=True), "x", ForbiddenError),
        (ORCH_CALLER, LeaseSelector(workflow_id="wf-1"), "x", ForbiddenError),
        (ADMIN_CALLER, LeaseSelector(), "x", BadRequestError),
        (ADMIN_CALLER, LeaseSelector(holder_prefix=""), "x", BadRequestError),
        (ADMIN_CALLER, LeaseSelector(everything=True), "", BadRequestError),
        (ADMIN_CALLER, LeaseSelector(everything=True), "a\r\nforged", BadRequestError),
    ],
)
async def test_forced_revocation_refusals_revoke_nothing(
    who: Caller, selector: LeaseSelector, reason: str, error: type[TaskleaseError]
) -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await _fleet(ledger)
    with pytest.raises(error):
        await revoker(ledger, minter, clock).force(who, selector, reason)
    assert minter.calls == []


# --------------------------------------------------------------------------- concurrency


async def test_a_completion_and_a_sweep_on_one_lease_make_one_vault_call() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    minter.gate = asyncio.Event()
    await start_run(ledger)
    await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock)
    completion = asyncio.create_task(
        engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    )
    await _wait_for(lambda: minter.active == 1)
    sweep = asyncio.create_task(engine.revoke_due(NOW))
    await asyncio.sleep(0.01)
    minter.gate.set()
    done, report = await completion, await sweep
    assert done.report is not None
    assert done.report.complete is True
    assert report.claimed == 1
    assert minter.calls == ["acc-c-1"]
    assert (
        engine.metrics.registry.get_sample_value(
            "tasklease_revocations_total", {"kind": "database", "outcome": "revoked"}
        )
        == 1
    )
    # The sweep acknowledged its claim: nothing comes back.
    assert (await engine.revoke_due(NOW + timedelta(hours=2))).claimed == 0


class FlakyLedger(InMemoryLedger):
    """Fails ``get_lease`` while ``down`` is set (Redis unreachable)."""

    down = False

    async def get_lease(self, credential_id: str) -> Lease | None:
        if self.down:
            raise LedgerUnavailableError("down", reason="ledger.unreachable")
        return await super().get_lease(credential_id)


async def test_a_ledger_outage_mid_sweep_leaves_claims_to_come_back() -> None:
    ledger, minter, clock = FlakyLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    lease = await issue(ledger, "c-1")
    engine = revoker(ledger, minter, clock, visibility=10 * SECOND, revoke_timeout=SECOND)
    ledger.down = True
    (result,) = (await engine.revoke_due(lease.expires_at)).results
    assert result.outcome is SettleOutcome.LEDGER_UNAVAILABLE
    ledger.down = False
    assert (await engine.revoke_due(lease.expires_at + 9 * SECOND)).claimed == 0
    assert (await engine.revoke_due(lease.expires_at + 10 * SECOND)).revoked == ("c-1",)


def test_settings_refuse_a_revoke_timeout_that_could_outlive_a_claim() -> None:
    with pytest.raises(ValueError, match="below half of visibility"):
        RevocationSettings(visibility=timedelta(seconds=20), revoke_timeout=timedelta(seconds=10))
    with pytest.raises(ValueError, match="backoff_base"):
        RevocationSettings(backoff_base=timedelta(minutes=5), backoff_cap=timedelta(minutes=1))


# --------------------------------------------------------------------------- the scheduler


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


async def test_the_sweeper_runs_one_sweep_at_a_time_and_survives_failures() -> None:
    running, overlaps, calls = 0, 0, 0

    async def sweep(now: datetime) -> None:
        nonlocal running, overlaps, calls
        calls += 1
        running += 1
        overlaps = max(overlaps, running)
        try:
            if calls == 2:
                raise LedgerUnavailableError("down", reason="ledger.unreachable")
            if calls == 3:
                raise RuntimeError("a bug")
            await asyncio.sleep(0.08)  # longer than the interval
        finally:
            running -= 1

    sweeper = RevocationSweeper(sweep=sweep, clock=WallClock(), interval=timedelta(milliseconds=20))
    with capture_logs() as logs:
        sweeper.start()
        await asyncio.sleep(0.5)
        await sweeper.stop()
    assert overlaps == 1
    assert calls >= 4
    assert sweeper.failures == 2
    events = [e["event"] for e in logs]
    assert "revocation.sweep_failed" in events
    assert "revocation.sweep_crashed" in events
    settled = calls
    await asyncio.sleep(0.1)
    assert calls == settled  # stopped: no more ticks


async def test_stopping_the_sweeper_lets_the_sweep_in_progress_finish() -> None:
    finished = asyncio.Event()
    started = asyncio.Event()

    async def sweep(now: datetime) -> None:
        started.set()
        await asyncio.sleep(0.1)
        finished.set()

    sweeper = RevocationSweeper(sweep=sweep, clock=WallClock(), interval=timedelta(seconds=5))
    task = asyncio.create_task(sweeper.run())
    await started.wait()  # the first sweep runs at once
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()
    assert sweeper.running is False


# --------------------------------------------------------------------------- HTTP


class HeaderAuthenticator:
    """Test-only: the caller named by ``X-Test-Caller`` (the real one verifies SVIDs)."""

    callers: Mapping[str, Caller] = {
        "agent": AGENT_CALLER,
        "other": OTHER_CALLER,
        "orchestrator": ORCH_CALLER,
        "admin": ADMIN_CALLER,
    }

    def authenticate(self, *, peer_chain: Any, authorization: str | None, now: datetime) -> Caller:
        return self.callers[authorization or ""]


async def _client(engine: Revoker) -> TestClient[web.Request, web.Application]:
    app = create_app(
        readiness=Readiness(checks=[], clock=Clock(), timeout_seconds=1),
        authenticator=cast(CallerAuthenticator, HeaderAuthenticator()),
        now=Clock().now,
    )
    register_revocation_routes(app, engine)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_http_status_codes_and_report_shape() -> None:
    ledger, minter, clock = InMemoryLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    await issue(ledger, "c-1", task_id="t-1")
    await issue(ledger, "c-2", task_id="t-2")
    await issue(ledger, "ssh", task_id="t-3", kind=TargetKind.SSH, revocable=False)
    client = await _client(revoker(ledger, minter, clock))
    try:
        got = await client.get("/v1/credentials/c-1", headers={"Authorization": "agent"})
        body = await got.json()
        assert (got.status, body["state"], body["attempts"]) == (200, "active", 0)
        assert (
            await client.get("/v1/credentials/c-1", headers={"Authorization": "other"})
        ).status == 404

        released = await client.delete("/v1/credentials/c-1", headers={"Authorization": "agent"})
        report = await released.json()
        assert (released.status, report["complete"], report["counts"]) == (
            200,
            True,
            {"confirmed_revoked": 1, "still_live": 0},
        )
        assert report["confirmed_revoked"][0]["reason"] == "released"

        bad = await client.post(
            "/v1/workflows/wf-1/complete",
            json={"outcome": "completed", "extra": 1},
            headers={"Authorization": "orchestrator"},
        )
        assert (bad.status, (await bad.json())["reason"]) == (400, "body.invalid")
        bad_wait = await client.post(
            "/v1/workflows/wf-1/complete?wait=maybe",
            json={"outcome": "completed"},
            headers={"Authorization": "orchestrator"},
        )
        assert bad_wait.status == 400
        by_agent = await client.post(
            "/v1/workflows/wf-1/complete",
            json={"outcome": "completed"},
            headers={"Authorization": "agent"},
        )
        assert by_agent.status == 403

        completed = await client.post(
            "/v1/workflows/wf-1/complete?wait=true",
            json={"outcome": "completed"},
            headers={"Authorization": "orchestrator"},
        )
        body = await completed.json()
        assert (completed.status, body["workflow"]["state"], body["report"]["complete"]) == (
            207,
            "completed",
            False,
        )
        (live,) = body["report"]["still_live"]
        assert (live["credential_id"], live["reason"]) == ("ssh", "not_revocable")
        assert sorted(x["credential_id"] for x in body["report"]["confirmed_revoked"]) == [
            "c-1",
            "c-2",
        ]
        again = await client.post(
            "/v1/workflows/wf-1/complete",
            json={"outcome": "completed"},
            headers={"Authorization": "orchestrator"},
        )
        assert (again.status, (await again.json())["workflow"]["state"]) == (202, "completed")

        unbounded = await client.post(
            "/v1/revocations",
            json={"selector": {}, "reason": "INC-1"},
            headers={"Authorization": "admin"},
        )
        assert (unbounded.status, (await unbounded.json())["reason"]) == (
            400,
            "selector.unbounded",
        )
        not_admin = await client.post(
            "/v1/revocations",
            json={"selector": {"everything": True}, "reason": "INC-1"},
            headers={"Authorization": "orchestrator"},
        )
        assert not_admin.status == 403
        typo = await client.post(
            "/v1/revocations",
            json={"selector": {"workflow": "wf-1"}, "reason": "INC-1"},
            headers={"Authorization": "admin"},
        )
        assert (typo.status, (await typo.json())["reason"]) == (400, "body.invalid")
        forced = await client.post(
            "/v1/revocations",
            json={"selector": {"everything": True}, "reason": "INC-1"},
            headers={"Authorization": "admin"},
        )
        assert (forced.status, (await forced.json())["counts"]) == (
            207,
            {"confirmed_revoked": 0, "still_live": 1},
        )
    finally:
        await client.close()


class CountingLedger(InMemoryLedger):
    """Counts find_leases by run."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[str | None] = []

    async def find_leases(self, selector: LeaseSelector, *, limit: int = 1000) -> list[Lease]:
        self.listed.append(selector.workflow_id)
        return await super().find_leases(selector, limit=limit)


async def test_a_completed_run_is_relisted_a_bounded_number_of_times() -> None:
    """The late-mint watch costs a handful of listings per run, not one per sweep."""
    ledger, minter, clock = CountingLedger(), FakeMinter(), Clock()
    await start_run(ledger)
    engine = revoker(ledger, minter, clock, late_mint_window=timedelta(seconds=60))
    await engine.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=False)
    ledger.listed.clear()
    for second in range(1, 300):
        await engine.revoke_due(NOW + second * SECOND)
    assert ledger.listed == ["wf-1"] * 5  # at +1, +3, +7, +15 and +31 s
