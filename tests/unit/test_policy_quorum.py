"""The @quorum annotation on approval gates: how many distinct approvers an approval needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.config_files import read_policy_dir
from broker.core.model import (
    DecisionOutcome,
    DelegationChain,
    DelegationHop,
    Sensitivity,
    Target,
    TargetKind,
    WorkflowRun,
)
from broker.core.policy import CedarPolicyEngine
from broker.core.ports import PolicyRequest
from broker.errors import ConfigurationError

SCHEMA = read_policy_dir(Path("config/policies")).schema
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"

BASE = """
@id("ok") permit (principal, action, resource);
"""


def gate(policy_id: str, quorum: str | None, when: str = "true") -> str:
    annotation = f'@quorum("{quorum}")\n' if quorum is not None else ""
    return (
        f'@id("{policy_id}") @approval("required")\n{annotation}'
        f"forbid (principal, action, resource) when {{ {when} }}\n"
        "unless { context.approval.approved };\n"
    )


def decide(*sources: str) -> tuple[DecisionOutcome, int]:
    engine = CedarPolicyEngine(
        policies={f"p{i}.cedar": text for i, text in enumerate((BASE, *sources))},
        schema=SCHEMA,
    )
    run = WorkflowRun(
        id="wf-1",
        owner="alice@example.test",
        purpose="tests",
        started_by="spiffe://tasklease.test/orchestrator/demo",
        created_at=NOW,
        deadline=NOW + timedelta(hours=1),
    )
    decision = engine.decide(
        PolicyRequest(
            principal=AGENT,
            principal_roles=frozenset({"agent"}),
            trust_domain="tasklease.test",
            action="request_credential",
            target=Target(
                name="prod-db",
                kind=TargetKind.VAULT_TOKEN,
                policies=("p",),
                system="s",
                environment="production",
                sensitivity=Sensitivity.RESTRICTED,
                max_ttl=timedelta(minutes=5),
            ),
            run=run,
            chain=DelegationChain((DelegationHop("agent", AGENT, verified=True),)),
            task_id="t-1",
            tool="",
            justification="",
            ttl=timedelta(minutes=5),
            now=NOW,
        )
    )
    return decision.outcome, decision.approval_quorum


def test_a_gate_without_quorum_asks_for_one_approver() -> None:
    assert decide(gate("g", None)) == (DecisionOutcome.NEEDS_APPROVAL, 1)


def test_the_largest_quorum_of_the_gates_that_fired_wins() -> None:
    assert decide(gate("a", "2"), gate("b", "3"), gate("c", "9", when="false")) == (
        DecisionOutcome.NEEDS_APPROVAL,
        3,
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (gate("g", "0"), r"'g': @quorum\(\"<1-10>\"\)"),
        (gate("g", "11"), r"'g': @quorum"),
        (gate("g", "two"), r"'g': @quorum"),
        ('@id("f") @quorum("2") forbid (principal, action, resource);', r"'f': @quorum"),
        ('@id("p") @quorum("2") permit (principal, action, resource);', r"'p': @quorum"),
    ],
    ids=["zero", "eleven", "words", "not-a-gate", "permit"],
)
def test_a_bad_quorum_stops_start_up(source: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CedarPolicyEngine(policies={"a.cedar": BASE, "b.cedar": source}, schema=SCHEMA)
