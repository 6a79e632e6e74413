"""Continuous authorization with fakes: leases issued through the real use case (in-memory
ledger, a fake minter, the shipped Cedar policies) are decided again after a change, and the
ones now denied are revoked through the Revoker, with a credential.revoked audit event."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.adapters.config_files import load_target_catalog, read_policy_dir
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.memory_ledger import InMemoryLedger
from broker.continuous import (
    REEVALUATION_BATCH,
    ApprovalStoreStates,
    ContinuousAuthorizer,
    ReevaluatingQuarantines,
)
from broker.core.approvals import Approval, ApprovalSubject
from broker.core.audit import CredentialRevoked, EventType
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import (
    CredentialRequest,
    DelegationChain,
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    Sensitivity,
    TargetKind,
)
from broker.core.policy import CedarPolicyEngine
from broker.core.ports import (
    ApprovalState,
    LeaseSelector,
    MintedCredential,
    MintSpec,
    RevokeOutcome,
)
from broker.core.roles import Role, parse_role_map
from broker.core.spiffe_id import SpiffeId
from broker.errors import ConflictError, LedgerUnavailableError
from broker.policy_reload import LivePolicy, LiveTargets
from broker.revocation import Revoker
from broker.service import CredentialBroker

# A Wednesday, midday UTC: inside the default working hours.
NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
OTHER_AGENT = "spiffe://tasklease.test/agent/other"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
ADMIN = "spiffe://tasklease.test/admin/demo"
POLICY_FILES = read_policy_dir(Path("config/policies"))
ROLES = parse_role_map(
    {
        "workload": [
            {"pattern": "spiffe://tasklease.test/agent/*", "roles": ["agent"]},
            {"pattern": "spiffe://tasklease.test/orchestrator/*", "roles": ["orchestrator"]},
            {"pattern": "spiffe://tasklease.test/admin/*", "roles": ["admin"]},
        ]
    }
)
DENY_DEMO_DB = (
    '@id("demo-db-closed") @reason("demo-db is closed for maintenance")\n'
    'forbid (principal, action, resource) when { resource.name == "demo-db" };\n'
)


class FrozenClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


class FakeMinter:
    def __init__(self) -> None:
        self.minted = 0
        self.revoked: list[str] = []

    async def mint(self, spec: MintSpec) -> MintedCredential:
        self.minted += 1
        return MintedCredential(
            token_accessor=f"acc-{self.minted}",
            vault_lease_ids=(f"database/creds/x/{self.minted}",),
            expires_at=NOW + spec.ttl,
            secret={"password": "s3cret"},
        )

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.revoked.append(token_accessor)
        return RevokeOutcome(confirmed=True)


def caller(spiffe_id: str, *roles: Role) -> Caller:
    identity = WorkloadIdentity(
        SpiffeId.parse(spiffe_id), NOW + timedelta(hours=1), AuthMethod.X509_SVID
    )
    return Caller(identity, frozenset(roles))


def restrict(world: World, target: str = "demo-db") -> None:
    """Make ``target`` restricted in ``world``'s catalog in force (it then needs approvals)."""
    catalog = dict(world.targets)
    catalog[target] = dataclasses.replace(catalog[target], sensitivity=Sensitivity.RESTRICTED)
    world.targets.replace(catalog)


def opened_approval(lease: Lease, *, target: str = "demo-db") -> Approval:
    """An approval opened (at NOW, for an hour) for the request ``lease`` was issued for."""
    return Approval.open(
        subject=ApprovalSubject(
            workflow_id=lease.workflow_id,
            task_id=lease.task_id,
            target=target,
            ttl_seconds=300,
            holder=lease.holder,
        ),
        owner="alice@example.test",
        chain=lease.chain,
        now=NOW,
        validity=timedelta(hours=1),
        policy_ids=("restricted-needs-approval",),
    )


def engine_with(extra: str = "") -> CedarPolicyEngine:
    policies = dict(POLICY_FILES.policies)
    if extra:
        policies["extra.cedar"] = extra
    return CedarPolicyEngine(policies=policies, schema=POLICY_FILES.schema)


