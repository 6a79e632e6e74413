"""Cedar decisions: the shipped default policies as a table, the annotation conventions
(needs_approval gates, TTL caps), fail-closed behaviour and start-up validation."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import cedarpy
import pytest

from broker.adapters.config_files import load_policy_engine, load_target_catalog
from broker.core.model import (
    ActionName,
    Decision,
    DecisionOutcome,
    DelegationHop,
    Sensitivity,
    Target,
    TargetKind,
    WorkflowRun,
)
from broker.core.policy import SCHEMA_FILE, CedarPolicyEngine, WorkingHours
from broker.core.ports import ApprovalState, PolicyRequest
from broker.core.roles import Role
from broker.errors import ConfigurationError

POLICY_DIR = Path("config/policies")
SCHEMA = (POLICY_DIR / SCHEMA_FILE).read_text()
# A Wednesday, midday UTC: inside production hours.
NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
ORCHESTRATOR = "spiffe://tasklease.test/orchestrator/demo"
ALLOW, DENY, NEEDS = DecisionOutcome.ALLOW, DecisionOutcome.DENY, DecisionOutcome.NEEDS_APPROVAL
HOUR, TEN_MIN, FIVE_MIN = timedelta(hours=1), timedelta(minutes=10), timedelta(minutes=5)


@pytest.fixture(scope="module")
def engine() -> CedarPolicyEngine:
    return load_policy_engine(POLICY_DIR)


def make_target(**changes: object) -> Target:
    base = Target(
        name="demo-db",
        kind=TargetKind.DATABASE,
        policies=("target-demo-db",),
        system="demo-postgres",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=15),
        mount="database",
        role="demo-readonly",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make_run(**changes: object) -> WorkflowRun:
    base = WorkflowRun(
        id="wf-1",
        owner="alice@example.test",
        purpose="nightly report",
        started_by=ORCHESTRATOR,
        created_at=NOW - timedelta(minutes=5),
        deadline=NOW + timedelta(hours=2),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make_request(**changes: object) -> PolicyRequest:
    run = make_run()
    base = PolicyRequest(
        principal=AGENT,
        principal_roles=frozenset({Role.AGENT.value}),
        trust_domain="tasklease.test",
        action=ActionName.REQUEST_CREDENTIAL.value,
        target=make_target(),
        run=run,
        chain=run.chain.extended(DelegationHop("agent", AGENT, verified=True)),
        task_id="task-1",
        tool="psql",
        justification="read yesterday's orders",
        ttl=timedelta(minutes=5),
        now=NOW,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def approval(*approvers: str, approved: bool = True, expires_at: datetime | None = None) -> object:
    return ApprovalState(
        approval_id="ap-1",
        approved=approved,
        approvers=approvers,
        expires_at=expires_at or NOW + timedelta(days=1),
    )


PROD = {"environment": "production"}
TICKET = {"ticket": "OPS-1234"}


def at(hour: int, minute: int = 0, tz: timezone = UTC) -> datetime:
    return datetime(2030, 1, 2, hour, minute, tzinfo=tz)


def sub_agent_chain(*, verified: bool) -> object:
    run = make_run()
    chain = run.chain.extended(DelegationHop("agent", AGENT, verified=True))
    return chain.extended(DelegationHop("sub-agent", f"{AGENT}/helper", verified=verified))


# (case, request changes, outcome, determining policy ids, TTL cap)
CASES: list[tuple[str, dict[str, object], DecisionOutcome, tuple[str, ...], timedelta | None]] = [
    # --- participation
    ("no participants listed: same trust domain", {}, ALLOW, ("agent-request",), HOUR),
    (
        "listed participant, exact",
        {"run": make_run(participants=(AGENT,))},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "listed participant, subtree",
        {"run": make_run(participants=("spiffe://tasklease.test/agent/*",))},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "not among the listed participants",
        {"run": make_run(participants=("spiffe://tasklease.test/agent/other",))},
        DENY,
        ("run-participants-only",),
        None,
    ),
    (
        "look-alike of a subtree pattern",
        {
            "run": make_run(participants=("spiffe://tasklease.test/agent/*",)),
            "principal": "spiffe://tasklease.test/agent-evil/x",
        },
        DENY,
        ("run-participants-only",),
        None,
    ),
    (
        "a participant pattern that does not parse matches nobody",
        {"run": make_run(participants=("not a pattern",))},
        DENY,
        ("run-participants-only",),
        None,
    ),
    (
        "a principal that is not a SPIFFE ID matches no pattern",
        {"run": make_run(participants=("spiffe://tasklease.test/agent/*",)), "principal": "demo"},
        DENY,
        ("run-participants-only",),
        None,
    ),
    (
        "no participants listed and the run's home trust domain is unknown",
        {"run": make_run(started_by="orchestrator")},
        DENY,
        ("run-participants-only",),
        None,
    ),
    (
        "no participants listed: another trust domain",
        {"principal": "spiffe://other.test/agent/demo", "trust_domain": "other.test"},
        DENY,
        ("run-participants-only",),
        None,
    ),
    # --- roles
    (
        "orchestrator role only",
        {"principal_roles": frozenset({Role.ORCHESTRATOR.value})},
        DENY,
        ("agent-role-required",),
        None,
    ),
    (
        "several roles including agent",
        {"principal_roles": frozenset({Role.AGENT.value, Role.ADMIN.value})},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "no role and not a participant: both guards named",
        {"principal_roles": frozenset(), "run": make_run(participants=(ORCHESTRATOR,))},
        DENY,
        ("agent-role-required", "run-participants-only"),
        None,
    ),
    # --- restricted: approval gate
    (
        "restricted without approval",
        {"target": make_target(sensitivity=Sensitivity.RESTRICTED)},
        NEEDS,
        ("restricted-needs-approval",),
        None,
    ),
    (
        "restricted with an approval by someone else",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "approval": approval("bob@example.test"),
        },
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "restricted with an approval that is not granted",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "approval": approval("bob@example.test", approved=False),
        },
        NEEDS,
        ("restricted-needs-approval",),
        None,
    ),
    (
        "restricted with an expired approval",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "approval": approval("bob@example.test", expires_at=NOW),
        },
        NEEDS,
        ("restricted-needs-approval",),
        None,
    ),
    (
        "restricted approved by the run's owner",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "approval": approval("alice@example.test", "bob@example.test"),
        },
        NEEDS,
        ("restricted-needs-approval",),
        None,
    ),
    (
        "restricted approved by the requesting agent",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "approval": approval(AGENT),
        },
        NEEDS,
        ("restricted-needs-approval",),
        None,
    ),
    (
        "restricted granted with no approver",
        {"target": make_target(sensitivity=Sensitivity.RESTRICTED), "approval": approval()},
        NEEDS,
        ("restricted-needs-approval",),
        None,
    ),
    (
        "restricted and not a participant: a hard forbid wins over the gate",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "run": make_run(participants=(ORCHESTRATOR,)),
        },
        DENY,
        ("run-participants-only", "restricted-needs-approval"),
        None,
    ),
    (
        "confidential needs no approval",
        {"target": make_target(sensitivity=Sensitivity.CONFIDENTIAL)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    # --- production: ticket and hours
    (
        "production without a ticket",
        {"target": make_target(**PROD)},
        DENY,
        ("production-needs-ticket",),
        None,
    ),
    (
        "production with a ticket label",
        {"target": make_target(**PROD), "run": make_run(labels=TICKET)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "production with a ticket label of the wrong shape",
        {"target": make_target(**PROD), "run": make_run(labels={"ticket": "ops-1234"})},
        DENY,
        ("production-needs-ticket",),
        None,
    ),
    (
        "production with a ticket only in the purpose",
        {"target": make_target(**PROD), "run": make_run(purpose="fix OPS-1234")},
        DENY,
        ("production-needs-ticket",),
        None,
    ),
    (
        "production at 05:59 UTC",
        {"target": make_target(**PROD), "run": make_run(labels=TICKET), "now": at(5, 59)},
        NEEDS,
        ("production-off-hours-needs-approval",),
        None,
    ),
    (
        "production at 06:00 UTC",
        {"target": make_target(**PROD), "run": make_run(labels=TICKET), "now": at(6)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "production at 19:59 UTC",
        {"target": make_target(**PROD), "run": make_run(labels=TICKET), "now": at(19, 59)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "production at 20:00 UTC",
        {"target": make_target(**PROD), "run": make_run(labels=TICKET), "now": at(20)},
        NEEDS,
        ("production-off-hours-needs-approval",),
        None,
    ),
    (
        "production hours are UTC: 21:30+02:00 is 19:30 UTC",
        {
            "target": make_target(**PROD),
            "run": make_run(labels=TICKET),
            "now": at(21, 30, timezone(timedelta(hours=2))),
        },
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "production off-hours with an approval",
        {
            "target": make_target(**PROD),
            "run": make_run(labels=TICKET),
            "now": at(22),
            "approval": approval("bob@example.test"),
        },
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "production off-hours without a ticket: an approval cannot replace the ticket",
        {"target": make_target(**PROD), "now": at(22), "approval": approval("bob@example.test")},
        DENY,
        ("production-needs-ticket",),
        None,
    ),
    (
        "restricted production, off-hours: both gates, still only an approval away",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED, **PROD),
            "run": make_run(labels=TICKET),
            "now": at(23),
        },
        NEEDS,
        ("production-off-hours-needs-approval", "restricted-needs-approval"),
        None,
    ),
    # --- confidential: working hours only (default window 06:00-20:00 UTC)
    (
        "confidential at 05:59 UTC",
        {"target": make_target(sensitivity=Sensitivity.CONFIDENTIAL), "now": at(5, 59)},
        DENY,
        ("confidential-working-hours-only",),
        None,
    ),
    (
        "confidential at 06:00 UTC",
        {"target": make_target(sensitivity=Sensitivity.CONFIDENTIAL), "now": at(6)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "confidential at 20:00 UTC",
        {"target": make_target(sensitivity=Sensitivity.CONFIDENTIAL), "now": at(20)},
        DENY,
        ("confidential-working-hours-only",),
        None,
    ),
    (
        "confidential off-hours: an approval does not lift it",
        {
            "target": make_target(sensitivity=Sensitivity.CONFIDENTIAL),
            "now": at(23),
            "approval": approval("bob@example.test"),
        },
        DENY,
        ("confidential-working-hours-only",),
        None,
    ),
    (
        "internal off-hours is unaffected",
        {"target": make_target(sensitivity=Sensitivity.INTERNAL), "now": at(23)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "restricted off-hours: its approval covers any hour",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "now": at(23),
            "approval": approval("bob@example.test"),
        },
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    # --- delegation: asserted hops get less
    (
        "asserted hop: confidential is denied",
        {
            "target": make_target(sensitivity=Sensitivity.CONFIDENTIAL),
            "chain": sub_agent_chain(verified=False),
        },
        DENY,
        ("asserted-chain-not-for-confidential",),
        None,
    ),
    (
        "asserted hop: restricted is denied even with an approval",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "chain": sub_agent_chain(verified=False),
            "approval": approval("bob@example.test"),
        },
        DENY,
        ("asserted-chain-not-for-confidential",),
        None,
    ),
    (
        "asserted hop, restricted without approval: the hard deny wins over the gate",
        {
            "target": make_target(sensitivity=Sensitivity.RESTRICTED),
            "chain": sub_agent_chain(verified=False),
        },
        DENY,
        ("asserted-chain-not-for-confidential", "restricted-needs-approval"),
        None,
    ),
    (
        "verified sub-agent hop: confidential is allowed",
        {
            "target": make_target(sensitivity=Sensitivity.CONFIDENTIAL),
            "chain": sub_agent_chain(verified=True),
        },
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "the asserted owner hop alone does not count",
        {"target": make_target(sensitivity=Sensitivity.CONFIDENTIAL)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    # --- TTL caps
    (
        "legacy target",
        {"target": make_target(legacy=True)},
        ALLOW,
        ("agent-request", "legacy-short-ttl"),
        FIVE_MIN,
    ),
    (
        "a sub-agent hop asserted by its parent",
        {"chain": sub_agent_chain(verified=False)},
        ALLOW,
        ("agent-request", "asserted-chain-short-ttl"),
        TEN_MIN,
    ),
    (
        "a sub-agent hop the broker verified",
        {"chain": sub_agent_chain(verified=True)},
        ALLOW,
        ("agent-request",),
        HOUR,
    ),
    (
        "legacy and asserted: the smallest cap wins",
        {"target": make_target(legacy=True), "chain": sub_agent_chain(verified=False)},
        ALLOW,
        ("agent-request", "legacy-short-ttl", "asserted-chain-short-ttl"),
        FIVE_MIN,
    ),
    (
        "a cap permit lets nobody in: legacy target, no agent role",
        {"target": make_target(legacy=True), "principal_roles": frozenset()},
        DENY,
        ("agent-role-required",),
        None,
    ),
]


@pytest.mark.parametrize(
    ("changes", "outcome", "policy_ids", "max_ttl"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_default_policies(
    engine: CedarPolicyEngine,
    changes: dict[str, object],
    outcome: DecisionOutcome,
    policy_ids: tuple[str, ...],
    max_ttl: timedelta | None,
) -> None:
    decision = engine.decide(make_request(**changes))
    assert (outcome, policy_ids, max_ttl) == (
        decision.outcome,
        decision.policy_ids,
        decision.max_ttl,
    ), decision.reasons


def test_reasons_explain_the_determining_policies(engine: CedarPolicyEngine) -> None:
    decision = engine.decide(make_request(target=make_target(**PROD)))
    assert decision.reasons == (
        "production-needs-ticket: production targets need a ticket reference: start the run "
        "with a label ticket=ABC-123",
    )


def test_the_evaluated_context_is_json_and_shows_what_was_decided(
    engine: CedarPolicyEngine,
) -> None:
    request = make_request(
        run=make_run(labels={"team": "data", **TICKET}, participants=(AGENT,)),
        chain=sub_agent_chain(verified=False),
        approval=approval("bob@example.test", "bob@example.test"),
    )
    context = engine.decide(request).context
    assert json.loads(json.dumps(context)) == context
    assert context["principal"] == {
        "type": "Agent",
        "id": AGENT,
        "spiffe_id": AGENT,
        "roles": ["agent"],
        "trust_domain": "tasklease.test",
    }
    assert context["action"] == {"type": "Action", "id": "request_credential"}
    assert (context["resource"]["sensitivity"], context["resource"]["sensitivity_rank"]) == (
        "internal",
        1,
    )
    inner = context["context"]
    assert inner["now"] == {"epoch": int(NOW.timestamp()), "hour_utc": 12, "weekday": 3}
    assert inner["run"]["labels"] == ["team=data", "ticket=OPS-1234"]
    assert (inner["run"]["ticket"], inner["run"]["is_participant"]) == ("OPS-1234", True)
    assert (inner["chain"]["depth"], inner["chain"]["asserted_beyond_owner"]) == (4, 1)
    assert inner["approval"]["approvers"] == ["bob@example.test"]
    assert inner["approval"]["approver_count"] == 1
    assert (inner["ttl_seconds"], inner["task_id"], inner["tool"]) == (300, "task-1", "psql")


def test_the_shipped_targets_meet_the_shipped_policies(engine: CedarPolicyEngine) -> None:
    """The dev stack's demo targets are allowed to the demo agent (legacy-crm for at most 5
    minutes); prod-db needs approval."""
    catalog = load_target_catalog(Path("config/targets.toml"))
    run = make_run(labels=TICKET)
    outcomes = {
        name: engine.decide(make_request(target=target, run=run)).outcome
        for name, target in catalog.items()
    }
    assert outcomes == {
        "demo-db": ALLOW,
        "demo-cert": ALLOW,
        "demo-ssh": ALLOW,
        "demo-kv": ALLOW,
        "legacy-crm": ALLOW,
        "prod-db": NEEDS,
    }
    legacy = engine.decide(make_request(target=catalog["legacy-crm"], run=run))
    assert (legacy.max_ttl, "legacy-short-ttl" in legacy.policy_ids) == (timedelta(minutes=5), True)


@pytest.mark.parametrize("sensitivity", list(Sensitivity))
@pytest.mark.parametrize("kind", list(TargetKind))
def test_every_python_kind_and_sensitivity_fits_the_schema(
    engine: CedarPolicyEngine, kind: TargetKind, sensitivity: Sensitivity
) -> None:
    """A value the schema does not know would deny everything for that target (fail closed)."""
    decision = engine.decide(
        make_request(
            target=make_target(kind=kind, sensitivity=sensitivity),
            approval=approval("bob@example.test"),
        )
    )
    assert decision.outcome == ALLOW, decision.reasons


@pytest.mark.parametrize("role", list(Role))
def test_every_python_role_fits_the_schema(engine: CedarPolicyEngine, role: Role) -> None:
    decision = engine.decide(make_request(principal_roles=frozenset({role.value})))
    expected = ("agent-request",) if role is Role.AGENT else ("agent-role-required",)
    assert expected == decision.policy_ids, decision.reasons


# --------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"action": "delete_everything"}, "does not exist in the supplied schema"),
        ({"principal_roles": frozenset({"superuser"})}, "superuser"),
        ({"now": datetime(2030, 1, 2, 12)}, "timezone-aware"),  # noqa: DTZ001 - the defect
    ],
    ids=["undeclared action", "role outside the schema", "naive time"],
)
def test_a_request_that_does_not_fit_is_denied(
    engine: CedarPolicyEngine, changes: dict[str, object], reason: str
) -> None:
    decision = engine.decide(make_request(**changes))
    assert (decision.outcome, decision.policy_ids) == (DENY, ())
    assert reason in decision.reasons[0]


def test_a_policy_that_fails_to_evaluate_denies_even_when_a_permit_applies() -> None:
    """Cedar skips an erroring policy; that must not turn the skipped forbid into an allow."""
    engine = CedarPolicyEngine(
        policies={
            "p.cedar": '@id("all") permit (principal, action, resource);\n'
            '@id("overflow") forbid (principal, action, resource)\n'
            "when { context.ttl_seconds * 9223372036854775807 > 0 };"
        },
        schema=SCHEMA,
    )
    decision = engine.decide(make_request())
    assert (decision.outcome, decision.policy_ids) == (DENY, ("overflow",))
    assert "`overflow`" in decision.reasons[0]


def _engine_answering(
    monkeypatch: pytest.MonkeyPatch, answer: Callable[..., cedarpy.AuthzResult]
) -> Decision:
    engine = load_policy_engine(POLICY_DIR)
    monkeypatch.setattr(cedarpy, "is_authorized", answer)
    return engine.decide(make_request())


def test_an_engine_exception_is_a_deny(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> cedarpy.AuthzResult:
        raise RuntimeError("engine exploded")

    decision = _engine_answering(monkeypatch, boom)
    assert (decision.outcome, decision.policy_ids) == (DENY, ())
    assert "engine exploded" in decision.reasons[0]
    assert decision.context["resource"]["id"] == "demo-db"


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ({"decision": "NoDecision", "diagnostics": {}}, "neither allow nor deny"),
        ({"decision": "Maybe", "diagnostics": {}}, "engine failed"),
        ({"decision": "Allow", "diagnostics": {"reason": ["policy99"]}}, "not given"),
        ({"decision": "Allow", "diagnostics": {"reason": []}}, "not credible"),
        ({"decision": "Allow", "diagnostics": {"reason": ["policy1"]}}, "not credible"),
        ({"decision": "Deny", "diagnostics": {"reason": []}}, "no policy permits"),
        ({"decision": "Deny", "diagnostics": {"reason": ["policy0"]}}, "not credible"),
    ],
    ids=[
        "no decision",
        "unknown decision",
        "unknown policy",
        "allow with no policy",
        "allow by a forbid",
        "deny by no policy",
        "deny by a permit",
    ],
)
def test_an_unexpected_engine_answer_is_a_deny(
    monkeypatch: pytest.MonkeyPatch, response: dict[str, object], reason: str
) -> None:
    decision = _engine_answering(monkeypatch, lambda *a, **k: cedarpy.AuthzResult(response))
    assert decision.outcome == DENY
    assert reason in decision.reasons[0]


# --------------------------------------------------------------------------- start-up

GOOD = (
    '@id("ok") @reason("fine") @max_ttl("60")\n'
    "permit (principal, action, resource);\n"
    '@id("gate") @approval("required")\n'
    "forbid (principal, action, resource)\n"
    'when { resource.sensitivity == Sensitivity::"restricted" }\n'
    "unless { context.approval.approved };\n"
)


def test_a_minimal_policy_set_reads_its_annotations() -> None:
    engine = CedarPolicyEngine(policies={"a.cedar": GOOD}, schema=SCHEMA)
    summary = [(p.id, p.effect, p.approval_gate, p.max_ttl) for p in engine.policies]
    assert summary == [
        ("ok", "permit", False, timedelta(seconds=60)),
        ("gate", "forbid", True, None),
    ]


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ({}, "policy set is empty"),
        ({"a.cedar": "// everything commented out\n"}, r"a\.cedar: contains no policy"),
        ({"a.cedar": GOOD.replace(";", "", 1)}, r"a\.cedar: cannot be parsed"),
        (
            {"a.cedar": GOOD.replace("context.approval.approved", "context.approval.ok")},
            r"a\.cedar: does not match the schema: \[gate\] for policy `gate`.*`approval\.ok`",
        ),
        (
            {"a.cedar": GOOD.replace('"restricted"', '"restriced"')},
            r"a\.cedar: does not match the schema: \[gate\].*restriced",
        ),
        (
            {"a.cedar": GOOD.replace("Sensitivity::", "Sensitivty::")},
            r"a\.cedar: does not match the schema",
        ),
        ({"a.cedar": GOOD.replace('@id("ok") ', "")}, r"a\.cedar: every policy needs @id"),
        ({"a.cedar": GOOD.replace('@id("ok")', '@id("no spaces")')}, "every policy needs @id"),
        ({"a.cedar": GOOD, "b.cedar": GOOD}, r"'ok' is used twice: in a\.cedar and b\.cedar"),
        ({"a.cedar": GOOD.replace("@max_ttl", "@max_tll")}, r"'ok': unknown annotation.*max_tll"),
        (
            {"a.cedar": GOOD.replace('@reason("fine")', '@approval("required")')},
            r"'ok': @approval must be .* on a permit policy",
        ),
        (
            {"a.cedar": GOOD.replace('@approval("required")', '@approval("maybe")')},
            r"'gate': @approval must be",
        ),
        (
            {"a.cedar": GOOD.replace('@approval("required")', '@max_ttl("60")')},
            r"'gate': @max_ttl only applies to permit",
        ),
        ({"a.cedar": GOOD.replace('"60"', '"0"')}, r"'ok': @max_ttl must be whole seconds"),
        ({"a.cedar": GOOD.replace('"60"', '"5m"')}, r"'ok': @max_ttl must be whole seconds"),
        ({"a.cedar": GOOD.replace('"60"', '"86401"')}, r"'ok': @max_ttl must be whole seconds"),
        (
            {"a.cedar": GOOD.replace("permit (principal,", "permit (principal == ?principal,")},
            r"a\.cedar: templates .* are not supported: \['ok'\]",
        ),
    ],
    ids=[
        "no sources",
        "a file without policies",
        "parse error",
        "unknown attribute",
        "enum typo",
        "unknown entity type",
        "missing @id",
        "malformed @id",
        "duplicate @id across files",
        "unknown annotation",
        "approval gate on a permit",
        "approval value",
        "cap on a forbid",
        "zero cap",
        "cap with a unit",
        "cap over a day",
        "template",
    ],
)
def test_a_bad_policy_set_stops_start_up(policies: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CedarPolicyEngine(policies=policies, schema=SCHEMA)


def test_a_bad_schema_stops_start_up() -> None:
    with pytest.raises(ConfigurationError, match=r"policy schema s\.cedarschema: cannot be parsed"):
        CedarPolicyEngine(
            policies={"a.cedar": GOOD}, schema="entity Agent = {", schema_source="s.cedarschema"
        )


def test_policies_written_for_another_schema_stop_start_up() -> None:
    other_schema = SCHEMA.replace("approved: Bool,", "granted: Bool,")
    with pytest.raises(ConfigurationError, match=r"\[gate\].*approved"):
        CedarPolicyEngine(policies={"a.cedar": GOOD}, schema=other_schema)


def test_load_names_a_missing_schema(tmp_path: Path) -> None:
    (tmp_path / "a.cedar").write_text(GOOD)
    with pytest.raises(ConfigurationError, match=r"cannot be read: FileNotFoundError.*schema"):
        load_policy_engine(tmp_path)


def test_load_refuses_a_directory_without_policies(tmp_path: Path) -> None:
    (tmp_path / SCHEMA_FILE).write_text(SCHEMA)
    with pytest.raises(ConfigurationError, match="policy set is empty"):
        load_policy_engine(tmp_path)


def test_load_names_the_file_of_a_bad_policy(tmp_path: Path) -> None:
    (tmp_path / SCHEMA_FILE).write_text(SCHEMA)
    (tmp_path / "a.cedar").write_text(GOOD)
    (tmp_path / "b.cedar").write_text('@id("b") permit (principal, action, resource) when { x };')
    bad = re.escape(str(tmp_path / "b.cedar"))
    with pytest.raises(ConfigurationError, match=rf"{bad}: cannot be parsed"):
        load_policy_engine(tmp_path)


def test_the_shipped_policy_ids() -> None:
    """Decisions, audit and runbooks refer to these ids: renaming one is a visible change."""
    assert [p.id for p in load_policy_engine(POLICY_DIR).policies] == [
        "agent-request",
        "agent-role-required",
        "run-participants-only",
        "confidential-working-hours-only",
        "asserted-chain-not-for-confidential",
        "production-needs-ticket",
        "production-off-hours-needs-approval",
        "restricted-needs-approval",
        "legacy-short-ttl",
        "asserted-chain-short-ttl",
    ]


# --------------------------------------------------------------------------- working hours


def _hours_engine(hours: WorkingHours) -> CedarPolicyEngine:
    return load_policy_engine(POLICY_DIR, hours=hours)


@pytest.mark.parametrize(
    ("hours", "now", "outcome"),
    [
        (WorkingHours(start_hour_utc=8, end_hour_utc=17), at(7, 59), DENY),
        (WorkingHours(start_hour_utc=8, end_hour_utc=17), at(8), ALLOW),
        (WorkingHours(start_hour_utc=8, end_hour_utc=17), at(16, 59), ALLOW),
        (WorkingHours(start_hour_utc=8, end_hour_utc=17), at(17), DENY),
        (WorkingHours(start_hour_utc=22, end_hour_utc=6), at(23), ALLOW),
        (WorkingHours(start_hour_utc=22, end_hour_utc=6), at(5, 59), ALLOW),
        (WorkingHours(start_hour_utc=22, end_hour_utc=6), at(12), DENY),
        (WorkingHours(start_hour_utc=0, end_hour_utc=24), at(3), ALLOW),
        # 2030-01-02 is a Wednesday (3); 2030-01-05 a Saturday (6).
        (WorkingHours(days=frozenset({1, 2, 3, 4, 5})), at(12), ALLOW),
        (
            WorkingHours(days=frozenset({1, 2, 3, 4, 5})),
            datetime(2030, 1, 5, 12, tzinfo=UTC),
            DENY,
        ),
    ],
    ids=[
        "before 08",
        "at 08",
        "at 16:59",
        "at 17",
        "night shift 23",
        "night shift 05:59",
        "night shift noon",
        "whole day",
        "weekday",
        "saturday",
    ],
)
def test_confidential_follows_the_configured_working_hours(
    hours: WorkingHours, now: datetime, outcome: DecisionOutcome
) -> None:
    """The hours come from the broker's settings, not from the policy text."""
    engine = _hours_engine(hours)
    decision = engine.decide(
        make_request(target=make_target(sensitivity=Sensitivity.CONFIDENTIAL), now=now)
    )
    assert outcome == decision.outcome, decision.reasons
    working = decision.context["context"]["working_hours"]
    assert (working["start_hour_utc"], working["end_hour_utc"]) == (
        hours.start_hour_utc,
        hours.end_hour_utc,
    )


