"""Policy lifecycle and continuous authorization on the real stack.

The broker watches a copy of the shipped policy directory (polling every 0.2 s): an invalid
policy file keeps the set in force and raises an alarm on /readyz (still ready); a valid one
replaces the set, and live credentials it now denies are revoked in OpenBao, so a PostgreSQL
login with such a credential fails. Each test gets its own Redis database (flushed): a policy
change re-evaluates every live lease of the ledger, and these tests must only see their own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from broker.bootstrap import RunningBroker
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import StartBroker, call, client_context, orders_as, workload_id
from tests.integration.clients import lease_alive as _lease_alive
from tests.integration.clients import token_alive as _token_alive

pytestmark = pytest.mark.stack

_REDIS_DB = 9
CLOSE_DEMO_DB = (
    "// Maintenance: nobody gets demo-db credentials, and live ones are revoked.\n"
    '@id("demo-db-maintenance")\n'
    '@reason("demo-db is closed for maintenance")\n'
    'forbid (principal, action == Action::"request_credential", resource)\n'
    'when { resource.name == "demo-db" };\n'
)
BROKEN = '@id("broken") forbid (principal, action, resource) when { context.no_such_thing };\n'


class Actors:
    def __init__(self, stack: DevStack, tmp_path: Path) -> None:
        self.stack = stack
        self.orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
        self.agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
        self.admin = client_context(stack, tmp_path, workload_id(stack, "admin"))
        self.anonymous = client_context(stack, tmp_path)

    async def start_run(self, broker: RunningBroker) -> str:
        run_id = f"wf-{secrets.token_hex(4)}"
        body = {
            "id": run_id,
            "owner": "alice@example.test",
            "purpose": "policy lifecycle tests",
            "ttl_seconds": 600,
            "participants": [workload_id(self.stack, "agent")],
        }
        status, run = await call(broker, self.orchestrator, "POST", "/v1/workflows", json_body=body)
        assert status == 201, run
        return run_id

    async def request(
        self, broker: RunningBroker, run_id: str, target: str, task: str
    ) -> tuple[int, dict[str, Any]]:
        body = {
            "workflow_id": run_id,
            "task_id": task,
            "target": target,
            "ttl_seconds": 120,
            "tool": "psql",
            "justification": "count the orders",
        }
        status, answer = await call(broker, self.agent, "POST", "/v1/credentials", json_body=body)
        if status == 201:
            for name in ("password", "token"):
                if name in answer["secret"]:
                    remember_secret(answer["secret"][name])
        return status, answer

    async def readiness(self, broker: RunningBroker) -> tuple[int, dict[str, Any]]:
        return await call(broker, self.anonymous, "GET", "/readyz")


@pytest.fixture
def actors(stack: DevStack, tmp_path: Path) -> Actors:
    return Actors(stack, tmp_path)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree("config/policies", directory, ignore=shutil.ignore_patterns("tests"))
    return directory


@pytest.fixture
async def broker(
    stack: DevStack, start: StartBroker, policy_dir: Path
) -> AsyncIterator[RunningBroker]:
    assert stack.endpoints is not None
    base, _, database = stack.endpoints.redis_url.rpartition("/")
    assert database == "0"
    url = f"{base}/{_REDIS_DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    yield await start(
        TASKLEASE_REDIS__URL=url,
        TASKLEASE_POLICY_DIR=str(policy_dir),
        TASKLEASE_POLICY__RELOAD_INTERVAL_SECONDS="0.2",
        # This module's ledger is not the other modules' (db 0): its reconciler must not take
        # their live task tokens for orphans.
        TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS="86400",
    )


def write(path: Path, text: str) -> None:
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def until(probe: Callable[[], Awaitable[bool]], *, within: float = 10.0) -> None:
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.1)


def _pg_rows(stack: DevStack, secret: dict[str, Any]) -> int:
    return orders_as(stack, secret["username"], secret["password"])


async def test_hot_reload_keeps_the_old_set_on_an_invalid_file_and_applies_a_valid_one(
    broker: RunningBroker, actors: Actors, policy_dir: Path
) -> None:
    run_id = await actors.start_run(broker)
    status, _ = await actors.request(broker, run_id, "demo-kv", "before")
    assert status == 201

    # An invalid file: the set in force stays, /readyz stays ready with an alarm.
    write(policy_dir / "maintenance.cedar", BROKEN)

    async def alarmed() -> bool:
        _, body = await actors.readiness(broker)
        return bool(body["checks"]["policy"].get("alarm"))

    await until(alarmed)
    status, ready = await actors.readiness(broker)
    assert (status, ready["status"], ready["checks"]["policy"]["ok"]) == (200, "ready", True)
    assert "maintenance.cedar" in ready["checks"]["policy"]["detail"]
    status, _ = await actors.request(broker, run_id, "demo-db", "during-invalid")
    assert status == 201

    # The file fixed (a valid policy): the new set decides, the alarm clears.
    write(policy_dir / "maintenance.cedar", CLOSE_DEMO_DB)

    async def cleared() -> bool:
        return not await alarmed()

    await until(cleared)
    status, denied = await actors.request(broker, run_id, "demo-db", "after")
    assert status == 403, denied
    assert denied["policy_ids"] == ["demo-db-maintenance"]
    status, _ = await actors.request(broker, run_id, "demo-kv", "after")
    assert status == 201


async def test_a_policy_change_revokes_a_live_database_credential(
    stack: DevStack, broker: RunningBroker, actors: Actors, policy_dir: Path
) -> None:
    run_id = await actors.start_run(broker)
    status, issued = await actors.request(broker, run_id, "demo-db", "query")
    assert status == 201, issued
    status, kept = await actors.request(broker, run_id, "demo-kv", "config")
    assert status == 201, kept
    secret = issued["secret"]
    assert await asyncio.to_thread(_pg_rows, stack, secret) == 3
    ledger = broker.runtime.ledger
    lease = await ledger.get_lease(issued["credential_id"])
    assert lease is not None
    (vault_lease_id,) = lease.vault_lease_ids
    assert (lease.tool, lease.justification) == ("psql", "count the orders")

    write(policy_dir / "maintenance.cedar", CLOSE_DEMO_DB)

    async def revoked() -> bool:
        current = await ledger.get_lease(issued["credential_id"])
        return current is not None and current.state.value == "revoked"

    await until(revoked)
    current = await ledger.get_lease(issued["credential_id"])
    assert current is not None
    assert current.revoke_reason == "continuous_authorization"
    # OpenBao confirms: the task token and the database lease are gone ...
    assert not await asyncio.to_thread(_token_alive, stack, issued["token_accessor"])
    assert not await asyncio.to_thread(_lease_alive, stack, vault_lease_id)
    # ... and PostgreSQL refuses the credential.
    with pytest.raises(psycopg.OperationalError):
        await asyncio.to_thread(_pg_rows, stack, secret)
    # The credential the new set still allows is untouched.
    other = await ledger.get_lease(kept["credential_id"])
    assert other is not None
    assert other.state.value == "active"
    assert await asyncio.to_thread(_token_alive, stack, kept["token_accessor"])

    # One audit event names the cause and the reason.
    status, page = await call(
        broker,
        actors.admin,
        "GET",
        f"/v1/audit?credential_id={issued['credential_id']}&type=credential.revoked",
    )
    assert status == 200, page
    (event,) = page["events"]
    assert event["payload"]["cause"] == "continuous_authorization"
    assert "the policy set changed" in event["payload"]["reason"]
    assert "demo-db-maintenance" in event["payload"]["reason"]


async def test_a_quarantine_revokes_the_holders_live_credentials(
    stack: DevStack, broker: RunningBroker, actors: Actors
) -> None:
    run_id = await actors.start_run(broker)
    status, issued = await actors.request(broker, run_id, "demo-db", "query")
    assert status == 201, issued
    body = {
        "kind": "identity",
        "value": workload_id(stack, "agent"),
        "reason": "suspected compromise",
        "ttl_seconds": 600,
    }
    status, answer = await call(broker, actors.admin, "POST", "/v1/quarantines", json_body=body)
    assert status in (200, 201), answer

    async def token_gone() -> bool:
        return not await asyncio.to_thread(_token_alive, stack, issued["token_accessor"])

    await until(token_gone)
    with pytest.raises(psycopg.OperationalError):
        await asyncio.to_thread(_pg_rows, stack, issued["secret"])
    lease = await broker.runtime.ledger.get_lease(issued["credential_id"])
    assert lease is not None
    assert (lease.state.value, lease.revoke_reason) == ("revoked", "continuous_authorization")


_ROLLING_REDIS_DB = 13


async def test_a_replica_the_fleet_moved_past_issues_nothing_until_it_loads_the_new_set(
    stack: DevStack, start: StartBroker, actors: Actors, policy_dir: Path
) -> None:
    """A rolling policy change on two replicas sharing one ledger (the same policy path, as
    replicas of one deployment have): the old replica issues under the old set; the new one
    starts on the new set (demo-db closed) and decides every live credential again, which
    revokes the old one's demo-db credential and stores the marker. The old replica then
    answers 503 ``policy.superseded`` and is not ready, until a reload (SIGHUP) loads the
    new set."""
    assert stack.endpoints is not None
    base, _, _ = stack.endpoints.redis_url.rpartition("/")
    url = f"{base}/{_ROLLING_REDIS_DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    common = {
        "TASKLEASE_REDIS__URL": url,
        "TASKLEASE_POLICY_DIR": str(policy_dir),
        # Each replica keeps the set it loaded until told (no file polling): the files
        # change under the old one, as a new deployment's would.
        "TASKLEASE_POLICY__RELOAD_INTERVAL_SECONDS": "0",
        "TASKLEASE_POLICY__SUPERSEDED_CHECK_SECONDS": "0.2",
        "TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS": "86400",
    }
    old = await start(**common)
    run_id = await actors.start_run(old)
    status, before = await actors.request(old, run_id, "demo-db", "before")
    assert status == 201, before

    write(policy_dir / "maintenance.cedar", CLOSE_DEMO_DB)
    new = await start(**common)

    async def old_superseded() -> bool:
        status, body = await actors.readiness(old)
        return status == 503 and not body["checks"]["policy_set"]["ok"]

    await until(old_superseded)
    status, refused = await actors.request(old, run_id, "demo-db", "during")
    assert (status, refused["reason"]) == (503, "policy.superseded"), refused
    assert "SIGHUP" in refused["detail"]
    status, ready = await actors.readiness(new)
    assert status == 200, ready
    status, denied = await actors.request(new, run_id, "demo-db", "on-the-new-set")
    assert (status, denied["reason"]) == (403, "policy.deny"), denied
    lease = await new.runtime.ledger.get_lease(before["credential_id"])
    assert lease is not None
    assert (lease.state.value, lease.revoke_reason) == ("revoked", "continuous_authorization")

    assert old.runtime.reloader is not None
    await old.runtime.reloader.reload("sighup")

    async def old_current() -> bool:
        status, _ = await actors.readiness(old)
        return status == 200

    await until(old_current)
    status, after = await actors.request(old, run_id, "demo-db", "after")
    assert (status, after["reason"]) == (403, "policy.deny"), after
