"""Approvals through the issuance use case, with fakes: in-memory ledger and approval store,
a fake minter, the in-memory audit trail, a recording notifier and the real Cedar policies."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.adapters.config_files import load_target_catalog, read_policy_dir
from broker.adapters.memory_approvals import InMemoryApprovalStore
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.memory_ledger import InMemoryLedger
from broker.approvals import Approvals
from broker.core.approvals import SYSTEM_ACTOR, Approval, ApprovalStatus, Verdict
from broker.core.audit import ApprovalDecided, ApprovalRequested, EventType
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, HumanIdentity, WorkloadIdentity
from broker.core.model import CredentialRequest, Lease
from broker.core.policy import CedarPolicyEngine
from broker.core.ports import (
    IdempotencyBinding,
    IssuanceLimits,
    MintedCredential,
    MintSpec,
    RevokeOutcome,
)
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.errors import (
    ApprovalPendingError,
    ApprovalRefusedError,
    ApprovalStateError,
    AuditUnavailableError,
    ConflictError,
    ForbiddenError,
    LedgerUnavailableError,
    MintOutcomeUnknownError,
    NotFoundError,
    VaultUnavailableError,
)
from broker.service import CredentialBroker

# A Tuesday, inside working hours: only the restricted gate stands between prod-db and an allow.
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
ISSUER = "https://idp.tasklease.test"
TARGETS = load_target_catalog(Path("config/targets.toml"))
FILES = read_policy_dir(Path("config/policies"))


def engine(extra: str = "") -> CedarPolicyEngine:
    policies = dict(FILES.policies)
    if extra:
        policies["extra.cedar"] = extra
    return CedarPolicyEngine(policies=policies, schema=FILES.schema)


TWO_PERSON_RULE = """
@id("prod-db-two-person-rule")
@approval("required")
@quorum("2")
@reason("prod-db needs two approvers")
forbid (principal, action == Action::"request_credential", resource)
when { resource.name == "prod-db" }
unless { context.approval.approved };
"""

# A gate that asks more of the approval than the broker's quorum (1): the approval is granted,
# yet policy, decided again at the retry, still wants one.
COUNTING_GATE = """
@id("prod-db-counts-approvers")
@approval("required")
@reason("prod-db needs two approvers counted in the policy itself")
forbid (principal, action == Action::"request_credential", resource)
when { resource.name == "prod-db" }
unless { context.approval.approver_count >= 2 };
"""


class FrozenClock:
    def __init__(self) -> None:
        self.current = NOW

    def now(self) -> datetime:
        return self.current


class FakeMinter:
    def __init__(self, fail: Exception | None = None) -> None:
        self.minted: list[MintSpec] = []
        self.revoked: list[str] = []
        self.fail = fail

    async def mint(self, spec: MintSpec) -> MintedCredential:
        if self.fail is not None:
            raise self.fail
        self.minted.append(spec)
        return MintedCredential(
            token_accessor=f"acc-{len(self.minted)}",
            vault_lease_ids=("database/creds/demo-readonly/1",),
            expires_at=NOW + spec.ttl,
            secret={"username": "v-token", "password": "pw"},
        )

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.revoked.append(token_accessor)
        return RevokeOutcome(confirmed=True)


class FlakyLedger(InMemoryLedger):
    """The in-memory ledger, with a write-ahead or an activation that can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_write_ahead = False
        self.fail_activate = False

    async def write_ahead(
        self,
        lease: Lease,
        *,
        idempotency: IdempotencyBinding | None = None,
        limits: IssuanceLimits | None = None,
    ) -> str | None:
        if self.fail_write_ahead:
            raise LedgerUnavailableError("redis is down (test)", reason="ledger.unreachable")
        return await super().write_ahead(lease, idempotency=idempotency, limits=limits)

    async def activate(
        self,
        credential_id: str,
        *,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        written: Lease | None = None,
    ) -> Lease:
        if self.fail_activate:
            raise LedgerUnavailableError("redis is down (test)", reason="ledger.unreachable")
        return await super().activate(
            credential_id,
            token_accessor=token_accessor,
            vault_lease_ids=vault_lease_ids,
            written=written,
        )


class RecordingNotifier:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Mapping[str, Any]]] = []

    async def notify(self, event: str, data: Mapping[str, Any]) -> None:
        self.sent.append((event, data))


