"""``GET /v1/workflows``: what the query accepts (one defect per row refused as 400
``query.invalid``), the cursor it hands out and takes back, and who sees which runs (an admin
every run, an orchestrator its own)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from multidict import MultiDict

from broker.core.model import RunState
from broker.core.ports import RunCursor, RunQuery
from broker.core.roles import Role
from broker.errors import BadRequestError, ForbiddenError
from broker.http.query_routes import _run_query, run_cursor_text
from broker.service import CredentialBroker
from tests.unit.test_service_issuance import (
    NOW,
    ORCH,
    ORCH_CALLER,
    broker,
    workload,
)

OTHER_ORCH = "spiffe://tasklease.test/orchestrator/other"
ADMIN_CALLER = workload("spiffe://tasklease.test/admin/demo", Role.ADMIN)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([("owner_id", "alice")], r"unknown query parameters \['owner_id'\]"),
        ([("state", "running")], r"state or limit is not a known value"),
        ([("state", "active,")], r"state or limit is not a known value"),
        ([("limit", "ten")], r"state or limit is not a known value"),
        ([("limit", "0")], r"limit must be 1-500"),
        ([("limit", "501")], r"limit must be 1-500"),
        ([("limit", "12345")], r"limit must be 1-4 characters"),
        ([("cursor", "wf-1")], r"cursor is not a next_cursor"),
        ([("cursor", "12.")], r"cursor is not a next_cursor"),
        ([("cursor", "x.wf-1")], r"cursor is not a next_cursor"),
        ([("cursor", "1.wf 1")], r"cursor is not a next_cursor"),
        ([("owner", "a"), ("owner", "b")], r"owner given more than once"),
        ([("owner", "")], r"owner must be 1-256 characters"),
        ([("started_by", "s" * 2049)], r"started_by must be 1-2048 characters"),
        ([("label", "ticket")], r"label must be key=value"),
        ([("label", "ticket=" + "v" * 257)], r"label must be key=value"),
    ],
)
def test_a_bad_query_is_a_400(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as caught:
        _run_query(MultiDict(params))
    assert caught.value.reason == "query.invalid"


def test_a_label_key_is_an_identifier() -> None:
    with pytest.raises(BadRequestError, match="label key must be") as caught:
        _run_query(MultiDict([("label", "bad key=v")]))
    assert caught.value.reason == "invalid.label_key"


def test_a_query_names_its_filters_and_takes_back_its_cursor() -> None:
    cursor = RunCursor(1_893_456_000_000_000, "wf-42.b:c")
    parsed = _run_query(
        MultiDict(
            [
                ("owner", "alice@example.com"),
                ("started_by", ORCH),
                ("state", "active,completed"),
                ("label", "ticket=OPS-1=a"),
                ("label", "team="),
                ("limit", "25"),
                ("cursor", run_cursor_text(cursor)),
            ]
        )
    )
    assert parsed == RunQuery(
        owner="alice@example.com",
        started_by=ORCH,
        states=frozenset({RunState.ACTIVE, RunState.COMPLETED}),
        labels=(("ticket", "OPS-1=a"), ("team", "")),
        limit=25,
        after=cursor,
    )
    assert _run_query(MultiDict()) == RunQuery()


async def _three_runs() -> CredentialBroker:
    service = broker()
    for run_id, orchestrator in (("wf-a", ORCH), ("wf-b", OTHER_ORCH), ("wf-c", ORCH)):
        await service.start_workflow(
            workload(orchestrator, Role.ORCHESTRATOR),
            workflow_id=run_id,
            owner="alice",
            purpose="tests",
            deadline=NOW + timedelta(minutes=30),
            labels={},
            participants=(),
        )
    return service


async def test_an_admin_sees_every_run_and_an_orchestrator_its_own() -> None:
    service = await _three_runs()
    everything = await service.list_workflows(ADMIN_CALLER, RunQuery())
    assert sorted(run.id for run in everything.runs) == ["wf-a", "wf-b", "wf-c"]
    own = await service.list_workflows(ORCH_CALLER, RunQuery())
    assert sorted(run.id for run in own.runs) == ["wf-a", "wf-c"]
    named = await service.list_workflows(ORCH_CALLER, RunQuery(started_by=ORCH))
    assert sorted(run.id for run in named.runs) == ["wf-a", "wf-c"]


async def test_an_orchestrator_naming_another_is_refused() -> None:
    service = await _three_runs()
    with pytest.raises(ForbiddenError) as caught:
        await service.list_workflows(ORCH_CALLER, RunQuery(started_by=OTHER_ORCH))
    assert caught.value.reason == "auth.not_your_runs"


async def test_an_agent_lists_no_runs() -> None:
    service = await _three_runs()
    agent = workload("spiffe://tasklease.test/agent/demo", Role.AGENT)
    with pytest.raises(ForbiddenError) as caught:
        await service.list_workflows(agent, RunQuery())
    assert caught.value.reason == "auth.role_required"
