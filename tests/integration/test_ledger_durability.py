"""The Redis ledger against the stack's real Redis: crash survival, start-up refusals and the
durability barrier (SECURITY.md 32-33). Every configuration change is restored afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from pydantic import ValidationError

from broker.adapters.redis_ledger import RedisLedger, RedisReadiness
from broker.config import RedisSettings
from broker.core.model import (
    Lease,
    LeaseState,
)
from broker.devstack import DevStack, free_port
from broker.errors import LedgerUnavailableError
from tests.integration.redis_topology import NOW, ledger_lease, ledger_run

RESTORED = ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")


def _lease(credential_id: str = "cred_dur") -> Lease:
    return ledger_lease(credential_id, "wf-dur")


class RedisAdmin:
    """CONFIG SET on the stack's Redis, with every touched setting restored at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self.saved: dict[str, str] = {}
        self.ledgers: list[RedisLedger] = []

    async def snapshot(self) -> None:
        for name in RESTORED:
            self.saved[name] = str((await self.client.config_get(name))[name])

    async def set(self, name: str, value: str) -> None:
        await self.client.config_set(name, value)
        await self.wait_for_aof()

    async def wait_for_aof(self) -> None:
        """Turning appendonly on rewrites the AOF in the background: wait until it is done,
        so the next test (or a restart) meets a settled server."""
        for _ in range(200):
            info = await self.client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the AOF rewrite did not finish within 10 s")

    def ledger(self, **settings: Any) -> RedisLedger:
        ledger = RedisLedger(
            settings=RedisSettings(url=self.url, **settings),
            namespace=f"d{uuid.uuid4().hex[:12]}",
        )
        self.ledgers.append(ledger)
        return ledger

    async def restore(self) -> None:
        for ledger in self.ledgers:
            await ledger.close()
            keys = [k async for k in self.client.scan_iter(match=f"{ledger.namespace}:*")]
            if keys:
                await self.client.unlink(*keys)
        for name, value in self.saved.items():
            await self.client.config_set(name, value)
        await self.wait_for_aof()
        await self.client.aclose()


@pytest.fixture
async def admin(stack: DevStack) -> AsyncIterator[RedisAdmin]:
    assert stack.endpoints is not None
    admin = RedisAdmin(stack.endpoints.redis_url)
    await admin.snapshot()
    try:
        yield admin
    finally:
        # A crash test restarts Redis: the old connections are gone, so use fresh ones.
        admin.client = aioredis.Redis.from_url(admin.url, decode_responses=True)
        await admin.restore()


async def _write_and_activate(ledger: RedisLedger) -> Lease:
    await ledger.write_ahead(_lease())
    return await ledger.activate(
        "cred_dur", token_accessor="acc-dur", vault_lease_ids=("database/creds/orders/x",)
    )


# --------------------------------------------------------------------------- crash survival


async def test_an_acknowledged_lease_survives_a_redis_crash(
    stack: DevStack, admin: RedisAdmin
) -> None:
    """SECURITY 32: acknowledged, then Redis is killed (SIGKILL, no shutdown save) and
    restarted on the same data: the lease, its run and its due entry are all there."""
    await admin.set("appendfsync", "always")
    ledger = admin.ledger()
    run = ledger_run("wf-dur")
    await ledger.create_run(run)
    active = await _write_and_activate(ledger)
    await ledger.close()

    process = stack.processes["redis"].popen
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    stack.restart_redis()

    reopened = RedisLedger(settings=RedisSettings(url=admin.url), namespace=ledger.namespace)
    admin.ledgers.append(reopened)
    assert active == await reopened.get_lease("cred_dur")
    assert run == await reopened.get_run("wf-dur")
    assert await reopened.claim_due(
        active.expires_at, limit=10, visibility=timedelta(seconds=30)
    ) == ["cred_dur"]


async def test_scripts_are_reloaded_when_redis_forgot_them(admin: RedisAdmin) -> None:
    """After a restart or failover the script cache is empty: the ledger loads it again."""
    ledger = admin.ledger()
    await ledger.schedule("cred_a", NOW)
    await admin.client.script_flush()
    assert await ledger.claim_due(NOW, limit=1, visibility=timedelta(seconds=5)) == ["cred_a"]


# --------------------------------------------------------------------------- start-up checks


async def test_start_up_refuses_a_redis_that_may_evict(admin: RedisAdmin) -> None:
    """SECURITY 33: maxmemory-policy allkeys-lru → refused (allowed only when degraded)."""
    await admin.set("appendfsync", "always")
    await admin.set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(LedgerUnavailableError, match="maxmemory-policy") as caught:
        await admin.ledger().check_durability()
    assert caught.value.reason == "ledger.not_durable"
    degraded = await admin.ledger(insecure_allow_degraded_durability=True).check_durability()
    assert len(degraded.problems) == 1


async def test_start_up_refuses_a_redis_without_persistence(admin: RedisAdmin) -> None:
    """SECURITY 33: appendonly no (and no RDB save points) → refused."""
    await admin.set("appendonly", "no")
    with pytest.raises(LedgerUnavailableError, match="persistence is off") as caught:
        await admin.ledger().check_durability()
    assert caught.value.reason == "ledger.not_durable"


async def test_a_durable_redis_is_accepted_and_ready(admin: RedisAdmin) -> None:
    await admin.set("appendfsync", "always")
    ledger = admin.ledger()
    durability = await ledger.check_durability()
    assert durability.problems == []
    assert durability.acknowledgement in ("appendfsync always", "WAITAOF 1")
    result = await RedisReadiness(ledger).check(NOW)
    assert (result.ok, result.alarm) == (True, False)