def workload(spiffe_id: str, *roles: Role) -> Caller:
    identity = WorkloadIdentity(
        SpiffeId.parse(spiffe_id), NOW + timedelta(hours=1), AuthMethod.X509_SVID
    )
    return Caller(identity, frozenset(roles))


def person(subject: str, email: str, *roles: Role) -> Caller:
    identity = HumanIdentity(ISSUER, subject, email, NOW + timedelta(hours=1))
    return Caller(identity, frozenset(roles))


AGENT_CALLER = workload(AGENT, Role.AGENT)
ORCH_CALLER = workload(ORCH, Role.ORCHESTRATOR)
BOB = person("bob", "bob@example.test", Role.APPROVER)
CAROL = person("carol", "carol@example.test", Role.APPROVER)
ALICE = person("alice", "alice@example.test", Role.APPROVER)  # owns the runs below
ADMIN = workload("spiffe://tasklease.test/admin/demo", Role.ADMIN)


class World:
    def __init__(self, *, policy: CedarPolicyEngine | None = None, validity: int = 600) -> None:
        self.clock = FrozenClock()
        self.ledger = FlakyLedger()
        self.store = InMemoryApprovalStore()
        self.audit = MemoryAuditTrail()
        self.notifier = RecordingNotifier()
        self.minter = FakeMinter()
        self.approvals = Approvals(
            store=self.store,
            audit=self.audit,
            clock=self.clock,
            validity=timedelta(seconds=validity),
            notifier=self.notifier,
        )
        self.broker = CredentialBroker(
            policy=policy or engine(),
            minter=self.minter,
            ledger=self.ledger,
            targets=TARGETS,
            clock=self.clock,
            approvals=self.approvals,
        )

    async def start_run(self, run_id: str = "wf-1", owner: str = "alice@example.test") -> None:
        await self.broker.start_workflow(
            ORCH_CALLER,
            workflow_id=run_id,
            owner=owner,
            purpose="nightly reconciliation",
            deadline=NOW + timedelta(hours=2),
            labels={"ticket": "OPS-1234"},
            participants=(AGENT,),
        )

    async def ask(
        self,
        approval_id: str | None = None,
        *,
        task: str = "t-1",
        ttl: int = 300,
        caller: Caller = AGENT_CALLER,
        run_id: str = "wf-1",
        target: str = "prod-db",
        idempotency_key: str | None = None,
    ) -> Any:
        return await self.broker.request_credential(
            caller,
            CredentialRequest(
                workflow_id=run_id,
                task_id=task,
                target=target,
                ttl=timedelta(seconds=ttl),
                justification="read the orders table",
                approval_id=approval_id,
                idempotency_key=idempotency_key,
            ),
            params={},
        )

    async def pending(self, **kwargs: Any) -> ApprovalPendingError:
        with pytest.raises(ApprovalPendingError) as caught:
            await self.ask(**kwargs)
        return caught.value

    def decided(self) -> list[str]:
        return [
            e.payload.decision for e in self.audit.events if isinstance(e.payload, ApprovalDecided)
        ]


async def approved_world(**kwargs: Any) -> tuple[World, str]:
    world = World(**kwargs)
    await world.start_run()
    pending = await world.pending()
    await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE, comment="ok")
    return world, pending.approval_id


# --------------------------------------------------------------------------- the happy path


async def test_restricted_request_waits_then_issues_under_the_approval() -> None:
    world = World()
    await world.start_run()
    pending = await world.pending()
    assert (pending.status, pending.state, pending.quorum, pending.reused) == (
        202,
        "pending",
        1,
        False,
    )
    assert pending.policy_ids == ("restricted-needs-approval",)
    assert world.minter.minted == []
    (requested,) = world.audit.events
    assert isinstance(requested.payload, ApprovalRequested)
    assert (requested.actor, requested.approval_id, requested.workflow_id) == (
        AGENT,
        pending.approval_id,
        "wf-1",
    )
    assert [event for event, _ in world.notifier.sent] == ["approval.requested"]

    decided = await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE)
    assert decided.state is ApprovalStatus.APPROVED
    issued = await world.ask(pending.approval_id)
    assert issued.lease.approval_id == pending.approval_id
    assert issued.decision.allowed
    # Policy saw the verified approval in context, at the retry.
    assert issued.decision.context["context"]["approval"]["approvers"] == [f"oidc:{ISSUER}#bob"]
    stored = await world.store.get_approval(pending.approval_id)
    assert stored is not None
    assert (stored.state, stored.credential_id) == (
        ApprovalStatus.USED,
        issued.lease.credential_id,
    )
    assert world.audit.types() == [
        EventType.APPROVAL_REQUESTED,
        EventType.APPROVAL_DECIDED,
        EventType.APPROVAL_DECIDED,
    ]
    assert world.decided() == ["approve", "use"]
    assert world.audit.events[-1].credential_id == issued.lease.credential_id
    assert [event for event, _ in world.notifier.sent] == [
        "approval.requested",
        "approval.decided",
    ]