class World:
    """A broker and a continuous authorizer sharing one ledger, policy and catalog."""

    def __init__(self, ledger: InMemoryLedger | None = None) -> None:
        self.clock = FrozenClock()
        self.ledger = ledger if ledger is not None else InMemoryLedger()
        self.minter = FakeMinter()
        self.audit = MemoryAuditTrail()
        self.policy = LivePolicy(engine_with())
        self.targets = LiveTargets(load_target_catalog(Path("config/targets.toml")))
        self.approvals: dict[str, ApprovalState] = {}
        self.revoker = Revoker(ledger=self.ledger, minter=self.minter, clock=self.clock)
        self.continuous = self.authorizer()
        self.quarantines = ReevaluatingQuarantines(store=self.ledger, authorizer=self.continuous)
        self.broker = CredentialBroker(
            policy=self.policy,
            minter=self.minter,
            ledger=self.ledger,
            targets=self.targets,
            clock=self.clock,
            quarantines=self.quarantines,
        )

    def authorizer(
        self, *, batch: int = REEVALUATION_BATCH, **options: Any
    ) -> ContinuousAuthorizer:
        """The continuous authorizer over this world (``batch``: its batch size; ``options``:
        more keyword arguments, e.g. retry timings and the marker store)."""
        return ContinuousAuthorizer(
            ledger=self.ledger,
            policy=self.policy,
            targets=self.targets,
            roles=ROLES,
            revoker=self.revoker,
            clock=self.clock,
            audit=self.audit,
            quarantines=options.pop("quarantines", self.ledger),
            approvals=options.pop("approvals", self),
            actor="spiffe://tasklease.test/broker",
            batch=batch,
            **options,
        )

    async def approval_state(self, approval_id: str, now: datetime) -> ApprovalState | None:
        return self.approvals.get(approval_id)

    async def start_run(self, run_id: str = "wf-1", **labels: str) -> None:
        await self.broker.start_workflow(
            caller(ORCH, Role.ORCHESTRATOR),
            workflow_id=run_id,
            owner="alice@example.test",
            purpose="tests",
            deadline=NOW + timedelta(hours=12),
            labels=labels,
            participants=(),
        )

    async def issue(
        self,
        target: str = "demo-db",
        *,
        task: str = "t-1",
        run_id: str = "wf-1",
        agent: str = AGENT,
        ttl: int = 300,
    ) -> Lease:
        issued = await self.broker.request_credential(
            caller(agent, Role.AGENT),
            CredentialRequest(
                workflow_id=run_id,
                task_id=task,
                target=target,
                ttl=timedelta(seconds=ttl),
                tool="psql",
                justification="read the orders",
            ),
            params={},
        )
        return issued.lease

    async def state(self, credential_id: str) -> tuple[LeaseState, str]:
        lease = await self.ledger.get_lease(credential_id)
        assert lease is not None
        return lease.state, lease.revoke_reason


@pytest.fixture
async def world() -> World:
    world = World()
    await world.start_run()
    return world


async def test_a_lease_records_what_policy_decided_on(world: World) -> None:
    lease = await world.issue()
    stored = await world.ledger.get_lease(lease.credential_id)
    assert stored is not None
    assert (stored.tool, stored.justification) == ("psql", "read the orders")


async def test_a_policy_change_revokes_the_leases_it_now_denies_and_keeps_the_others(
    world: World,
) -> None:
    db = await world.issue("demo-db", task="query")
    kv = await world.issue("demo-kv", task="config")
    world.policy.replace(engine_with(DENY_DEMO_DB))

    await world.continuous.policy_changed(trigger="file_change")
    await world.continuous.drain()

    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    assert await world.state(kv.credential_id) == (LeaseState.ACTIVE, "")
    assert [db.token_accessor] == world.minter.revoked
    (event,) = world.audit.events
    assert event.type == EventType.CREDENTIAL_REVOKED
    assert isinstance(event.payload, CredentialRevoked)
    assert (event.payload.cause, event.payload.target) == ("continuous_authorization", "demo-db")
    assert "the policy set changed (file_change)" in event.payload.reason
    assert "demo-db-closed" in event.payload.reason
    assert (db.credential_id, "wf-1", "query", db.chain) == (
        event.credential_id,
        event.workflow_id,
        event.task_id,
        event.chain,
    )
    assert event.actor == "spiffe://tasklease.test/broker"


