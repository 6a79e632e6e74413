"""Run retention in a running broker on the stack: a run over for longer than
``ledger.retention_days`` leaves the broker's Redis with its leases, after a
``workflow.purged`` audit event readable through ``GET /v1/audit``; a live run stays.

The old run is written straight into the broker's ledger (namespace ``tl``) with times days in
the past, as a broker would have left it then: its lease first (a write-ahead refuses a run
that is over), then the run."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import (
    DelegationHop,
    Lease,
    LeaseState,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)
from broker.devstack import DevStack
from tests.integration.clients import DEMO_ORCHESTRATOR, StartBroker, call, client_context
from tests.integration.clients import workload_id as _workload_id
from tests.integration.test_metrics import scrape, value

pytestmark = pytest.mark.stack

DAY = timedelta(days=1)
OWNER = "alice@example.com"


def _run(run_id: str, created_at: datetime, deadline: datetime) -> WorkflowRun:
    return WorkflowRun(
        id=run_id,
        owner=OWNER,
        purpose="retention test",
        started_by=DEMO_ORCHESTRATOR,
        created_at=created_at,
        deadline=deadline,
    )


async def test_a_broker_purges_a_run_over_for_longer_than_its_retention(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    assert stack.endpoints is not None
    wall = datetime.now(UTC)
    agent = _workload_id(stack, "agent")
    old_id, live_id = (f"wf-retention-{secrets.token_hex(4)}" for _ in range(2))
    ledger = RedisLedger(settings=RedisSettings(url=stack.endpoints.redis_url))  # the broker's
    try:
        lease = Lease(
            credential_id=f"cred_{secrets.token_hex(12)}",
            workflow_id=old_id,
            task_id="export",
            target="demo-kv",
            kind=TargetKind.VAULT_TOKEN,
            sensitivity=Sensitivity.INTERNAL,
            holder=agent,
            owner=OWNER,
            # As the service builds it: the run's chain, extended by the agent.
            chain=_run(old_id, wall - 4 * DAY, wall - 3 * DAY).chain.extended(
                DelegationHop("agent", agent, verified=True)
            ),
            issued_at=wall - 4 * DAY,
            expires_at=wall - 4 * DAY + timedelta(minutes=15),
        )
        await ledger.write_ahead(lease)
        await ledger.save_lease(
            dataclasses.replace(
                lease,
                state=LeaseState.REVOKED,
                revoked_at=wall - 4 * DAY + timedelta(minutes=15),
                revoke_reason="ttl",
            )
        )
        assert await ledger.create_run(_run(old_id, wall - 4 * DAY, wall - 3 * DAY))
        assert await ledger.create_run(_run(live_id, wall, wall + timedelta(hours=1)))

        broker = await start(
            TASKLEASE_LEDGER__RETENTION_DAYS="1",
            TASKLEASE_LEDGER__PURGE_INTERVAL_SECONDS="0.5",
        )
        # A pass at start, then every 0.5 s; up to a minute more if a broker killed during a
        # pass (another test's) left the retention lock behind.
        deadline = time.monotonic() + 90
        while await ledger.get_run(old_id) is not None:
            assert time.monotonic() < deadline, "the broker did not purge the run within 90 s"
            await asyncio.sleep(0.2)

        assert await ledger.get_lease(lease.credential_id) is None
        assert await ledger.get_run(live_id) is not None
        admin = client_context(stack, tmp_path, _workload_id(stack, "admin"))
        status, audit = await call(
            broker, admin, "GET", f"/v1/audit?workflow_id={old_id}&type=workflow.purged"
        )
        assert status == 200, audit
        [event] = audit["events"]
        assert event["actor"].startswith(f"spiffe://{stack.trust_domain}/")
        assert event["payload"]["leases"] == 1
        assert event["payload"]["lease_states"] == {"revoked": 1}
        assert event["payload"]["retention_days"] == 1
        assert datetime.fromisoformat(event["payload"]["over_at"]) == wall - 3 * DAY
        _, samples = await scrape(broker, admin)
        assert value(samples, "tasklease_ledger_purged_total", record="run") >= 1
        assert value(samples, "tasklease_ledger_purged_total", record="lease") >= 1

        # The purged run's id is retired while the audit stream keeps the run's copy
        # (audit.redis.index_ttl_days, 90 by default): no new run under it, nothing stored.
        orchestrator = client_context(stack, tmp_path, _workload_id(stack, "orchestrator"))
        status, refused = await call(
            broker,
            orchestrator,
            "POST",
            "/v1/workflows",
            json_body={"id": old_id, "owner": OWNER, "purpose": "again", "ttl_seconds": 600},
        )
        assert (status, refused["code"], refused["reason"]) == (
            409,
            "conflict",
            "workflow.id_retired",
        ), refused
        until = re.search(r"until (\S+): choose another id", refused["detail"])
        assert until is not None, refused["detail"]
        retired_until = datetime.fromisoformat(until.group(1))
        assert wall + 90 * DAY - timedelta(minutes=5) < retired_until
        assert retired_until <= datetime.now(UTC) + 90 * DAY
        assert await ledger.get_run(old_id) is None
    finally:
        await ledger.close()