async def test_the_credential_never_outlives_the_approval() -> None:
    world, approval_id = await approved_world(validity=120)
    world.clock.current = NOW + timedelta(seconds=100)
    await world.ask(approval_id, ttl=300)
    assert world.minter.minted[0].ttl == timedelta(seconds=20)


async def test_an_identical_request_reuses_the_open_approval() -> None:
    world = World()
    await world.start_run()
    first = await world.pending()
    again = await world.pending()
    assert (again.approval_id, again.reused) == (first.approval_id, True)
    other = await world.pending(ttl=600)
    assert other.approval_id != first.approval_id
    assert len(await world.store.list_approvals(pending_only=True, limit=10)) == 2
    assert world.audit.types().count(EventType.APPROVAL_REQUESTED) == 2


async def test_after_a_denial_a_new_request_opens_a_new_approval() -> None:
    world = World()
    await world.start_run()
    first = await world.pending()
    await world.approvals.decide(BOB, first.approval_id, Verdict.DENY, comment="no")
    with pytest.raises(ApprovalStateError) as denied:
        await world.ask(first.approval_id)
    assert denied.value.reason == "approval.denied"
    second = await world.pending()
    assert (second.reused, second.approval_id != first.approval_id) == (False, True)


# --------------------------------------------------------------------------- refusals


async def test_an_approval_is_used_once() -> None:
    world, approval_id = await approved_world()
    await world.ask(approval_id)
    with pytest.raises(ApprovalStateError) as caught:
        await world.ask(approval_id)
    assert caught.value.reason == "approval.used"
    assert len(world.minter.minted) == 1


async def test_two_concurrent_retries_get_one_credential() -> None:
    world, approval_id = await approved_world()
    results = await asyncio.gather(
        world.ask(approval_id), world.ask(approval_id), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, ApprovalStateError)]
    assert len(refused) == 1 and refused[0].reason == "approval.used"
    assert len(world.minter.minted) == 1


async def test_an_approval_for_another_request_is_refused() -> None:
    world, approval_id = await approved_world()
    for change in ({"task": "t-2"}, {"ttl": 301}):
        with pytest.raises(ApprovalRefusedError) as caught:
            await world.ask(approval_id, **change)
        assert caught.value.reason == "approval.digest_mismatch"
    other_agent = workload("spiffe://tasklease.test/agent/other", Role.AGENT)
    with pytest.raises(ApprovalRefusedError):
        await world.ask(approval_id, caller=other_agent)
    assert world.minter.minted == []


async def test_an_unknown_or_malformed_approval_id_is_not_found() -> None:
    world = World()
    await world.start_run()
    for approval_id in ("apr_" + "0" * 24, "nope"):
        with pytest.raises(NotFoundError) as caught:
            await world.ask(approval_id)
        assert caught.value.reason == "approval.not_found"


async def test_retrying_before_the_quorum_is_refused() -> None:
    world = World()
    await world.start_run()
    pending = await world.pending()
    with pytest.raises(ApprovalStateError) as caught:
        await world.ask(pending.approval_id)
    assert caught.value.reason == "approval.quorum_not_reached"


async def test_an_expired_approval_is_refused_and_its_expiry_recorded_once() -> None:
    world, approval_id = await approved_world(validity=60)
    world.clock.current = NOW + timedelta(seconds=60)
    for _ in range(2):
        with pytest.raises(ApprovalStateError) as caught:
            await world.ask(approval_id)
        assert caught.value.reason == "approval.expired"
    assert world.decided() == ["approve", "expire"]
    # A new request for the same thing opens a fresh approval.
    fresh = await world.pending()
    assert fresh.approval_id != approval_id


async def test_a_withdrawn_approval_is_refused() -> None:
    world, approval_id = await approved_world()
    await world.approvals.withdraw(AGENT_CALLER, approval_id, comment="not needed")
    with pytest.raises(ApprovalStateError) as caught:
        await world.ask(approval_id)
    assert caught.value.reason == "approval.withdrawn"
    assert world.decided() == ["approve", "withdraw"]


