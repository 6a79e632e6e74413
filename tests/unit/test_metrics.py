"""Metrics pieces with fakes: the counting policy engine, outcome labels, scrape-time sources
(and their failure), the issuance middleware, and the collectors that read in-memory state."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.metrics_sources import (
    SweeperCollector,
    WebhookCollector,
    watch_revocation_backlog,
)
from broker.adapters.scheduler import RevocationSweeper
from broker.adapters.webhook_notifier import DeliveryStats
from broker.core.model import (
    Decision,
    DecisionOutcome,
    DelegationChain,
    DelegationHop,
    Lease,
    Sensitivity,
    Target,
    TargetKind,
)
from broker.core.ports import PolicyRequest
from broker.errors import (
    ConflictError,
    LedgerUnavailableError,
    PolicyDeniedError,
    TaskleaseError,
)
from broker.http.metrics_routes import register_metrics_routes
from broker.http.problems import problem_middleware
from broker.http.wire import PARSED_BODY_KEY, CredentialRequestBody, parse_body
from broker.metrics import BrokerMetrics, CountingPolicyEngine, error_outcome

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class FixedClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


class ScriptedPolicy:
    """Answers each decide() with the next scripted outcome, or raises it."""

    def __init__(self, *answers: DecisionOutcome | Exception) -> None:
        self.answers = list(answers)

    def decide(self, request: PolicyRequest) -> Decision:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Decision(outcome=answer, policy_ids=("p",))


def sample(metrics: BrokerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_counting_policy_engine_counts_every_decision_by_outcome() -> None:
    metrics = BrokerMetrics()
    engine = CountingPolicyEngine(
        ScriptedPolicy(
            DecisionOutcome.ALLOW,
            DecisionOutcome.DENY,
            DecisionOutcome.DENY,
            DecisionOutcome.NEEDS_APPROVAL,
            RuntimeError("engine broke"),
        ),
        metrics=metrics,
    )
    request: Any = object()  # the fake policy never looks at it
    outcomes = [engine.decide(request).outcome for _ in range(4)]
    with pytest.raises(RuntimeError):
        engine.decide(request)
    assert outcomes[0] is DecisionOutcome.ALLOW
    counted = {
        outcome: sample(metrics, "tasklease_policy_decisions_total", outcome=outcome)
        for outcome in ("allow", "deny", "needs_approval", "error")
    }
    assert counted == {"allow": 1, "deny": 2, "needs_approval": 1, "error": 1}


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (PolicyDeniedError("no", policy_ids=()), "policy.deny"),
        (ConflictError("x", reason="workflow.not_active"), "workflow.not_active"),
        (LedgerUnavailableError("x", reason="ledger.unreachable"), "ledger.unreachable"),
        # A reason that is not a code shape falls back to the class code.
        (TaskleaseError("x", reason="Not A Code!"), "internal_error"),
        (web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2), "http_413"),
        (KeyError("boom"), "error"),
    ],
)
def test_error_outcomes_are_stable_codes_never_free_text(error: Exception, label: str) -> None:
    assert error_outcome(error) == label


async def test_a_source_feeds_its_gauge_at_every_scrape_and_reads_nan_when_it_fails() -> None:
    metrics = BrokerMetrics(source_timeout=0.05)
    pending = [3]

    async def count() -> int:
        if not pending:
            raise LedgerUnavailableError("down", reason="ledger.unreachable")
        return pending[0]

    assert sample(metrics, "tasklease_approvals_pending") == 0  # before the hook is set
    metrics.watch_pending_approvals(count)
    text = (await metrics.exposition()).decode()
    assert "tasklease_approvals_pending 3.0" in text
    pending.clear()
    await metrics.refresh()
    assert math.isnan(sample(metrics, "tasklease_approvals_pending") or 0.0)
    assert sample(metrics, "tasklease_metrics_source_errors_total", source="approvals") == 1

    async def hangs() -> int:
        await asyncio.sleep(10)
        return 1

    metrics.watch_pending_approvals(hangs)
    await metrics.refresh()  # returns after the budget, not after 10 s
    assert sample(metrics, "tasklease_metrics_source_errors_total", source="approvals") == 2


async def test_the_backlog_gauges_come_from_the_due_index() -> None:
    ledger, clock, metrics = InMemoryLedger(), FixedClock(), BrokerMetrics()
    watch_revocation_backlog(metrics, ledger, clock)
    chain = DelegationChain((DelegationHop("owner", "alice", verified=False),))
    for i, expires in enumerate([NOW - timedelta(seconds=30), NOW - timedelta(seconds=5)] * 2):
        await ledger.write_ahead(
            Lease(
                credential_id=f"c-{i}",
                workflow_id="wf-1",
                task_id=f"t-{i}",
                target="demo-kv",
                kind=TargetKind.VAULT_TOKEN,
                sensitivity=Sensitivity.PUBLIC,
                holder="spiffe://tasklease.test/agent/demo",
                owner="alice",
                chain=chain,
                issued_at=NOW - timedelta(minutes=1),
                expires_at=expires,
            )
        )
    await ledger.schedule("c-3", NOW + timedelta(minutes=5))  # not due yet
    await ledger.claim_due(NOW - timedelta(seconds=20), limit=1, visibility=timedelta(seconds=10))
    await metrics.refresh()
    backlog = {
        state: sample(metrics, "tasklease_revocation_backlog", state=state)
        for state in ("due", "claimed", "claim_expired")
    }
    # c-0 claimed at now-20 s until now-10 s: a dead claimer's; c-1, c-2 due; c-3 later.
    assert backlog == {"due": 2, "claimed": 1, "claim_expired": 1}
    assert sample(metrics, "tasklease_revocation_backlog_oldest_seconds") == 30.0


def test_the_webhook_collector_reads_every_delivery_count_at_scrape_time() -> None:
    metrics = BrokerMetrics()
    stats = DeliveryStats()
    metrics.registry.register(WebhookCollector(lambda: stats))
    stats.queued, stats.delivered, stats.dropped, stats.reclaimed = 5, 3, 1, 2
    assert {
        outcome: sample(metrics, "tasklease_webhook_deliveries_total", outcome=outcome)
        for outcome in WebhookCollector.OUTCOMES
    } == {
        "queued": 5,
        "delivered": 3,
        "failed": 0,
        "dropped": 1,
        "retries": 0,
        "unknown_url": 0,
        "handed_back": 0,
        "reclaimed": 2,
        "lost": 0,
    }
    # Every counter of DeliveryStats is exported, none is missed.
    assert set(WebhookCollector.OUTCOMES) == set(DeliveryStats.__dataclass_fields__)


async def test_the_sweeper_collector_reads_the_sweepers_counts() -> None:
    metrics = BrokerMetrics()
    calls = [0]

    async def sweep(now: datetime) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise LedgerUnavailableError("down", reason="ledger.unreachable")

    sweeper = RevocationSweeper(sweep=sweep, clock=FixedClock(), interval=timedelta(seconds=1))
    metrics.registry.register(SweeperCollector(sweeper))
    for _ in range(3):
        await sweeper._tick()
    assert sample(metrics, "tasklease_revocation_sweeps_total", result="ok") == 2
    assert sample(metrics, "tasklease_revocation_sweeps_total", result="failed") == 1


# --------------------------------------------------------------------------- issuance


TARGETS: Mapping[str, Target] = {
    "demo-db": Target(
        name="demo-db",
        kind=TargetKind.DATABASE,
        policies=("p",),
        system="demo",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=5),
        mount="database",
        role="demo-readonly",
    ),
    "legacy-crm": Target(
        name="legacy-crm",
        kind=TargetKind.VAULT_TOKEN,
        policies=("p",),
        system="crm",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=5),
        legacy=True,
    ),
}


async def _issuance_client(metrics: BrokerMetrics) -> TestClient[web.Request, web.Application]:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("task_id") == "deny":
            raise PolicyDeniedError("denied", policy_ids=("p",))
        if body.get("task_id") == "crash":
            raise RuntimeError("bug")
        return web.json_response({"secret": {"password": "never-in-metrics"}}, status=201)

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_post("/v1/credentials", handler)
    app.router.add_post("/v1/other", handler)
    register_metrics_routes(app, metrics, targets=lambda: TARGETS)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_issuance_is_timed_and_counted_by_kind_and_outcome() -> None:
    metrics = BrokerMetrics()
    client = await _issuance_client(metrics)
    try:
        for task, target in [
            ("t", "demo-db"),
            ("t", "demo-db"),
            ("deny", "demo-db"),
            ("crash", "demo-db"),
            ("t", "no-such-target"),
        ]:
            await client.post("/v1/credentials", json={"task_id": task, "target": target})
        await client.post("/v1/credentials", data=b"not json")
        await client.post("/v1/other", json={"task_id": "t", "target": "demo-db"})
        scraped = await client.get("/metrics")
        text = await scraped.text()
    finally:
        await client.close()
    assert scraped.status == 200
    assert scraped.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counted = {
        (s.labels["kind"], s.labels["outcome"]): s.value
        for s in families["tasklease_issuance"].samples
        if s.name == "tasklease_issuance_total"
    }
    assert counted == {
        ("database", "issued"): 2,
        ("database", "policy.deny"): 1,
        ("database", "error"): 1,
        ("unknown", "issued"): 1,
        ("unknown", "error"): 1,  # the handler's JSON error surfaced as an untyped error
    }
    histogram = {
        s.labels["outcome"]: s.value
        for s in families["tasklease_issuance_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["kind"] == "database"
    }
    assert histogram == {"issued": 2, "policy.deny": 1, "error": 1}
    assert "never-in-metrics" not in text


# The issuance metrics take the target's kind from the body the handler validated (no second
# JSON parse), and still from the raw body when the handler refused it.


async def test_the_kind_comes_from_the_validated_body_or_else_the_raw_one() -> None:
    metrics = BrokerMetrics()
    parsed: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        body = await parse_body(request, CredentialRequestBody)
        parsed.append(request.get(PARSED_BODY_KEY))
        return web.json_response({"target": body.target}, status=201)

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_post("/v1/credentials", handler)
    register_metrics_routes(app, metrics, targets=lambda: TARGETS)
    async with TestClient(TestServer(app)) as client:
        valid = {"workflow_id": "wf-1", "task_id": "t-1", "target": "demo-db"}
        assert (await client.post("/v1/credentials", json=valid)).status == 201
        refused = {**valid, "ttl_seconds": 0}  # invalid: 400, the target is still named
        assert (await client.post("/v1/credentials", json=refused)).status == 400
        unknown = {**valid, "target": "nope"}
        assert (await client.post("/v1/credentials", json=unknown)).status == 201
        text = await (await client.get("/metrics")).text()
    counted = {
        (s.labels["kind"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "tasklease_issuance"
        for s in family.samples
        if s.name == "tasklease_issuance_total"
    }
    assert counted == {
        ("database", "issued"): 1,
        ("database", "body.invalid"): 1,
        ("unknown", "issued"): 1,
    }
    assert [type(p) for p in parsed] == [CredentialRequestBody, CredentialRequestBody]


async def test_requests_for_legacy_targets_are_counted_by_target_and_outcome() -> None:
    """The burn-down trend: every request naming a legacy target, by outcome; other targets
    (and unknown names, which a caller chose) get no target label."""
    metrics = BrokerMetrics()
    client = await _issuance_client(metrics)
    try:
        for task, target in [
            ("t", "legacy-crm"),
            ("t", "legacy-crm"),
            ("deny", "legacy-crm"),
            ("t", "demo-db"),
            ("t", "legacy-unknown"),
        ]:
            await client.post("/v1/credentials", json={"task_id": task, "target": target})
        text = await (await client.get("/metrics")).text()
    finally:
        await client.close()
    counted = {
        (s.labels["target"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "tasklease_legacy_requests"
        for s in family.samples
        if s.name == "tasklease_legacy_requests_total"
    }
    assert counted == {("legacy-crm", "issued"): 2, ("legacy-crm", "policy.deny"): 1}
