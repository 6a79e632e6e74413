"""The reconciler finds task tokens the ledger does not know (a lost write, Redis data loss)
and revokes them; recorded and recent tokens are left alone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import hvac.exceptions
import psycopg
import pytest
import redis

from broker.adapters.clock import SystemClock
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.vault import VaultMinter
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    Sensitivity,
    Target,
    TargetKind,
)
from broker.core.ports import MintSpec
from broker.devstack import DevStack
from broker.reconciler import Reconciler
from tests.conftest import remember_secret
from tests.integration.clients import (
    StartBroker,
    broker_minter_and_ledger,
    call,
    client_context,
    start_run,
    workload_id,
)

pytestmark = pytest.mark.stack

DB = Target(
    name="demo-db",
    kind=TargetKind.DATABASE,
    policies=("target-demo-db",),
    system="demo",
    environment="dev",
    sensitivity=Sensitivity.INTERNAL,
    max_ttl=timedelta(minutes=15),
    mount="database",
    role="demo-readonly",
)
CHAIN = DelegationChain((DelegationHop("owner", "alice", verified=False),))


@pytest.fixture
async def parts(stack: DevStack) -> AsyncIterator[tuple[VaultMinter, RedisLedger]]:
    async with broker_minter_and_ledger(stack, "r") as both:
        yield both


def _spec(credential_id: str) -> MintSpec:
    return MintSpec(
        credential_id=credential_id,
        workflow_id="wf-rec",
        task_id="t-1",
        holder="spiffe://tasklease.test/agent/demo",
        owner="alice",
        chain=CHAIN,
        target=DB,
        ttl=timedelta(seconds=120),
    )


def _alive(stack: DevStack, accessor: str) -> bool:
    assert stack.endpoints is not None
    root = hvac.Client(url=stack.endpoints.openbao_addr, token=stack.endpoints.openbao_root_token)
    try:
        root.auth.token.lookup_accessor(accessor)
    except hvac.exceptions.InvalidRequest:
        return False
    return True


async def test_orphaned_tokens_are_revoked_and_recorded_ones_kept(
    stack: DevStack, parts: tuple[VaultMinter, RedisLedger]
) -> None:
    minter, ledger = parts
    # A credential the ledger never heard of (the write was lost) ...
    lost = await minter.mint(_spec(f"cred_lost_{uuid.uuid4().hex[:8]}"))
    user, password = lost.secret["username"], remember_secret(lost.secret["password"])
    # ... and one that is properly recorded.
    kept_id = f"cred_kept_{uuid.uuid4().hex[:8]}"
    kept = await minter.mint(_spec(kept_id))
    remember_secret(kept.secret["password"])
    now = datetime.now(UTC)
    await ledger.write_ahead(
        Lease(
            credential_id=kept_id,
            workflow_id="wf-rec",
            task_id="t-1",
            target="demo-db",
            kind=TargetKind.DATABASE,
            sensitivity=Sensitivity.INTERNAL,
            holder="spiffe://tasklease.test/agent/demo",
            owner="alice",
            chain=CHAIN,
            issued_at=now,
            expires_at=now + timedelta(seconds=120),
        )
    )
    await ledger.activate(
        kept_id, token_accessor=kept.token_accessor, vault_lease_ids=kept.vault_lease_ids
    )

    # With the default grace both are too young to touch: a mint may still be in flight.
    patient = Reconciler(
        inventory=minter,
        minter=minter,
        ledger=ledger,
        locks=ledger,
        clock=SystemClock(),
        grace=timedelta(minutes=2),
    )
    report = await patient.reconcile()
    assert report.ran and report.revoked == () and report.skipped_recent >= 2
    assert _alive(stack, lost.token_accessor)

    reconciler = Reconciler(
        inventory=minter,
        minter=minter,
        ledger=ledger,
        locks=ledger,
        clock=SystemClock(),
        grace=timedelta(0),
    )
    report = await reconciler.reconcile()
    assert lost.token_accessor in report.revoked
    assert kept.token_accessor not in report.revoked
    assert not _alive(stack, lost.token_accessor)
    assert _alive(stack, kept.token_accessor)
    assert stack.endpoints is not None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host="127.0.0.1",
            port=stack.endpoints.postgres_port,
            dbname="demo",
            user=user,
            password=password,
            connect_timeout=5,
        ).close()
    await minter.revoke(token_accessor=kept.token_accessor, vault_lease_ids=kept.vault_lease_ids)


async def test_only_one_replica_reconciles_at_a_time(
    stack: DevStack, parts: tuple[VaultMinter, RedisLedger]
) -> None:
    minter, ledger = parts
    assert await ledger.try_lock("reconciler", "someone-else", ttl=timedelta(seconds=30))
    try:
        report = await Reconciler(
            inventory=minter, minter=minter, ledger=ledger, locks=ledger, clock=SystemClock()
        ).reconcile()
        assert report.ran is False
    finally:
        await ledger.unlock("reconciler", "someone-else")
    report = await Reconciler(
        inventory=minter, minter=minter, ledger=ledger, locks=ledger, clock=SystemClock()
    ).reconcile()
    assert report.ran is True


async def test_after_the_ledger_is_flushed_the_reconciler_revokes_the_orphans(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """Redis data loss: credentials issued through the API lose their records; the reconciler
    finds their task tokens in OpenBao and revokes them, and their database logins end."""
    broker = await start()
    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
    run_id = f"wf-flush-{uuid.uuid4().hex[:6]}"
    await start_run(stack, broker, orchestrator, run_id, owner="alice", purpose="flush test")
    issued = []
    for task in ("t-1", "t-2"):
        status, body = await call(
            broker,
            agent,
            "POST",
            "/v1/credentials",
            json_body={
                "workflow_id": run_id,
                "task_id": task,
                "target": "demo-db",
                "ttl_seconds": 300,
            },
        )
        assert status == 201, body
        remember_secret(body["secret"]["password"])
        issued.append(body)
    assert stack.endpoints is not None
    admin = redis.Redis.from_url(stack.endpoints.redis_url)
    admin.flushdb()
    admin.close()
    runtime = broker.runtime
    report = await Reconciler(
        inventory=runtime.minter,
        minter=runtime.minter,
        ledger=runtime.ledger,
        locks=runtime.ledger,
        clock=SystemClock(),
        grace=timedelta(0),
    ).reconcile()
    for body in issued:
        assert body["token_accessor"] in report.revoked
        assert not _alive(stack, body["token_accessor"])
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                host="127.0.0.1",
                port=stack.endpoints.postgres_port,
                dbname="demo",
                user=body["secret"]["username"],
                password=body["secret"]["password"],
                connect_timeout=5,
            ).close()
