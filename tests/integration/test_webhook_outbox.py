"""The durable webhook outbox on the real Redis: a notification accepted by ``notify`` is
delivered at least once although the broker that accepted it stops, crashes or restarts; the
attempt count survives; nothing secret is kept in Redis; ``notify`` never fails or waits long.

Each test uses its own key namespace on the stack's Redis; "a broker" is a notifier with its
own Redis client (its own connections) and its own consumer name."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from broker.adapters.redis_webhook_outbox import GROUP, RedisWebhookOutbox
from broker.adapters.webhook_notifier import (
    WebhookNotifier,
    WebhookSecret,
    url_label,
    url_reference,
    verify_signature,
)
from broker.devstack import DevStack
from tests.conftest import LOG_DIR, remember_secret

SECRET = remember_secret("whsec-outbox-" + "5be1d0" * 8)
DATA = {"step": "request", "by": "spiffe://tasklease.test/agent/demo", "approval": {"id": "apr_9"}}


@dataclass
class Receiver:
    """A webhook endpoint answering ``status``; it checks every signature."""

    url: str = ""
    status: int = 200
    # (delivery id, signature valid, status answered) per request.
    requests: list[tuple[str, bool, int]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Tasklease-Timestamp"]
        signature = request.headers["X-Tasklease-Signature"]
        expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
        valid = hmac.compare_digest(signature, f"v1={expected.hexdigest()}") and (
            verify_signature(
                SECRET.encode(),
                timestamp=timestamp,
                body=body,
                signature=signature,
                now=time.time(),
            )
        )
        delivery = request.headers["X-Tasklease-Delivery"]
        valid = valid and json.loads(body)["id"] == delivery
        self.requests.append((delivery, valid, self.status))
        return web.Response(status=self.status)

    def delivered(self) -> Counter[str]:
        """Successful deliveries by delivery id."""
        return Counter(d for d, _, status in self.requests if 200 <= status < 300)


async def receiver_on(path: str) -> tuple[Receiver, web.AppRunner]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post(path, hook.handle)
    # No access log: it would show the secret-bearing URL.
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    return hook, runner


# How long a stopped broker, a closed client or a receiver's shutdown may take before the test
# fails (rather than hang the whole run).
STOP_WITHIN = 15.0


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook, runner = await receiver_on("/hooks/approvals")
    try:
        yield hook
    finally:
        await asyncio.wait_for(runner.cleanup(), STOP_WITHIN)


class MaxRandom(random.Random):
    """Backoff always at its cap: the broker under test waits, the test acts meanwhile."""

    def uniform(self, a: float, b: float) -> float:
        return b


# For a broker that must still be waiting for its retry when the test stops it.
SLOW_RETRIES: dict[str, Any] = {
    "backoff_base": timedelta(seconds=5),
    "backoff_cap": timedelta(seconds=5),
}


class Brokers:
    """Notifiers sharing one outbox (one namespace), each with its own client and consumer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.namespace = f"wh{uuid.uuid4().hex[:12]}"
        self.clients: list[aioredis.Redis] = []
        # For the test's own reads.
        self.admin = aioredis.Redis.from_url(url, decode_responses=True)
        self.tasks: list[asyncio.Task[None]] = []

    def client(self) -> aioredis.Redis:
        client = aioredis.Redis.from_url(self.url, decode_responses=True)
        self.clients.append(client)
        return client

    def outbox(self, consumer: str, **overrides: Any) -> RedisWebhookOutbox:
        settings: dict[str, Any] = {
            "client": self.client(),
            "namespace": self.namespace,
            "max_backlog": 100,
            "visibility": timedelta(seconds=1),
            "consumer": consumer,
            "block": timedelta(milliseconds=200),
        }
        settings.update(overrides)
        return RedisWebhookOutbox(**settings)

    def notifier(
        self, urls: list[str], consumer: str, *, outbox: RedisWebhookOutbox | None = None, **kw: Any
    ) -> WebhookNotifier:
        settings: dict[str, Any] = {
            "urls": urls,
            "secret": WebhookSecret(SECRET.encode()),
            "now": lambda: datetime.now(UTC),
            "timeout": timedelta(seconds=1),
            "max_attempts": 10,
            "backoff_base": timedelta(milliseconds=20),
            "backoff_cap": timedelta(milliseconds=100),
            "rng": random.Random(11),
            "outbox": outbox or self.outbox(consumer),
        }
        settings.update(kw)
        return WebhookNotifier(**settings)

    def start(self, notifier: WebhookNotifier) -> asyncio.Task[None]:
        task = asyncio.create_task(notifier.run())
        self.tasks.append(task)
        return task

    @staticmethod
    async def stop(task: asyncio.Task[None]) -> None:
        """The broker stops (or dies): its run ends wherever it was."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def dump(self) -> str:
        """Everything the outbox keeps in Redis, as text: every key of the namespace, with the
        streams' groups, consumers and pending lists."""
        admin = self.admin
        parts: list[str] = []
        async for key in admin.scan_iter(match=f"{self.namespace}:*"):
            kind = str(await admin.type(key))
            parts.append(f"{key} {kind}")
            if kind == "stream":
                parts.append(repr(await admin.xrange(key)))
                parts.append(repr(await admin.xinfo_stream(key, full=True)))
            elif kind == "hash":
                parts.append(repr(await admin.hgetall(key)))
            else:
                parts.append(repr(await admin.dump(key)))
        return "\n".join(parts)

    async def close(self) -> None:
        """Stop every broker and drop the namespace; a broker that does not stop within
        :data:`STOP_WITHIN` of its cancellation fails the test (instead of hanging it)."""
        stuck = []
        for task in self.tasks:
            try:
                await asyncio.wait_for(self.stop(task), STOP_WITHIN)
            except TimeoutError:
                stuck.append(task.get_name())
        keys = [key async for key in self.admin.scan_iter(match=f"{self.namespace}:*")]
        if keys:
            await self.admin.unlink(*keys)
        await self.admin.aclose()
        for client in self.clients:
            await asyncio.wait_for(client.aclose(), STOP_WITHIN)
        assert not stuck, f"notifiers still running {STOP_WITHIN} s after cancellation: {stuck}"