async def test_the_report_says_what_was_denied_and_confirmed(world: World) -> None:
    db = await world.issue("demo-db")
    world.policy.replace(engine_with(DENY_DEMO_DB))
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "test")
    (denied,) = report.denied_sample
    assert (db.credential_id, ("demo-db-closed",)) == (
        denied.lease.credential_id,
        denied.policy_ids,
    )
    assert (
        report.examined,
        report.denied,
        report.confirmed_revoked,
        report.still_live,
        report.batches,
    ) == (1, 1, 1, 0, 1)
    assert report.still_live_sample == ()


async def test_nothing_changes_when_the_policy_still_allows(world: World) -> None:
    db = await world.issue()
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert await world.state(db.credential_id) == (LeaseState.ACTIVE, "")
    assert world.minter.revoked == []
    assert world.audit.events == []


async def test_a_target_that_became_confidential_is_revoked_outside_working_hours(
    world: World,
) -> None:
    world.clock.current = NOW.replace(hour=19, minute=58)
    db = await world.issue()
    world.clock.current = NOW.replace(hour=20, minute=1)
    catalog = dict(world.targets)
    catalog["demo-db"] = dataclasses.replace(
        catalog["demo-db"], sensitivity=Sensitivity.CONFIDENTIAL
    )
    world.targets.replace(catalog)

    await world.continuous.targets_changed(frozenset({"demo-db"}), trigger="file_change")
    await world.continuous.drain()

    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    (event,) = world.audit.events
    assert isinstance(event.payload, CredentialRevoked)
    assert "confidential-working-hours-only" in event.payload.reason


async def test_a_target_that_became_restricted_is_revoked_without_an_approval(
    world: World,
) -> None:
    db = await world.issue()
    catalog = dict(world.targets)
    catalog["demo-db"] = dataclasses.replace(catalog["demo-db"], sensitivity=Sensitivity.RESTRICTED)
    world.targets.replace(catalog)
    await world.continuous.targets_changed(frozenset({"demo-db"}), trigger="sighup")
    await world.continuous.drain()
    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    (event,) = world.audit.events
    assert isinstance(event.payload, CredentialRevoked)
    assert "needs_approval" in event.payload.reason


async def test_a_target_removed_from_the_catalog_is_revoked(world: World) -> None:
    db = await world.issue()
    world.targets.replace({k: v for k, v in world.targets.items() if k != "demo-db"})
    await world.continuous.targets_changed(frozenset({"demo-db"}), trigger="sighup")
    await world.continuous.drain()
    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")


async def test_a_quarantine_revokes_the_live_credentials_it_covers(world: World) -> None:
    mine = await world.issue(task="a")
    theirs = await world.issue(task="b", agent=OTHER_AGENT)
    await world.broker.set_quarantine(
        caller(ADMIN, Role.ADMIN),
        kind=QuarantineKind.IDENTITY,
        value=AGENT,
        reason="compromised",
        ttl=timedelta(hours=1),
    )
    await world.continuous.drain()
    assert await world.state(mine.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    assert await world.state(theirs.credential_id) == (LeaseState.ACTIVE, "")
    (event,) = world.audit.events
    assert isinstance(event.payload, CredentialRevoked)
    assert "quarantine set: identity" in event.payload.reason
    assert "compromised" in event.payload.reason


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (QuarantineKind.IDENTITY_PREFIX, "spiffe://tasklease.test/agent/de"),
        (QuarantineKind.WORKFLOW, "wf-1"),
        (QuarantineKind.TARGET, "demo-db"),
    ],
)
async def test_every_quarantine_kind_reaches_its_leases(
    world: World, kind: QuarantineKind, value: str
) -> None:
    db = await world.issue()
    await world.broker.set_quarantine(
        caller(ADMIN, Role.ADMIN), kind=kind, value=value, reason="stop", ttl=timedelta(hours=1)
    )
    await world.continuous.drain()
    assert (await world.state(db.credential_id))[0] == LeaseState.REVOKED