async def test_who_may_withdraw() -> None:
    world = World()
    await world.start_run()
    pending = await world.pending()
    stranger = workload("spiffe://tasklease.test/agent/other", Role.AGENT)
    with pytest.raises(NotFoundError):
        await world.approvals.withdraw(stranger, pending.approval_id)
    withdrawn = await world.approvals.withdraw(ADMIN, pending.approval_id)
    assert (withdrawn.state, withdrawn.closed_by) == (
        ApprovalStatus.WITHDRAWN,
        "spiffe://tasklease.test/admin/demo",
    )


async def test_withdrawing_a_used_approval_calls_the_hook() -> None:
    world, approval_id = await approved_world()
    issued = await world.ask(approval_id)
    seen: list[Approval] = []

    class Hook:  # broker.approvals.WithdrawalHook[str]
        async def before_withdrawal(self, approval: Approval) -> str:
            return "note"

        async def withdrawn(self, approval: Approval, note: str | None) -> None:
            seen.append(approval)

        async def not_withdrawn(self, note: str) -> None:
            raise AssertionError("the withdrawal was stored")

    world.approvals.set_withdrawal_hook(Hook())
    await world.approvals.withdraw(BOB, approval_id)
    assert [(a.id, a.credential_id) for a in seen] == [(approval_id, issued.lease.credential_id)]


@pytest.mark.parametrize(
    ("approver", "reason"),
    [
        (workload(AGENT, Role.AGENT, Role.APPROVER), "approval.sod_violation"),
        (ALICE, "approval.sod_violation"),
        (workload("spiffe://tasklease.test/agent/other", Role.AGENT), "approval.not_approver"),
        (ADMIN, "approval.not_approver"),
    ],
    ids=["requester", "owner", "an-agent", "an-admin"],
)
async def test_who_may_not_approve(approver: Caller, reason: str) -> None:
    world = World()
    await world.start_run()
    pending = await world.pending()
    with pytest.raises(ApprovalRefusedError) as caught:
        await world.approvals.decide(approver, pending.approval_id, Verdict.APPROVE)
    assert caught.value.reason == reason
    stored = await world.store.get_approval(pending.approval_id)
    assert stored is not None and stored.votes == ()


async def test_an_owner_recorded_as_a_principal_id_cannot_approve() -> None:
    world = World()
    await world.start_run(owner=f"oidc:{ISSUER}#bob")
    pending = await world.pending()
    with pytest.raises(ApprovalRefusedError) as caught:
        await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE)
    assert caught.value.reason == "approval.sod_violation"


async def test_a_quorum_of_two_from_the_gate_policy() -> None:
    world = World(policy=engine(TWO_PERSON_RULE))
    await world.start_run()
    pending = await world.pending()
    assert pending.quorum == 2
    assert set(pending.policy_ids) == {"restricted-needs-approval", "prod-db-two-person-rule"}
    await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE)
    with pytest.raises(ApprovalStateError) as early:
        await world.ask(pending.approval_id)
    assert early.value.reason == "approval.quorum_not_reached"
    with pytest.raises(ApprovalStateError) as twice:
        await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE)
    assert twice.value.reason == "approval.duplicate_approver"
    bot = workload("spiffe://tasklease.test/approval-bot/chatops", Role.APPROVER)
    decided = await world.approvals.decide(bot, pending.approval_id, Verdict.APPROVE)
    assert decided.state is ApprovalStatus.APPROVED
    issued = await world.ask(pending.approval_id)
    assert issued.decision.allowed


async def test_policy_decides_again_with_the_approval_and_may_still_refuse() -> None:
    world, approval_id = await approved_world(policy=engine(COUNTING_GATE))
    with pytest.raises(ApprovalRefusedError) as caught:
        await world.ask(approval_id)
    assert caught.value.reason == "approval.insufficient"
    assert world.minter.minted == []
    stored = await world.store.get_approval(approval_id)
    assert stored is not None and stored.state is ApprovalStatus.APPROVED


async def test_without_approvals_needs_approval_stays_a_403() -> None:
    world = World()
    broker = CredentialBroker(
        policy=engine(),
        minter=world.minter,
        ledger=world.ledger,
        targets=TARGETS,
        clock=world.clock,
    )
    await world.start_run()
    with pytest.raises(ForbiddenError) as caught:
        await broker.request_credential(
            AGENT_CALLER,
            CredentialRequest(
                workflow_id="wf-1", task_id="t-1", target="prod-db", ttl=timedelta(seconds=60)
            ),
            params={},
        )
    assert caught.value.reason == "policy.needs_approval"