async def test_a_redis_near_its_maxmemory_is_ready_with_an_alarm(admin: RedisAdmin) -> None:
    """With noeviction a full Redis refuses every ledger write (issuance fails closed):
    readiness raises an alarm from 90 % of maxmemory, before it happens."""
    await admin.set("appendfsync", "always")
    ledger = admin.ledger()
    unlimited = await ledger.memory()
    assert (unlimited.used > 0, unlimited.maximum, unlimited.share) == (True, 0, None)
    assert (await RedisReadiness(ledger).check(NOW)).alarm is False
    # Below what it uses already: reads still answer (nothing is evicted), writes would not.
    await admin.set("maxmemory", str(unlimited.used // 2))

    readiness = await RedisReadiness(ledger).check(NOW)

    assert (readiness.ok, readiness.alarm) == (True, True)
    assert "of its maxmemory" in readiness.detail
    assert "fails closed" in readiness.detail


# --------------------------------------------------------------------------- the barrier


async def test_fsync_mode_with_appendfsync_always_acknowledges_activation(
    admin: RedisAdmin,
) -> None:
    await admin.set("appendfsync", "always")
    active = await _write_and_activate(admin.ledger())
    assert active.state == LeaseState.ACTIVE


async def test_fsync_mode_refuses_appendfsync_everysec_without_waitaof(
    admin: RedisAdmin,
) -> None:
    """Redis 7.0 (the stack's) has no WAITAOF: with appendfsync everysec an activation
    cannot be known to be fsynced, so start-up and every activation refuse it. (On Redis
    >= 7.2 the same configuration is acknowledged through WAITAOF.)"""
    await admin.set("appendfsync", "everysec")
    ledger = admin.ledger()
    durability = await ledger.durability()
    if durability.waitaof:
        assert (await _write_and_activate(ledger)).state == LeaseState.ACTIVE
        return
    with pytest.raises(LedgerUnavailableError, match="WAITAOF") as refused:
        await ledger.check_durability()
    assert refused.value.reason == "ledger.not_durable"
    readiness = await RedisReadiness(ledger).check(NOW)
    assert readiness.ok is False

    with pytest.raises(LedgerUnavailableError) as caught:
        await _write_and_activate(ledger)

    assert caught.value.reason == "ledger.not_acknowledged"
    # The write stays: the lease is active with its references and due at expiry; the
    # service revokes the credential and fails the request.
    stored = await ledger.get_lease("cred_dur")
    assert stored is not None
    assert (stored.state, stored.token_accessor) == (LeaseState.ACTIVE, "acc-dur")


async def test_replicas_mode_without_replicas_is_refused(admin: RedisAdmin) -> None:
    await admin.set("appendfsync", "always")
    ledger = admin.ledger(durability="replicas", durability_timeout_ms=50)
    with pytest.raises(LedgerUnavailableError, match="replica") as refused:
        await ledger.check_durability()
    assert refused.value.reason == "ledger.not_durable"
    with pytest.raises(LedgerUnavailableError, match="WAIT: 0 of 1") as caught:
        await _write_and_activate(ledger)
    assert caught.value.reason == "ledger.not_acknowledged"


async def test_no_acknowledgement_needs_the_insecure_flag_and_raises_an_alarm(
    admin: RedisAdmin,
) -> None:
    with pytest.raises(ValidationError, match="insecure_allow_degraded_durability"):
        RedisSettings(url=admin.url, durability="none")
    await admin.set("appendfsync", "everysec")
    ledger = admin.ledger(durability="none", insecure_allow_degraded_durability=True)
    assert (await ledger.check_durability()).acknowledgement == "none"
    assert (await _write_and_activate(ledger)).state == LeaseState.ACTIVE
    readiness = await RedisReadiness(ledger).check(NOW)
    assert (readiness.ok, readiness.alarm) == (True, True)


# --------------------------------------------------------------------------- errors and layout


async def test_an_unreachable_redis_is_a_ledger_error_without_url_or_password() -> None:
    password = "s3cret-" + uuid.uuid4().hex
    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    ledger = RedisLedger(settings=RedisSettings(url=url, socket_timeout_seconds=0.5))
    try:
        with pytest.raises(LedgerUnavailableError) as caught:
            await ledger.get_lease("cred_a")
    finally:
        await ledger.close()
    assert caught.value.reason == "ledger.unreachable"
    assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
    assert password not in str(caught.value)
    assert url not in str(caught.value)


async def test_a_wrong_password_is_a_ledger_error_that_does_not_repeat_it(
    stack: DevStack,
) -> None:
    assert stack.endpoints is not None
    wrong = "wrong-" + uuid.uuid4().hex
    url = f"redis://:{wrong}@127.0.0.1:{stack.endpoints.redis_port}/0"
    ledger = RedisLedger(settings=RedisSettings(url=url))
    try:
        with pytest.raises(LedgerUnavailableError) as caught:
            await ledger.write_ahead(_lease())
    finally:
        await ledger.close()
    assert wrong not in str(caught.value)
    assert stack.endpoints.redis_url.split("@")[0] not in str(caught.value)


async def test_replicas_with_another_bucket_count_are_refused(admin: RedisAdmin) -> None:
    """Items in buckets a replica does not know would never be swept."""
    first = admin.ledger()
    await first.schedule("cred_a", NOW)
    other = RedisLedger(
        settings=RedisSettings(url=admin.url, due_buckets=8), namespace=first.namespace
    )
    admin.ledgers.append(other)
    with pytest.raises(LedgerUnavailableError) as caught:
        await other.claim_due(NOW, limit=1, visibility=timedelta(seconds=5))
    assert caught.value.reason == "ledger.layout_mismatch"
