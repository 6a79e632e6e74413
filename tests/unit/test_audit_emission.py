"""Audit events at their sources, with fakes: issuance, refusals, quarantines, revocation, and
reported events; correlated ids, the delegation chain, never a secret; issuance fails closed
when the trail cannot take its events."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.config_files import load_policy_engine, load_target_catalog
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.memory_ledger import InMemoryLedger
from broker.audit import AuditService, ReportedEvent
from broker.core.audit import REQUEST_ID, AuditEvent, AuditPage, AuditQuery, EventType
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import CredentialRequest, LeaseState, Quarantine, QuarantineKind
from broker.core.ports import (
    LeaseSelector,
    MintedCredential,
    MintSpec,
    QuarantineStore,
    RevokeOutcome,
)
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.errors import (
    AuditUnavailableError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    LimitExceededError,
    NotFoundError,
    PolicyDeniedError,
    UnavailableError,
)
from broker.revocation import RevocationSettings, Revoker, RunOutcome
from broker.service import CredentialBroker

NOW = datetime(2030, 1, 7, 12, 0, tzinfo=UTC)  # a Monday, within working hours
AGENT = "spiffe://tasklease.test/agent/demo"
OTHER = "spiffe://tasklease.test/agent/other"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
ADMIN = "spiffe://tasklease.test/admin/demo"
POLICY = load_policy_engine(Path("config/policies"))
TARGETS = load_target_catalog(Path("config/targets.toml"))
SECRET = "s3cret-Zq9-never-in-audit"
T = EventType


class Clock:
    def __init__(self) -> None:
        self.current = NOW

    def now(self) -> datetime:
        return self.current


class Minter:
    def __init__(self, *, confirm: bool = True) -> None:
        self.revoked: list[str] = []
        self.count = 0
        self.confirm = confirm

    async def mint(self, spec: MintSpec) -> MintedCredential:
        self.count += 1
        return MintedCredential(
            token_accessor=f"acc-{self.count}",
            vault_lease_ids=(f"database/creds/x/{self.count}",),
            expires_at=NOW + spec.ttl,
            secret={"username": "u", "password": SECRET},
        )

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.revoked.append(token_accessor)
        if not self.confirm:
            return RevokeOutcome(confirmed=False, still_live=(token_accessor,), error="busy")
        return RevokeOutcome(confirmed=True)


def caller(principal: str, *roles: Role) -> Caller:
    identity = WorkloadIdentity(
        SpiffeId.parse(principal), NOW + timedelta(hours=1), AuthMethod.X509_SVID
    )
    return Caller(identity, frozenset(roles))


AGENT_CALLER = caller(AGENT, Role.AGENT)
OTHER_CALLER = caller(OTHER, Role.AGENT)
ORCH_CALLER = caller(ORCH, Role.ORCHESTRATOR)
ADMIN_CALLER = caller(ADMIN, Role.ADMIN)


class World:
    def __init__(
        self,
        *,
        max_attempts: int = 8,
        confirm: bool = True,
        live_limit: int = 0,
        quarantines: QuarantineStore | None = None,
    ) -> None:
        self.clock = Clock()
        self.ledger = InMemoryLedger()
        self.minter = Minter(confirm=confirm)
        self.audit = MemoryAuditTrail()
        self.broker = CredentialBroker(
            policy=POLICY,
            minter=self.minter,
            ledger=self.ledger,
            targets=TARGETS,
            clock=self.clock,
            quarantines=quarantines or self.ledger,
            audit=self.audit,
            live_limit_per_identity=live_limit,
        )
        self.revoker = Revoker(
            ledger=self.ledger,
            minter=self.minter,
            clock=self.clock,
            settings=RevocationSettings(max_attempts=max_attempts),
            rng=random.Random(3),
            audit=self.audit,
            audit_actor="spiffe://tasklease.test/broker",
        )
        self.reports = AuditService(ledger=self.ledger, audit=self.audit, clock=self.clock)

    async def start(self, run_id: str = "wf-1") -> None:
        await self.broker.start_workflow(
            ORCH_CALLER,
            workflow_id=run_id,
            owner="alice@example.test",
            purpose="nightly OPS-1",
            deadline=NOW + timedelta(minutes=30),
            labels={},
            participants=(AGENT,),
        )

    async def issue(self, run_id: str = "wf-1", task: str = "t-1") -> str:
        issued = await self.broker.request_credential(
            AGENT_CALLER,
            CredentialRequest(
                workflow_id=run_id, task_id=task, target="demo-db", ttl=timedelta(minutes=5)
            ),
            params={},
        )
        return issued.lease.credential_id

    def types(self) -> list[str]:
        return [e.type.value for e in self.audit.events]

    def dumped(self) -> str:
        return json.dumps([e.as_dict() for e in self.audit.events])


def _by_type(events: list[AuditEvent], kind: EventType) -> AuditEvent:
    (found,) = [e for e in events if e.type is kind]
    return found


async def test_issuance_records_the_decision_and_the_credential_with_correlated_ids() -> None:
    world = World()
    await world.start()
    token = REQUEST_ID.set("req-42")
    try:
        credential_id = await world.issue()
    finally:
        REQUEST_ID.reset(token)
    assert world.types() == ["workflow.started", "policy.decision", "credential.issued"]
    started, decided, issued = world.audit.events
    assert (started.actor, started.workflow_id) == (ORCH, "wf-1")
    assert [h.role for h in started.chain.hops] == ["owner", "orchestrator"]  # type: ignore[union-attr]
    for event in (decided, issued):
        assert (event.actor, event.workflow_id, event.task_id, event.request_id) == (
            AGENT,
            "wf-1",
            "t-1",
            "req-42",
        )
        assert [h.principal for h in event.chain.hops] == ["alice@example.test", ORCH, AGENT]  # type: ignore[union-attr]
    # The decision names the credential it allowed: a credential's query starts with it.
    assert issued.credential_id == decided.credential_id == credential_id
    payload = issued.as_dict()["payload"]
    assert (payload["target"], payload["kind"], payload["token_accessor"]) == (
        "demo-db",
        "database",
        "acc-1",
    )
    assert payload["policy_ids"] == list(decided.as_dict()["payload"]["policy_ids"])
    decision = decided.as_dict()["payload"]
    assert decision["outcome"] == "allow"
    assert decision["context"]["context"]["run"]["id"] == "wf-1"
    assert decision["context"]["principal"]["id"] == AGENT
    assert SECRET not in world.dumped()


async def test_a_policy_denial_records_the_decision_and_the_refusal() -> None:
    world = World()
    await world.start()
    with pytest.raises(PolicyDeniedError) as denied:
        await world.broker.request_credential(
            OTHER_CALLER,
            CredentialRequest(
                workflow_id="wf-1", task_id="t-9", target="demo-db", ttl=timedelta(minutes=5)
            ),
            params={},
        )
    assert world.types() == ["workflow.started", "policy.decision", "credential.denied"]
    refused = world.audit.events[-1].as_dict()
    assert refused["payload"]["reason"] == "policy.deny"
    assert refused["payload"]["policy_ids"] == list(denied.value.policy_ids)
    assert (refused["actor"], refused["workflow_id"], refused["task_id"]) == (OTHER, "wf-1", "t-9")
    assert world.audit.events[-2].as_dict()["payload"]["outcome"] == "deny"


async def test_a_request_over_the_live_limit_records_its_decision_and_the_refusal() -> None:
    world = World(live_limit=1)
    await world.start()
    await world.issue(task="t-1")
    minted = world.minter.count
    with pytest.raises(LimitExceededError) as refused:
        await world.issue(task="t-2")
    assert (refused.value.status, refused.value.limit) == (429, 1)
    assert world.minter.count == minted  # nothing minted for it
    assert world.types()[-2:] == ["policy.decision", "credential.denied"]
    denied = world.audit.events[-1].as_dict()
    assert denied["payload"]["reason"] == "limit.live_per_identity"
    assert (denied["actor"], denied["task_id"]) == (AGENT, "t-2")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown-run", "workflow.not_found"),
        ("unknown-target", "target.unknown"),
        ("quarantined", "quarantine.active"),
        ("ended-run", "workflow.not_active"),
    ],
)
async def test_refusals_before_a_decision_are_recorded(case: str, reason: str) -> None:
    world = World()
    await world.start()
    run, target = "wf-1", "demo-db"
    if case == "unknown-run":
        run = "wf-none"
    elif case == "unknown-target":
        target = "nope"
    elif case == "quarantined":
        await world.broker.set_quarantine(
            ADMIN_CALLER,
            kind=QuarantineKind.IDENTITY,
            value=AGENT,
            reason="INC-1",
            ttl=timedelta(hours=1),
        )
    else:
        await world.revoker.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    with pytest.raises((NotFoundError, ForbiddenError, ConflictError)):
        await world.broker.request_credential(
            AGENT_CALLER,
            CredentialRequest(
                workflow_id=run, task_id="t-1", target=target, ttl=timedelta(minutes=5)
            ),
            params={},
        )
    refused = world.audit.events[-1]
    assert refused.type is T.CREDENTIAL_DENIED
    assert refused.as_dict()["payload"]["reason"] == reason
    assert T.POLICY_DECISION not in [e.type for e in world.audit.events]


class _ReadJustBefore:
    """The quarantines as the broker read them just before a security team stored one."""

    async def quarantines(self, now: datetime) -> list[Quarantine]:
        return []

    async def set_quarantine(self, quarantine: Quarantine) -> None:
        raise AssertionError("not stored through this store")

    async def lift_quarantine(self, kind: QuarantineKind, value: str) -> bool:
        raise AssertionError("not lifted through this store")


async def test_a_quarantine_stored_after_the_request_read_them_still_blocks_it() -> None:
    world = World(quarantines=_ReadJustBefore())
    await world.start()
    await world.ledger.set_quarantine(
        Quarantine(
            kind=QuarantineKind.IDENTITY,
            value=AGENT,
            reason="INC-9",
            created_by=ADMIN,
            created_at=NOW,
            expires_at=NOW + timedelta(hours=1),
        )
    )
    with pytest.raises(ForbiddenError) as refused:
        await world.issue()
    assert refused.value.reason == "quarantine.active"
    assert world.minter.count == 0
    assert await world.ledger.find_leases(LeaseSelector(workflow_id="wf-1")) == []
    # Policy allowed it; the quarantine, checked again by the write-ahead, refused it.
    assert world.types()[-2:] == ["policy.decision", "credential.denied"]
    assert world.audit.events[-1].as_dict()["payload"]["reason"] == "quarantine.active"


async def test_a_trail_that_cannot_take_the_issuance_revokes_the_credential_and_fails() -> None:
    world = World()
    await world.start()
    world.audit.fail = True
    with pytest.raises(AuditUnavailableError):
        await world.issue()
    assert world.minter.revoked == ["acc-1"]
    (lease,) = await world.ledger.find_leases(LeaseSelector(workflow_id="wf-1"))
    assert (lease.state, lease.revoke_reason) == (LeaseState.REVOKING, "audit_unavailable")
    # Due now: the sweeper confirms the revocation and records it once the trail is back.
    world.audit.fail = False
    report = await world.revoker.revoke_due(world.clock.now())
    assert report.revoked == (lease.credential_id,)
    revoked = world.audit.events[-1].as_dict()
    assert (revoked["type"], revoked["payload"]["cause"]) == (
        "credential.revoked",
        "audit_unavailable",
    )


async def test_starting_a_run_fails_closed_without_the_trail() -> None:
    world = World()
    world.audit.fail = True
    with pytest.raises(UnavailableError) as failed:
        await world.start()
    assert failed.value.code == "audit_unavailable"


async def test_quarantines_set_and_lifted_are_recorded() -> None:
    world = World()
    await world.broker.set_quarantine(
        ADMIN_CALLER, kind=QuarantineKind.WORKFLOW, value="wf-7", reason="INC-2", ttl=timedelta(1)
    )
    await world.broker.lift_quarantine(ADMIN_CALLER, kind=QuarantineKind.WORKFLOW, value="wf-7")
    assert [
        (e.type, e.actor, e.workflow_id, e.as_dict()["payload"]["action"])
        for e in world.audit.events
    ] == [
        (T.QUARANTINE_CHANGED, ADMIN, "wf-7", "set"),
        (T.QUARANTINE_CHANGED, ADMIN, "wf-7", "lift"),
    ]


# --------------------------------------------------------------------------- revocation


async def test_completion_records_the_end_then_each_confirmed_revocation() -> None:
    world = World()
    await world.start()
    credential_id = await world.issue()
    await world.revoker.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    assert world.types()[-2:] == ["workflow.completed", "credential.revoked"]
    ended, revoked = (e.as_dict() for e in world.audit.events[-2:])
    assert (ended["actor"], ended["payload"]["state"], ended["payload"]["leases_due"]) == (
        ORCH,
        "completed",
        1,
    )
    assert (revoked["credential_id"], revoked["actor"], revoked["payload"]) == (
        credential_id,
        "spiffe://tasklease.test/broker",
        {"cause": "run_completed", "target": "demo-db", "reason": "", "initiated_by": ORCH},
    )
    # A repeated completion changes nothing and records nothing new.
    before = len(world.audit.events)
    await world.revoker.complete_workflow(ORCH_CALLER, "wf-1", RunOutcome.COMPLETED, wait=True)
    assert len(world.audit.events) == before


async def test_release_force_and_ttl_each_say_why_and_who() -> None:
    world = World()
    await world.start()
    released = await world.issue(task="t-1")
    forced = await world.issue(task="t-2")
    expiring = await world.issue(task="t-3")
    await world.revoker.release(AGENT_CALLER, released)
    await world.revoker.force(
        ADMIN_CALLER, LeaseSelector(workflow_id="wf-1", task_id="t-2"), "INC-9: key leaked"
    )
    world.clock.current = NOW + timedelta(minutes=6)
    await world.revoker.revoke_due(world.clock.now())
    why = {
        e.credential_id: e.as_dict()["payload"]
        for e in world.audit.events
        if e.type is T.CREDENTIAL_REVOKED
    }
    assert why[released] == {
        "cause": "released",
        "target": "demo-db",
        "reason": "",
        "initiated_by": AGENT,
    }
    assert why[forced] == {
        "cause": "forced",
        "target": "demo-db",
        "reason": "INC-9: key leaked",
        "initiated_by": ADMIN,
    }
    assert why[expiring] == {
        "cause": "ttl_expired",
        "target": "demo-db",
        "reason": "",
        "initiated_by": "",
    }
    summary = _by_type(world.audit.events, T.REVOCATION_FORCED).as_dict()
    assert summary["actor"] == ADMIN
    assert summary["payload"]["credential_ids"] == [forced]
    assert summary["payload"]["workflow_ids"] == ["wf-1"]
    assert (summary["payload"]["confirmed"], summary["payload"]["still_live"]) == (1, 0)
    assert AuditQuery(credential_id=forced).matches(summary)


async def test_revoke_failed_is_recorded_once_and_revocation_never_waits_for_the_trail() -> None:
    world = World(max_attempts=2, confirm=False)
    await world.start()
    credential_id = await world.issue()
    world.audit.fail = True  # revocation goes on without its events
    await world.revoker.release(AGENT_CALLER, credential_id)
    world.audit.fail = False
    world.clock.current = NOW + timedelta(minutes=10)
    await world.revoker.revoke_due(world.clock.now())
    world.clock.current = NOW + timedelta(minutes=20)
    await world.revoker.revoke_due(world.clock.now())
    failed = _by_type(world.audit.events, T.CREDENTIAL_REVOKE_FAILED).as_dict()
    assert failed["credential_id"] == credential_id
    assert failed["payload"]["attempts"] == 2
    assert failed["payload"]["still_live"] == ["acc-1", "database/creds/x/1"]


# --------------------------------------------------------------------------- reported events


async def report(world: World, who: Caller, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {"type": "agent.tool_call", "name": "psql", **fields}
    return await world.reports.report(who, ReportedEvent(**values))


async def test_a_tool_call_bound_to_a_held_credential_inherits_its_ids() -> None:
    world = World()
    await world.start()
    credential_id = await world.issue()
    event = await report(
        world,
        AGENT_CALLER,
        credential_id=credential_id,
        summary="SELECT 1\r\n\x1b[2J",
        details={"rows": "3"},
    )
    data = event.as_dict()
    assert (data["workflow_id"], data["task_id"], data["credential_id"], data["actor"]) == (
        "wf-1",
        "t-1",
        credential_id,
        AGENT,
    )
    assert data["payload"] == {
        "tool": "psql",
        "summary": "SELECT 1\\r\\n\\x1b[2J",
        "details": {"rows": "3"},
    }
    assert [h["principal"] for h in data["chain"]] == ["alice@example.test", ORCH, AGENT]


async def test_a_side_effect_bound_to_a_run_the_orchestrator_started() -> None:
    world = World()
    await world.start()
    event = await report(
        world, ORCH_CALLER, type="agent.side_effect", name="ticket.closed", workflow_id="wf-1"
    )
    assert (event.type, event.workflow_id, event.credential_id) == (T.AGENT_SIDE_EFFECT, "wf-1", "")


@pytest.mark.parametrize(
    ("who", "fields", "error", "reason"),
    [
        ("agent", {"type": "credential.issued"}, BadRequestError, "event.type_not_reportable"),
        ("agent", {}, BadRequestError, "event.unbound"),
        ("other", {"credential_id": "HELD"}, NotFoundError, "credential.not_found"),
        ("agent", {"credential_id": "cred_nope"}, NotFoundError, "credential.not_found"),
        ("agent", {"workflow_id": "wf-1"}, NotFoundError, "workflow.not_found"),
        (
            "agent",
            {"credential_id": "HELD", "workflow_id": "wf-2"},
            BadRequestError,
            "event.binding_mismatch",
        ),
        ("agent", {"credential_id": "HELD", "name": "a\nb"}, BadRequestError, "invalid.tool"),
        (
            "agent",
            {"credential_id": "HELD", "details": {f"k{i}": "v" for i in range(17)}},
            BadRequestError,
            "invalid.details",
        ),
        ("admin", {"credential_id": "HELD"}, ForbiddenError, "auth.role_required"),
    ],
)
async def test_reported_events_are_refused_unless_bound_to_what_the_caller_holds(
    who: str, fields: dict[str, Any], error: type[Exception], reason: str
) -> None:
    world = World()
    await world.start()
    held = await world.issue()
    fields = {k: (held if v == "HELD" else v) for k, v in fields.items()}
    callers: Mapping[str, Caller] = {
        "agent": AGENT_CALLER,
        "other": OTHER_CALLER,
        "admin": ADMIN_CALLER,
    }
    before = len(world.audit.events)
    with pytest.raises(error) as refused:
        await report(world, callers[who], **fields)
    assert refused.value.reason == reason  # type: ignore[attr-defined]
    assert len(world.audit.events) == before


async def test_reports_are_accepted_for_a_while_after_the_credential_ended() -> None:
    world = World()
    await world.start()
    credential_id = await world.issue()
    await world.revoker.release(AGENT_CALLER, credential_id)
    world.clock.current = NOW + timedelta(minutes=4)
    await report(world, AGENT_CALLER, credential_id=credential_id)
    world.clock.current = NOW + timedelta(minutes=6)
    with pytest.raises(ConflictError) as late:
        await report(world, AGENT_CALLER, credential_id=credential_id)
    assert late.value.reason == "event.binding_expired"


class Reader:
    def __init__(self) -> None:
        self.queries: list[AuditQuery] = []

    async def query(self, query: AuditQuery) -> AuditPage:
        self.queries.append(query)
        return AuditPage(records=(), next_cursor=None, scanned=0)


async def test_a_credential_query_reads_its_runs_stream_when_the_ledger_knows_it() -> None:
    world = World()
    await world.start()
    credential_id = await world.issue()
    reader = Reader()
    service = AuditService(ledger=world.ledger, audit=world.audit, clock=world.clock, reader=reader)
    await service.query(ADMIN_CALLER, AuditQuery(credential_id=credential_id))
    await service.query(ADMIN_CALLER, AuditQuery(credential_id="cred_forgotten"))
    assert [(q.workflow_id, q.credential_id) for q in reader.queries] == [
        ("wf-1", credential_id),
        (None, "cred_forgotten"),
    ]


async def test_queries_are_for_admins_and_need_a_reader() -> None:
    world = World()
    with pytest.raises(ForbiddenError):
        await world.reports.query(AGENT_CALLER, AuditQuery())
    with pytest.raises(UnavailableError) as missing:
        await world.reports.query(ADMIN_CALLER, AuditQuery())
    assert missing.value.reason == "audit.queries_unavailable"