# --------------------------------------------------------------------------- a failed mint


async def stored(world: World, approval_id: str) -> Approval:
    found = await world.store.get_approval(approval_id)
    assert found is not None
    return found


def used_for(world: World) -> str:
    """The credential id the last ``use`` step of the trail names."""
    uses = [
        e
        for e in world.audit.events
        if isinstance(e.payload, ApprovalDecided) and e.payload.decision == "use"
    ]
    return uses[-1].credential_id


async def test_a_mint_vault_refused_releases_the_approval_and_the_retry_succeeds() -> None:
    world, approval_id = await approved_world()
    world.minter.fail = VaultUnavailableError("permission denied", reason="vault.forbidden")
    with pytest.raises(VaultUnavailableError) as caught:
        await world.ask(approval_id)
    assert caught.value.reason == "vault.forbidden"  # the agent's error is unchanged
    failed = used_for(world)
    released = await stored(world, approval_id)
    assert (released.state, released.credential_id) == (ApprovalStatus.APPROVED, "")
    assert world.decided() == ["approve", "use", "release"]
    release = world.audit.events[-1]
    assert isinstance(release.payload, ApprovalDecided)
    assert (release.actor, release.credential_id, release.approval_id) == (
        SYSTEM_ACTOR,
        failed,
        approval_id,
    )
    assert (release.payload.state, release.payload.comment) == (
        "approved",
        f"nothing was minted for {failed} (vault.forbidden)",
    )
    # Released, it is the open approval of its request again.
    assert await world.store.open_approval_for(released.digest) == approval_id

    world.minter.fail = None
    issued = await world.ask(approval_id)
    assert issued.lease.approval_id == approval_id
    assert issued.lease.credential_id != failed
    again = await stored(world, approval_id)
    assert (again.state, again.credential_id) == (ApprovalStatus.USED, issued.lease.credential_id)
    assert world.decided() == ["approve", "use", "release", "use"]
    assert len(world.minter.minted) == 1


async def test_a_mint_of_unknown_outcome_leaves_the_approval_used() -> None:
    world, approval_id = await approved_world()
    world.minter.fail = MintOutcomeUnknownError("timed out", reason="vault.timeout")
    with pytest.raises(MintOutcomeUnknownError):
        await world.ask(approval_id)
    spent = await stored(world, approval_id)
    assert (spent.state, spent.credential_id) == (ApprovalStatus.USED, used_for(world))
    assert world.decided() == ["approve", "use"]
    world.minter.fail = None
    with pytest.raises(ApprovalStateError) as caught:
        await world.ask(approval_id)
    assert caught.value.reason == "approval.used"
    assert world.minter.minted == []


@pytest.mark.parametrize("how", ["ledger_down", "task_tombstoned"])
async def test_a_credential_minted_then_revoked_leaves_the_approval_used(how: str) -> None:
    world, approval_id = await approved_world()
    if how == "ledger_down":
        world.ledger.fail_activate = True
    else:
        # The task was revoked meanwhile: the activation of its lease is refused.
        await world.ledger.tombstone_task("wf-1", "t-1", until=NOW + timedelta(hours=1))
    with pytest.raises((LedgerUnavailableError, ConflictError)):
        await world.ask(approval_id)
    assert len(world.minter.minted) == 1 and world.minter.revoked == ["acc-1"]
    spent = await stored(world, approval_id)
    assert (spent.state, spent.credential_id) == (ApprovalStatus.USED, used_for(world))
    assert world.decided() == ["approve", "use"]


async def test_a_failed_write_ahead_releases_the_approval() -> None:
    world, approval_id = await approved_world()
    world.ledger.fail_write_ahead = True
    with pytest.raises(LedgerUnavailableError):
        await world.ask(approval_id)
    assert world.minter.minted == []
    assert (await stored(world, approval_id)).state is ApprovalStatus.APPROVED
    assert world.decided() == ["approve", "use", "release"]
    world.ledger.fail_write_ahead = False
    issued = await world.ask(approval_id)
    assert issued.lease.approval_id == approval_id