@pytest.fixture
async def brokers(stack: DevStack) -> AsyncIterator[Brokers]:
    assert stack.endpoints is not None
    opened = Brokers(stack.endpoints.redis_url)
    try:
        yield opened
    finally:
        await opened.close()


async def eventually(check: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- at least once


async def test_a_delivery_outlives_the_broker_that_accepted_it(
    brokers: Brokers, receiver: Receiver
) -> None:
    """Accepted, attempted against a receiver answering 503, broker stopped; another broker
    delivers it with the same delivery id, signed, and the attempt count carried over."""
    receiver.status = 503
    first = brokers.notifier([receiver.url], "broker-a", rng=MaxRandom(), **SLOW_RETRIES)
    await first.notify("approval.requested", DATA)
    running = brokers.start(first)
    await eventually(lambda: len(receiver.requests) == 1)
    await brokers.stop(running)  # waiting for its backoff: the entry is pending for broker-a

    outbox = brokers.outbox("broker-b")
    attempts_key = outbox.keys[1]
    assert list((await brokers.admin.hgetall(attempts_key)).values()) == ["1"]
    receiver.status = 200
    second = brokers.notifier([receiver.url], "broker-b", outbox=outbox)
    brokers.start(second)
    await asyncio.wait_for(second.drain(), 10)

    (first_try, retry) = receiver.requests
    assert first_try[0] == retry[0]
    assert (retry[1], retry[2]) == (True, 200)
    assert (second.stats.reclaimed, second.stats.delivered) == (1, 1)
    assert await brokers.admin.exists(attempts_key) == 0
    log = (LOG_DIR / "broker.jsonl").read_text()
    delivered = [
        json.loads(line)
        for line in log.splitlines()
        if '"webhook.delivered"' in line and retry[0] in line
    ]
    assert [entry["attempts"] for entry in delivered] == [2]


async def test_a_delivery_queued_while_no_broker_runs_is_delivered_by_the_next(
    brokers: Brokers, receiver: Receiver
) -> None:
    """Accepted by a broker that stopped before reading it at all: the next one reads it."""
    accepted = brokers.notifier([receiver.url], "broker-a")
    await accepted.notify("approval.decided", DATA)
    later = brokers.notifier([receiver.url], "broker-b")
    brokers.start(later)
    await asyncio.wait_for(later.drain(), 10)
    ((delivery, valid, status),) = receiver.requests
    assert (valid, status, delivery.startswith("dlv_")) == (True, 200, True)
    assert (later.stats.reclaimed, later.stats.delivered) == (0, 1)


async def test_an_entry_held_by_a_dead_worker_is_taken_over_after_the_visibility_timeout(
    brokers: Brokers, receiver: Receiver
) -> None:
    dead = brokers.outbox("dead-worker")
    alive_outbox = brokers.outbox("live-worker", visibility=timedelta(seconds=1.5))
    accepting = brokers.notifier([receiver.url], "dead-worker", outbox=dead)
    await accepting.notify("approval.requested", DATA)
    (held,) = await dead.take(1)  # and then it dies: never settled, never touched again
    taken_at = time.monotonic()

    alive = brokers.notifier([receiver.url], "live-worker", outbox=alive_outbox)
    brokers.start(alive)
    await eventually(lambda: len(receiver.requests) == 1)
    waited = time.monotonic() - taken_at
    await asyncio.wait_for(alive.drain(), 10)

    assert 1.4 <= waited < 6
    assert receiver.requests == [(held.delivery.delivery_id, True, 200)]
    assert (alive.stats.reclaimed, alive.stats.delivered) == (1, 1)
    # The dead worker, were it only slow, finds the entry gone and makes no attempt.
    assert await dead.begin_attempt(held) is None


async def test_a_live_broker_keeps_what_it_holds_past_the_visibility_timeout(
    brokers: Brokers, receiver: Receiver
) -> None:
    """A delivery waiting for its backoff longer than the visibility timeout is not taken over
    by another broker: its holder touches it; it is delivered exactly once. (The holder
    touches every third of the timeout: a margin of two thirds, 2.7 s here, for a loaded
    machine's stalls.)"""
    receiver.status = 503
    visibility = timedelta(seconds=4)
    slow = brokers.notifier(
        [receiver.url],
        "slow",
        outbox=brokers.outbox("slow", visibility=visibility),
        backoff_base=timedelta(seconds=6),
        backoff_cap=timedelta(seconds=6),
        rng=MaxRandom(),
    )
    other = brokers.notifier(
        [receiver.url], "other", outbox=brokers.outbox("other", visibility=visibility)
    )
    await slow.notify("approval.requested", DATA)
    brokers.start(slow)
    await eventually(lambda: len(receiver.requests) == 1)
    brokers.start(other)  # free, polling, and eager to reclaim what idles past 4 s
    receiver.status = 200
    await asyncio.wait_for(slow.drain(), 30)
    assert len(receiver.requests) == 2
    assert receiver.delivered() == Counter({receiver.requests[0][0]: 1})
    assert (slow.stats.delivered, other.stats.reclaimed, other.stats.delivered) == (1, 0, 0)


async def test_two_brokers_on_one_outbox_deliver_everything_once(
    brokers: Brokers, receiver: Receiver
) -> None:
    visibility = timedelta(seconds=30)
    one = brokers.notifier(
        [receiver.url], "one", outbox=brokers.outbox("one", visibility=visibility)
    )
    two = brokers.notifier(
        [receiver.url], "two", outbox=brokers.outbox("two", visibility=visibility)
    )
    brokers.start(one)
    brokers.start(two)
    for index in range(40):
        await (one if index % 2 else two).notify("approval.requested", {**DATA, "n": index})
    await asyncio.wait_for(one.drain(), 20)
    delivered = receiver.delivered()
    assert len(delivered) == 40
    assert set(delivered.values()) == {1}
    assert all(valid for _, valid, _ in receiver.requests)
    assert one.stats.delivered + two.stats.delivered == 40
    assert one.stats.delivered > 0
    assert two.stats.delivered > 0


# --------------------------------------------------------------------------- giving up


async def test_attempts_exhausted_across_a_restart(brokers: Brokers, receiver: Receiver) -> None:
    """max_attempts counts every attempt of every broker: one before the restart, two after,
    then the delivery is dropped and counted."""
    receiver.status = 503
    before = brokers.notifier(
        [receiver.url], "before", max_attempts=3, rng=MaxRandom(), **SLOW_RETRIES
    )
    await before.notify("approval.decided", DATA)
    running = brokers.start(before)
    await eventually(lambda: len(receiver.requests) == 1)
    await brokers.stop(running)

    after_outbox = brokers.outbox("after")
    after = brokers.notifier([receiver.url], "after", max_attempts=3, outbox=after_outbox)
    brokers.start(after)
    await asyncio.wait_for(after.drain(), 10)
    assert len(receiver.requests) == 3
    assert len({delivery for delivery, _, _ in receiver.requests}) == 1
    assert (after.stats.reclaimed, after.stats.retries, after.stats.failed) == (1, 1, 1)
    assert await after_outbox.backlog() == 0
    assert await brokers.admin.exists(after_outbox.keys[1]) == 0


async def test_a_crash_after_the_last_attempt_does_not_allow_another(
    brokers: Brokers, receiver: Receiver
) -> None:
    """The count is taken before the attempt: a broker that died during its last attempt
    leaves nothing more to try."""
    dying = brokers.outbox("dying")
    accepting = brokers.notifier([receiver.url], "dying", outbox=dying, max_attempts=2)
    await accepting.notify("approval.decided", DATA)
    (held,) = await dying.take(1)
    assert [await dying.begin_attempt(held), await dying.begin_attempt(held)] == [1, 2]

    survivor = brokers.notifier([receiver.url], "survivor", max_attempts=2)
    brokers.start(survivor)
    await asyncio.wait_for(survivor.drain(), 10)
    assert receiver.requests == []
    assert (survivor.stats.failed, survivor.stats.delivered) == (1, 0)


async def test_a_delivery_whose_url_was_removed_is_dropped_and_logged_without_the_url(
    brokers: Brokers, receiver: Receiver
) -> None:
    token = remember_secret("rem0ved-url-t0ken-" + uuid.uuid4().hex)
    removed = receiver.url + "/removed?token=" + token
    old = brokers.notifier([removed], "old-config")
    await old.notify("approval.requested", DATA)
    new = brokers.notifier([receiver.url], "new-config", unknown_url_grace=timedelta(0))
    brokers.start(new)
    await asyncio.wait_for(new.drain(), 10)
    assert receiver.requests == []
    assert (new.stats.unknown_url, new.stats.delivered, new.stats.failed) == (1, 0, 0)
    log = (LOG_DIR / "broker.jsonl").read_text()
    dropped = [line for line in log.splitlines() if '"webhook.dropped_unknown_url"' in line]
    assert any(url_label(removed) in line for line in dropped)
    assert token not in log
    assert "/removed" not in log


async def test_a_url_unknown_to_one_replica_is_left_to_a_replica_that_knows_it(
    brokers: Brokers, receiver: Receiver
) -> None:
    """During a rolling change of webhook_urls: a replica that lacks the URL hands the
    delivery back (within the grace); one that has it delivers it."""
    other, runner = await receiver_on("/other")
    try:
        knows = brokers.notifier([receiver.url], "knows")
        await knows.notify("approval.requested", DATA)
        lacks = brokers.notifier([other.url], "lacks")
        lacking = brokers.start(lacks)
        await eventually(lambda: lacks.stats.handed_back >= 1)
        await brokers.stop(lacking)
        brokers.start(knows)
        await asyncio.wait_for(knows.drain(), 10)
        assert [status for _, _, status in receiver.requests] == [200]
        assert (knows.stats.delivered, lacks.stats.unknown_url, lacks.stats.delivered) == (1, 0, 0)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- secrets


async def test_redis_never_holds_the_urls_or_the_secret(
    brokers: Brokers, receiver: Receiver
) -> None:
    token = remember_secret("ch4t-webhook-t0ken-" + uuid.uuid4().hex)
    secret_url = receiver.url + "?token=" + token + "&key=T0KEN-PART"
    receiver.status = 503
    hook = brokers.notifier(
        [secret_url, receiver.url], "scanned", rng=MaxRandom(), concurrency=8, **SLOW_RETRIES
    )
    for _ in range(3):
        await hook.notify("approval.requested", DATA)
    brokers.start(hook)
    await eventually(lambda: len(receiver.requests) >= 6)  # held, counted, waiting to retry
    stored = await brokers.dump()
    assert f"{brokers.namespace}:{{wh}}:attempts hash" in stored
    assert url_reference(secret_url) in stored
    for forbidden in (secret_url, receiver.url, token, "T0KEN-PART", "127.0.0.1:", SECRET):
        assert forbidden not in stored


# --------------------------------------------------------------------------- notify() bounds


async def test_a_full_outbox_drops_and_counts_and_notify_does_not_raise(
    brokers: Brokers, receiver: Receiver
) -> None:
    outbox = brokers.outbox("bounded", max_backlog=3)
    hook = brokers.notifier([receiver.url], "bounded", outbox=outbox)
    started = time.monotonic()
    for _ in range(5):
        await hook.notify("approval.requested", DATA)
    assert time.monotonic() - started < 1
    assert (hook.stats.queued, hook.stats.dropped) == (3, 2)
    assert await outbox.backlog() == 3
    brokers.start(hook)
    await asyncio.wait_for(hook.drain(), 10)
    assert len(receiver.delivered()) == 3


async def test_notify_with_redis_down_drops_without_raising(brokers: Brokers) -> None:
    refused = aioredis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    brokers.clients.append(refused)
    hook = brokers.notifier(
        ["https://hooks.example.test/x"],
        "no-redis",
        outbox=brokers.outbox("no-redis", client=refused),
    )
    await hook.notify("approval.requested", DATA)
    assert (hook.stats.queued, hook.stats.dropped) == (0, 1)


async def test_notify_with_redis_hanging_returns_within_its_bound(brokers: Brokers) -> None:
    """A Redis that accepts connections and never answers: notify gives up after
    ``append_timeout``, drops and counts, and does not raise."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hanging = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=30)
    brokers.clients.append(hanging)
    try:
        hook = brokers.notifier(
            ["https://hooks.example.test/x"],
            "hanging",
            outbox=brokers.outbox("hanging", client=hanging),
            append_timeout=timedelta(milliseconds=300),
        )
        started = time.monotonic()
        await hook.notify("approval.requested", DATA)
        assert time.monotonic() - started < 1.5
        assert (hook.stats.queued, hook.stats.dropped) == (0, 1)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_run_survives_redis_being_unreachable(brokers: Brokers) -> None:
    refused = aioredis.Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True)
    brokers.clients.append(refused)
    hook = brokers.notifier(
        ["https://hooks.example.test/x"],
        "no-redis",
        outbox=brokers.outbox("no-redis", client=refused),
    )
    task = brokers.start(hook)
    await asyncio.sleep(0.5)
    assert not task.done()


# --------------------------------------------------------------------------- housekeeping


async def test_consumers_long_gone_with_nothing_pending_are_forgotten(
    brokers: Brokers, receiver: Receiver
) -> None:
    gone = brokers.outbox("gone-empty")
    holding = brokers.outbox("gone-holding")
    cleaner = brokers.outbox("cleaner", forget_consumers_after=timedelta(0))
    hook = brokers.notifier([receiver.url], "gone-holding", outbox=holding)
    await hook.notify("approval.requested", DATA)
    await hook.notify("approval.requested", DATA)
    (done,) = await gone.take(1)
    await gone.settle(done)  # a consumer that holds nothing
    assert len(await holding.take(5)) == 1
    await asyncio.sleep(0.01)
    assert await cleaner.forget_idle_consumers() == 1
    names = {c["name"] for c in await brokers.admin.xinfo_consumers(cleaner.keys[0], GROUP)}
    assert names == {"gone-holding"}