async def test_a_withdrawn_approval_revokes_the_credential_issued_with_it(world: World) -> None:
    await world.start_run("wf-2")
    db = await world.issue(run_id="wf-2")
    # A restricted target only an approval lets through (as if issued with one).
    catalog = dict(world.targets)
    catalog["demo-db"] = dataclasses.replace(catalog["demo-db"], sensitivity=Sensitivity.RESTRICTED)
    world.targets.replace(catalog)
    stored = await world.ledger.get_lease(db.credential_id)
    assert stored is not None
    await world.ledger.save_lease(dataclasses.replace(stored, approval_id="apr-1"))
    granted = ApprovalState("apr-1", True, ("bob@example.test",), NOW + timedelta(hours=1))
    world.approvals["apr-1"] = granted

    kept = await world.continuous.reevaluate(
        LeaseSelector(workflow_id="wf-2"), "approval re-checked", approval_id="apr-1"
    )
    assert (kept.examined, kept.denied) == (1, 0)

    world.approvals["apr-1"] = dataclasses.replace(granted, approved=False)
    withdrawn = await world.continuous.reevaluate(
        LeaseSelector(workflow_id="wf-2"), "approval apr-1 withdrawn", approval_id="apr-1"
    )
    assert (withdrawn.denied, withdrawn.confirmed_revoked) == (1, 1)
    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    (event,) = world.audit.events
    assert isinstance(event.payload, CredentialRevoked)
    assert "approval apr-1 withdrawn" in event.payload.reason
    assert event.approval_id == "apr-1"


async def test_an_approval_id_filter_leaves_other_leases_alone(world: World) -> None:
    db = await world.issue()
    report = await world.continuous.reevaluate(
        LeaseSelector(workflow_id="wf-1"), "x", approval_id="apr-unrelated"
    )
    assert report.examined == 0
    assert await world.state(db.credential_id) == (LeaseState.ACTIVE, "")


async def test_a_tighter_ttl_cap_revokes_longer_lived_credentials(world: World) -> None:
    long_lived = await world.issue(task="long", ttl=600)
    short = await world.issue(task="short", ttl=60)
    cap = (
        '@id("cap-2m") @max_ttl("120")\n'
        'permit (principal is Agent, action == Action::"request_credential", resource is Target)'
        ' when { resource.name == "demo-db" };\n'
    )
    world.policy.replace(engine_with(cap))
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert await world.state(long_lived.credential_id) == (
        LeaseState.REVOKED,
        "continuous_authorization",
    )
    assert await world.state(short.credential_id) == (LeaseState.ACTIVE, "")
    (event,) = world.audit.events
    assert isinstance(event.payload, CredentialRevoked)
    assert "lives 600 s, longer than the 120 s policy now allows" in event.payload.reason


async def test_a_holder_that_lost_its_agent_role_is_revoked(world: World) -> None:
    db = await world.issue()
    world.continuous = ContinuousAuthorizer(
        ledger=world.ledger,
        policy=world.policy,
        targets=world.targets,
        roles=parse_role_map({"workload": []}),
        revoker=world.revoker,
        clock=world.clock,
        audit=world.audit,
    )
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert (await world.state(db.credential_id))[0] == LeaseState.REVOKED


async def test_a_lease_whose_run_is_gone_is_revoked(world: World) -> None:
    db = await world.issue()
    world.ledger._runs.clear()  # Redis data loss of the run record
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert (await world.state(db.credential_id))[0] == LeaseState.REVOKED


async def test_leases_already_being_revoked_are_not_decided_again(world: World) -> None:
    db = await world.issue()
    await world.revoker.release(caller(AGENT, Role.AGENT), db.credential_id)
    world.policy.replace(engine_with(DENY_DEMO_DB))
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "x")
    assert report.examined == 0
    assert world.audit.events == []