async def test_an_idempotency_refusal_after_the_use_releases_the_approval() -> None:
    world, approval_id = await approved_world()
    # The agent used its key for another request (demo-db needs no approval) before.
    await world.ask(target="demo-db", idempotency_key="key-1")
    with pytest.raises(ConflictError) as caught:
        await world.ask(approval_id, idempotency_key="key-1")
    assert caught.value.reason == "idempotency.key_reused"
    assert (await stored(world, approval_id)).state is ApprovalStatus.APPROVED
    assert world.decided() == ["approve", "use", "release"]
    issued = await world.ask(approval_id, idempotency_key="key-2")
    assert issued.lease.approval_id == approval_id


async def test_a_release_that_fails_leaves_the_approval_used_and_the_error_unchanged() -> None:
    world, approval_id = await approved_world()
    audit = world.audit

    class RefusedThenTrailDown(FakeMinter):
        async def mint(self, spec: MintSpec) -> Any:
            audit.fail = True  # the trail goes down: the release cannot be audited
            raise VaultUnavailableError("permission denied", reason="vault.forbidden")

    world.broker = CredentialBroker(
        policy=engine(),
        minter=RefusedThenTrailDown(),
        ledger=world.ledger,
        targets=TARGETS,
        clock=world.clock,
        approvals=world.approvals,
    )
    with capture_logs() as logs, pytest.raises(VaultUnavailableError) as caught:
        await world.ask(approval_id)
    assert caught.value.reason == "vault.forbidden"
    spent = await stored(world, approval_id)
    assert (spent.state, spent.credential_id) == (ApprovalStatus.USED, used_for(world))
    (failed,) = [line for line in logs if line["event"] == "approval.release_failed"]
    assert (failed["approval_id"], failed["reason"]) == (approval_id, "audit.sink_failed")


# --------------------------------------------------------------------------- audit fails closed


async def test_a_decision_the_audit_trail_refuses_is_undone() -> None:
    world = World()
    await world.start_run()
    pending = await world.pending()
    world.audit.fail = True
    with pytest.raises(AuditUnavailableError):
        await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE)
    stored = await world.store.get_approval(pending.approval_id)
    assert stored is not None
    assert (stored.state, stored.votes) == (ApprovalStatus.PENDING, ())
    world.audit.fail = False
    decided = await world.approvals.decide(BOB, pending.approval_id, Verdict.APPROVE)
    assert decided.state is ApprovalStatus.APPROVED


async def test_a_use_the_audit_trail_refuses_mints_nothing() -> None:
    world, approval_id = await approved_world()
    world.audit.fail = True
    with pytest.raises(AuditUnavailableError):
        await world.ask(approval_id)
    assert world.minter.minted == []
    stored = await world.store.get_approval(approval_id)
    assert stored is not None and stored.state is ApprovalStatus.APPROVED


async def test_an_approval_the_audit_trail_refuses_cannot_be_decided() -> None:
    world = World()
    await world.start_run()
    world.audit.fail = True
    with pytest.raises(AuditUnavailableError):
        await world.ask()
    world.audit.fail = False
    (orphan,) = await world.store.list_approvals(pending_only=False, limit=10)
    assert orphan.state is ApprovalStatus.WITHDRAWN
    fresh = await world.pending()
    assert fresh.approval_id != orphan.id


# --------------------------------------------------------------------------- reading


async def test_listing_and_reading() -> None:
    world = World(validity=60)
    await world.start_run()
    first = await world.pending()
    second = await world.pending(task="t-2")
    listed = await world.approvals.list_approvals(BOB, state=ApprovalStatus.PENDING)
    assert [a.id for a in listed] == [second.approval_id, first.approval_id]
    with pytest.raises(ApprovalRefusedError) as caught:
        await world.approvals.list_approvals(AGENT_CALLER, state=None)
    assert caught.value.reason == "approval.not_approver"
    # The requester polls its own approval; another agent cannot see it.
    assert (await world.approvals.get(AGENT_CALLER, first.approval_id)).id == first.approval_id
    with pytest.raises(NotFoundError):
        await world.approvals.get(
            workload("spiffe://tasklease.test/agent/other", Role.AGENT), first.approval_id
        )
    world.clock.current = NOW + timedelta(minutes=5)
    assert await world.approvals.list_approvals(BOB, state=ApprovalStatus.PENDING) == []
    expired = await world.approvals.list_approvals(ADMIN, state=ApprovalStatus.EXPIRED)
    assert {a.id for a in expired} == {first.approval_id, second.approval_id}
    assert world.decided() == ["expire", "expire"]
