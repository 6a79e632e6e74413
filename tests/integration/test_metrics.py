"""``GET /metrics`` on a broker built by bootstrap against the real stack: values move as they
should after an issuance, a policy denial and a revocation, the scrape-time gauges read the
real trust store, OpenBao session, sweeper and Redis due index, and nothing identifying or
secret appears in the exposition."""

from __future__ import annotations

import math
import ssl
import uuid
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.bootstrap import RunningBroker
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import StartBroker, call, client_context, start_run, workload_id

pytestmark = pytest.mark.stack

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(broker: RunningBroker, context: ssl.SSLContext) -> tuple[str, Samples]:
    """The exposition text and every sample, fetched without a client certificate."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/metrics", ssl=context) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_move_with_issuance_denial_and_revocation(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start()
    anonymous = client_context(stack, tmp_path)
    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
    stranger = client_context(stack, tmp_path, f"spiffe://{stack.trust_domain}/agent/other")
    run_id = f"wf-metrics-{uuid.uuid4().hex[:6]}"
    await start_run(
        stack, broker, orchestrator, run_id, owner="alice@example.test", purpose="metrics test"
    )
    _, before = await scrape(broker, anonymous)

    # An issuance.
    status, issued = await call(
        broker,
        agent,
        "POST",
        "/v1/credentials",
        json_body={"workflow_id": run_id, "task_id": "t-1", "target": "demo-kv"},
    )
    assert status == 201, issued
    remember_secret(issued["secret"]["token"])
    # A denial: an agent that does not take part in the run.
    status, denied = await call(
        broker,
        stranger,
        "POST",
        "/v1/credentials",
        json_body={"workflow_id": run_id, "task_id": "t-2", "target": "demo-db"},
    )
    assert (status, denied["reason"]) == (403, "policy.deny")
    _, after_issue = await scrape(broker, anonymous)
    issuance = "tasklease_issuance_total"
    assert moved(before, after_issue, issuance, kind="vault-token", outcome="issued") == 1
    assert moved(before, after_issue, issuance, kind="database", outcome="policy.deny") == 1
    latency = "tasklease_issuance_duration_seconds_count"
    assert moved(before, after_issue, latency, kind="vault-token", outcome="issued") == 1
    assert moved(before, after_issue, latency, kind="database", outcome="policy.deny") == 1
    decisions = "tasklease_policy_decisions_total"
    assert moved(before, after_issue, decisions, outcome="allow") == 1
    assert moved(before, after_issue, decisions, outcome="deny") == 1

    # A revocation (early release by the holder).
    status, report = await call(
        broker, agent, "DELETE", f"/v1/credentials/{issued['credential_id']}"
    )
    assert (status, report["complete"]) == (200, True)
    text, after_revoke = await scrape(broker, anonymous)
    settled = "tasklease_revocations_total"
    assert moved(after_issue, after_revoke, settled, kind="vault-token", outcome="revoked") == 1
    revoke_latency = "tasklease_revoke_duration_seconds_count"
    assert (
        moved(after_issue, after_revoke, revoke_latency, kind="vault-token", outcome="confirmed")
        == 1
    )

    # Scrape-time gauges from the real parts.
    assert 0 < value(after_revoke, "tasklease_vault_token_expires_in_seconds") <= 24 * 3600
    age = value(after_revoke, "tasklease_trust_bundle_age_seconds", trust_domain="tasklease.test")
    limit = value(
        after_revoke, "tasklease_trust_bundle_max_age_seconds", trust_domain="tasklease.test"
    )
    assert 0 <= age < limit
    assert value(after_revoke, "tasklease_revocation_sweeps_total", result="ok") >= 1
    for state in ("due", "claimed", "claim_expired"):
        assert after_revoke[("tasklease_revocation_backlog", frozenset({("state", state)}))] >= 0
    assert after_revoke[("tasklease_revocation_backlog_oldest_seconds", frozenset())] >= 0
    # Other tests' approvals may be pending on the shared Redis; test_approvals.py checks the
    # gauge moves with a request and its decision.
    assert value(after_revoke, "tasklease_approvals_pending") >= 0
    assert ("tasklease_metrics_source_errors_total", frozenset({("source", "ledger")})) not in (
        after_revoke
    )
    # The stack's Redis has no maxmemory of its own (0).
    assert value(after_revoke, "tasklease_redis_memory_bytes", kind="used") > 1_000_000
    assert after_revoke[("tasklease_redis_memory_bytes", frozenset({("kind", "max")}))] == 0

    # Nothing that names a caller, a credential or a secret.
    for forbidden in (
        issued["credential_id"],
        issued["token_accessor"],
        issued["secret"]["token"],
        run_id,
        "spiffe://",
        "alice@example.test",
    ):
        assert forbidden not in text


async def test_a_failing_ledger_reads_nan_and_counts_a_source_error(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """Redis down: /metrics still answers; the backlog is unknown (NaN), not stale."""
    broker = await start()
    anonymous = client_context(stack, tmp_path)
    _, before = await scrape(broker, anonymous)
    assert value(before, "tasklease_revocation_backlog", state="due") >= 0
    stack.processes["redis"].stop()
    try:
        _, during = await scrape(broker, anonymous)
    finally:
        stack.restart_redis()
    backlog = value(during, "tasklease_revocation_backlog", state="due")
    assert math.isnan(backlog)
    assert math.isnan(value(during, "tasklease_redis_memory_bytes", kind="used"))
    assert value(during, "tasklease_metrics_source_errors_total", source="ledger") >= 1
    _, after = await scrape(broker, anonymous)
    assert value(after, "tasklease_revocation_backlog", state="due") >= 0