async def test_a_credential_that_cannot_be_revoked_early_is_reported_still_live(
    world: World,
) -> None:
    issued = await world.broker.request_credential(
        caller(AGENT, Role.AGENT),
        CredentialRequest(
            workflow_id="wf-1", task_id="ssh", target="demo-ssh", ttl=timedelta(minutes=5)
        ),
        params={"public_key": "ssh-ed25519 AAAA"},
    )
    world.policy.replace(
        engine_with(
            '@id("no-ssh") forbid (principal, action, resource)\n'
            'when { resource.name == "demo-ssh" };'
        )
    )
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "x")
    (live,) = report.still_live_sample
    assert (report.denied, report.confirmed_revoked, report.still_live) == (1, 0, 1)
    assert (issued.lease.credential_id, "not_revocable") == (live.credential_id, live.outcome.value)
    assert world.audit.events == []


async def test_revocation_does_not_wait_for_a_failing_audit_sink(world: World) -> None:
    db = await world.issue()
    world.audit.fail = True
    world.policy.replace(engine_with(DENY_DEMO_DB))
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert (await world.state(db.credential_id))[0] == LeaseState.REVOKED


async def test_a_failing_background_reevaluation_is_logged_not_raised(world: World) -> None:
    async def boom() -> None:
        raise RuntimeError("nope")

    world.continuous.in_background(boom(), "boom")
    await world.continuous.drain()


class _Approval:
    def __init__(self, status: str) -> None:
        from broker.core.approvals import ApprovalStatus

        self.id = "apr_" + "0" * 24
        self.approvers = ("bob@example.test",)
        self.expires_at = NOW + timedelta(hours=1)
        self._status = ApprovalStatus(status)

    def status_at(self, now: datetime) -> object:
        return self._status


class _Store:
    def __init__(self, approval: _Approval | None) -> None:
        self.approval = approval

    async def get_approval(self, approval_id: str) -> _Approval | None:
        return self.approval


@pytest.mark.parametrize(
    ("status", "approved"),
    [
        ("approved", True),
        ("used", True),
        ("withdrawn", False),
        ("denied", False),
        ("expired", False),
        ("pending", False),
    ],
)
async def test_the_approval_store_standing_of_an_approval(status: str, approved: bool) -> None:
    states = ApprovalStoreStates(_Store(_Approval(status)))  # type: ignore[arg-type]
    state = await states.approval_state("apr_" + "0" * 24, NOW)
    assert state is not None
    assert (approved, ("bob@example.test",)) == (state.approved, state.approvers)


async def test_an_approval_the_store_does_not_know_is_none() -> None:
    states = ApprovalStoreStates(_Store(None))  # type: ignore[arg-type]
    assert await states.approval_state("apr_x", NOW) is None