def test_production_off_hours_follows_the_configured_working_hours() -> None:
    engine = _hours_engine(WorkingHours(start_hour_utc=9, end_hour_utc=17))
    request = make_request(target=make_target(**PROD), run=make_run(labels=TICKET), now=at(8))
    decision = engine.decide(request)
    assert (
        decision.outcome,
        decision.policy_ids,
    ) == (NEEDS, ("production-off-hours-needs-approval",))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"start_hour_utc": 24}, "start_hour_utc must be 0..23"),
        ({"start_hour_utc": -1}, "start_hour_utc must be 0..23"),
        ({"end_hour_utc": 0}, "end_hour_utc must be 1..24"),
        ({"end_hour_utc": 25}, "end_hour_utc must be 1..24"),
        ({"start_hour_utc": 8, "end_hour_utc": 8}, "an empty window"),
        ({"days": frozenset()}, "days must be ISO weekdays"),
        ({"days": frozenset({0, 1})}, "days must be ISO weekdays"),
    ],
)
def test_a_bad_working_window_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkingHours(**changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parsed entities


def _production(**run_changes: object) -> PolicyRequest:
    return make_request(
        target=make_target(name="prod-db", environment="production"), run=make_run(**run_changes)
    )


def test_a_cached_entity_set_never_answers_for_a_changed_run() -> None:
    # The run, chain, caller and target are parsed once and reused; the same run id with a
    # different attribute (here its ticket label) is a different entity set, decided afresh.
    engine = load_policy_engine(POLICY_DIR)
    without = _production()
    with_ticket = _production(labels=TICKET)
    assert engine.decide(without).policy_ids == ("production-needs-ticket",)
    assert engine.decide(with_ticket).allowed
    assert engine.decide(without).policy_ids == ("production-needs-ticket",)


def test_the_parsed_entity_sets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.core.policy.ENTITY_CACHE_SIZE", 3)
    engine = load_policy_engine(POLICY_DIR)
    for index in range(10):
        assert engine.decide(make_request(task_id="t", run=make_run(id=f"wf-{index}"))).allowed
    assert len(engine._entity_cache) == 3  # the bound is the point
    # The oldest went first; a decision over an evicted set is simply parsed again.
    assert engine.decide(make_request(run=make_run(id="wf-0"))).allowed


def test_the_run_and_chain_reach_policies_as_before_and_the_audit_sees_records() -> None:
    engine = load_policy_engine(POLICY_DIR)
    decision = engine.decide(make_request())
    context = decision.context["context"]
    assert context["run"]["owner"] == "alice@example.test"
    assert context["chain"]["depth"] == 3
    assert [hop["role"] for hop in context["chain"]["hops"]] == ["owner", "orchestrator", "agent"]