class FlakyMinter(FakeMinter):
    """Refuses the first revocation (OpenBao briefly unavailable)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = 1

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        if self.refuse:
            self.refuse -= 1
            return RevokeOutcome(confirmed=False, still_live=(token_accessor,), error="sealed")
        return await super().revoke(token_accessor=token_accessor, vault_lease_ids=vault_lease_ids)


async def test_a_continuous_revocation_the_sweeper_finishes_is_audited_once(world: World) -> None:
    minter = FlakyMinter()
    world.minter = minter
    world.broker._minter = minter
    world.revoker = Revoker(
        ledger=world.ledger, minter=minter, clock=world.clock, audit=world.audit
    )
    world.continuous = ContinuousAuthorizer(
        ledger=world.ledger,
        policy=world.policy,
        targets=world.targets,
        roles=ROLES,
        revoker=world.revoker,
        clock=world.clock,
        audit=world.audit,
    )
    db = await world.issue()
    world.policy.replace(engine_with(DENY_DEMO_DB))

    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "policy changed")
    (pending,) = report.still_live_sample
    assert pending.outcome.value == "retrying"
    assert [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED] == []

    world.clock.current = NOW + timedelta(seconds=30)
    await world.revoker.revoke_due(world.clock.current)
    assert await world.state(db.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    (event,) = [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert isinstance(event.payload, CredentialRevoked)
    assert event.payload.cause == "continuous_authorization"


async def test_a_continuous_revocation_confirmed_inline_is_audited_once(world: World) -> None:
    world.revoker = Revoker(
        ledger=world.ledger, minter=world.minter, clock=world.clock, audit=world.audit
    )
    world.continuous = ContinuousAuthorizer(
        ledger=world.ledger,
        policy=world.policy,
        targets=world.targets,
        roles=ROLES,
        revoker=world.revoker,
        clock=world.clock,
        audit=world.audit,
    )
    await world.issue()
    world.policy.replace(engine_with(DENY_DEMO_DB))
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    (event,) = [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert isinstance(event.payload, CredentialRevoked)
    assert "demo-db-closed" in event.payload.reason


async def test_a_mint_in_flight_that_is_now_denied_cannot_activate(world: World) -> None:
    in_flight = Lease(
        credential_id="cred_inflight",
        workflow_id="wf-1",
        task_id="t-9",
        target="demo-db",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.INTERNAL,
        holder=AGENT,
        owner="alice@example.test",
        chain=DelegationChain(()),
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
    )
    await world.ledger.write_ahead(in_flight)
    world.policy.replace(engine_with(DENY_DEMO_DB))
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "policy changed")
    assert [v.lease.credential_id for v in report.denied_sample] == ["cred_inflight"]

    with pytest.raises(ConflictError) as refused:
        await world.ledger.activate("cred_inflight", token_accessor="acc-x", vault_lease_ids=())
    assert refused.value.reason == "lease.tombstoned"
    # The refused activation recorded the token: the sweeper revokes it.
    world.clock.current = NOW + timedelta(seconds=1)
    await world.revoker.revoke_due(world.clock.current)
    assert "acc-x" in world.minter.revoked


async def test_a_task_whose_credential_was_revoked_can_ask_again_at_once(world: World) -> None:
    first = await world.issue(target="demo-db", task="t-1")
    world.policy.replace(engine_with(DENY_DEMO_DB))
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert (await world.state(first.credential_id))[0] == LeaseState.REVOKED
    world.policy.replace(engine_with())  # the change is rolled back
    world.clock.current = NOW + timedelta(milliseconds=5)
    again = await world.issue(target="demo-db", task="t-1")
    assert (await world.state(again.credential_id))[0] == LeaseState.ACTIVE


async def test_close_cancels_background_reevaluations(world: World) -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    world.continuous.in_background(forever(), "forever")
    await started.wait()
    await world.continuous.close()
    await world.continuous.drain()


async def test_a_background_tasklease_error_is_logged(world: World) -> None:
    async def refused() -> None:
        raise LedgerUnavailableError("redis down", reason="ledger.unavailable")

    with capture_logs() as logs:
        world.continuous.in_background(refused(), "refused")
        await world.continuous.drain()
    assert [e["reason"] for e in logs if e["event"] == "continuous.failed"] == [
        "ledger.unavailable"
    ]


async def test_the_quarantine_wrapper_passes_lift_and_list_through(world: World) -> None:
    unattached = ReevaluatingQuarantines(store=world.ledger)
    db = await world.issue()
    await world.broker.set_quarantine(
        caller(ADMIN, Role.ADMIN),
        kind=QuarantineKind.TARGET,
        value="demo-kv",
        reason="x",
        ttl=timedelta(hours=1),
    )
    await world.continuous.drain()
    assert [q.value for q in await world.quarantines.quarantines(NOW)] == ["demo-kv"]
    assert await world.quarantines.lift_quarantine(QuarantineKind.TARGET, "demo-kv")
    with capture_logs() as logs:
        await unattached.set_quarantine(_quarantine())
    assert [e["event"] for e in logs] == ["continuous.not_attached"]
    assert (await world.state(db.credential_id))[0] == LeaseState.ACTIVE


def _quarantine() -> Quarantine:
    return Quarantine(
        kind=QuarantineKind.TARGET,
        value="demo-db",
        reason="x",
        created_by=ADMIN,
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )


async def test_without_an_audit_trail_the_revocation_still_happens(world: World) -> None:
    db = await world.issue()
    world.continuous = ContinuousAuthorizer(
        ledger=world.ledger,
        policy=world.policy,
        targets=world.targets,
        roles=ROLES,
        revoker=world.revoker,
        clock=world.clock,
    )
    world.policy.replace(engine_with(DENY_DEMO_DB))
    await world.continuous.policy_changed(trigger="sighup")
    await world.continuous.drain()
    assert (await world.state(db.credential_id))[0] == LeaseState.REVOKED
    assert world.audit.events == []


async def test_a_run_past_its_deadline_is_named_so(world: World) -> None:
    db = await world.issue()
    stored = await world.ledger.get_lease(db.credential_id)
    assert stored is not None
    world.clock.current = NOW + timedelta(hours=13)
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "x")
    (verdict,) = report.denied_sample
    assert "is no longer active (past its deadline)" in verdict.why


async def test_a_holder_that_is_not_a_spiffe_id_has_no_roles(world: World) -> None:
    db = await world.issue()
    stored = await world.ledger.get_lease(db.credential_id)
    assert stored is not None
    world.ledger._leases[db.credential_id] = dataclasses.replace(stored, holder="not-an-id")
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "x")
    (verdict,) = report.denied_sample
    assert "agent-role-required" in verdict.policy_ids


# --- every covered lease is decided, a batch at a time -----------------------------------


async def test_every_lease_beyond_the_first_batch_is_decided_and_the_denied_revoked(
    world: World,
) -> None:
    db = [await world.issue("demo-db", task=f"db-{n}") for n in range(11)]
    kv = [await world.issue("demo-kv", task=f"kv-{n}") for n in range(6)]
    world.continuous = world.authorizer(batch=4)
    world.policy.replace(engine_with(DENY_DEMO_DB))

    with capture_logs() as logs:
        report = await world.continuous.reevaluate(LeaseSelector(everything=True), "x")

    assert (
        report.examined,
        report.denied,
        report.confirmed_revoked,
        report.still_live,
        report.batches,
    ) == (17, 11, 11, 0, 5)
    for lease in db:
        assert await world.state(lease.credential_id) == (
            LeaseState.REVOKED,
            "continuous_authorization",
        )
    for lease in kv:
        assert await world.state(lease.credential_id) == (LeaseState.ACTIVE, "")
    assert sorted(x.token_accessor for x in db) == sorted(world.minter.revoked)
    revoked_events = [e for e in world.audit.events if e.type is EventType.CREDENTIAL_REVOKED]
    assert sorted(x.credential_id for x in db) == sorted(e.credential_id for e in revoked_events)
    (summary,) = [e for e in logs if e["event"] == "continuous.reevaluated"]
    assert (
        summary["examined"],
        summary["denied"],
        summary["confirmed_revoked"],
        summary["still_live"],
        summary["batches"],
    ) == (17, 11, 11, 0, 5)
    assert "truncated" not in summary


async def test_a_batched_selector_reaches_every_lease_it_names(world: World) -> None:
    """A narrower selector (a quarantine's) goes through the batches the same way."""
    mine = [await world.issue(task=f"m-{n}") for n in range(7)]
    theirs = await world.issue(task="other", agent=OTHER_AGENT)
    world.continuous = world.authorizer(batch=2)
    await world.ledger.set_quarantine(
        dataclasses.replace(_quarantine(), kind=QuarantineKind.IDENTITY, value=AGENT)
    )
    report = await world.continuous.quarantine_set(
        dataclasses.replace(_quarantine(), kind=QuarantineKind.IDENTITY, value=AGENT)
    )
    assert (report.examined, report.denied, report.confirmed_revoked) == (7, 7, 7)
    assert {LeaseState.REVOKED} == {(await world.state(x.credential_id))[0] for x in mine}
    assert (await world.state(theirs.credential_id))[0] == LeaseState.ACTIVE


async def test_the_report_keeps_a_bounded_sample_and_counts_every_lease(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.continuous.REPORT_SAMPLE", 3)
    for n in range(8):
        await world.issue(task=f"t-{n}")
    world.continuous = world.authorizer(batch=5)
    world.policy.replace(engine_with(DENY_DEMO_DB))
    report = await world.continuous.reevaluate(LeaseSelector(everything=True), "x")
    assert (report.denied, report.confirmed_revoked, len(report.denied_sample)) == (8, 8, 3)


class _FailingAfterOneBatch(InMemoryLedger):
    """The ledger becomes unreachable after handing out the first batch."""

    async def iter_leases(
        self, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        async for found in super().iter_leases(selector, batch=batch):
            yield found
            raise LedgerUnavailableError("redis down", reason="ledger.unavailable")


async def test_a_reevaluation_cut_short_says_so_and_keeps_what_it_revoked() -> None:
    world = World(_FailingAfterOneBatch())
    await world.start_run()
    leases = [await world.issue(task=f"t-{n}") for n in range(4)]
    world.continuous = world.authorizer(batch=2)
    world.policy.replace(engine_with(DENY_DEMO_DB))

    with capture_logs() as logs, pytest.raises(LedgerUnavailableError):
        await world.continuous.reevaluate(LeaseSelector(everything=True), "one attempt")

    states = [(await world.state(x.credential_id))[0] for x in leases]
    assert sorted(states) == sorted([LeaseState.REVOKED] * 2 + [LeaseState.ACTIVE] * 2)
    (incomplete,) = [e for e in logs if e["event"] == "continuous.incomplete"]
    assert (
        incomplete["examined"],
        incomplete["denied"],
        incomplete["reason"],
        incomplete["alert"],
    ) == (2, 2, "ledger.unavailable", True)


@pytest.mark.parametrize("batch", [0, 10_001])
def test_the_batch_size_is_within_what_the_ledger_reads_per_call(world: World, batch: int) -> None:
    with pytest.raises(ValueError, match="batch"):
        world.authorizer(batch=batch)


class _QuarantinesOnceUnreadable:
    """The ledger's quarantines, unreadable on the first read (Redis not up yet at start)."""

    def __init__(self, ledger: InMemoryLedger) -> None:
        self._ledger = ledger
        self.reads = 0

    async def quarantines(self, now: datetime) -> list[Quarantine]:
        self.reads += 1
        if self.reads == 1:
            raise LedgerUnavailableError("Redis is down", reason="ledger.unavailable")
        return await self._ledger.quarantines(now)


async def test_at_start_up_every_quarantine_in_force_revokes_what_it_still_covers(
    world: World,
) -> None:
    """A quarantine stored but never (or not completely) re-evaluated — the broker stopped
    before its re-evaluation ran — revokes what it covers once a broker starts; the read of
    the quarantines is retried; other leases stay."""
    mine = await world.issue(task="a")
    theirs = await world.issue(task="b", agent=OTHER_AGENT)
    await world.ledger.set_quarantine(  # stored only: nothing re-evaluated yet
        dataclasses.replace(_quarantine(), kind=QuarantineKind.IDENTITY, value=AGENT)
    )
    unreadable = _QuarantinesOnceUnreadable(world.ledger)
    started = world.authorizer(retry_base=timedelta(milliseconds=1), quarantines=unreadable)
    started.reapply_quarantines()
    await started.drain()
    assert unreadable.reads >= 2
    assert await world.state(mine.credential_id) == (LeaseState.REVOKED, "continuous_authorization")
    assert await world.state(theirs.credential_id) == (LeaseState.ACTIVE, "")
    (event,) = world.audit.events
    assert isinstance(event.payload, CredentialRevoked)
    assert "start-up: quarantine in force: identity" in event.payload.reason
    # Nothing left to do at the next start.
    again = world.authorizer()
    again.reapply_quarantines()
    await again.drain()
    assert len(world.audit.events) == 1
