"""The webhook notifier without a network or Redis: the in-memory outbox, notify()'s bounds
(a full, failing or hanging outbox never fails or holds up the caller) and deliveries whose URL
is not configured. Deliveries to a real receiver: tests/integration/test_webhook_notifier.py;
the Redis outbox: tests/integration/test_webhook_outbox.py."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from broker.adapters.webhook_notifier import (
    Delivery,
    MemoryWebhookOutbox,
    OutboxEntry,
    WebhookNotifier,
    WebhookSecret,
    url_label,
    url_reference,
)
from broker.errors import LedgerUnavailableError

URL = "https://hooks.example.test/services/T000/B000/xoxb-secret-part"
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def notifier(outbox: object = None, **overrides: object) -> WebhookNotifier:
    settings: dict[str, object] = {
        "urls": [URL],
        "secret": WebhookSecret(b"k" * 32),
        "now": lambda: NOW,
        "outbox": outbox,
    }
    settings.update(overrides)
    return WebhookNotifier(**settings)  # type: ignore[arg-type]


def delivery(ref: str = "") -> Delivery:
    return Delivery("dlv_1", "approval.requested", ref or url_reference(URL), "https://x#1", b"{}")


def test_a_url_is_referenced_by_its_sha256_and_labelled_by_scheme_host_and_hash_prefix() -> None:
    digest = hashlib.sha256(URL.encode()).hexdigest()
    assert url_reference(URL) == digest
    assert url_label(URL) == f"https://hooks.example.test#{digest[:12]}"


async def test_the_memory_outbox_is_bounded_and_counts_attempts() -> None:
    outbox = MemoryWebhookOutbox(max_size=2)
    assert await outbox.append([delivery(), delivery(), delivery()]) == 2
    first, second = await outbox.take(5)
    assert [await outbox.begin_attempt(first) for _ in range(3)] == [1, 2, 3]
    assert await outbox.begin_attempt(second) == 1
    await outbox.settle(first)
    outbox.release(second)  # back in the queue
    (again,) = await outbox.take(5)
    assert again == second
    assert await outbox.begin_attempt(again) == 2
    await outbox.settle(again)
    await asyncio.wait_for(outbox.wait_empty(), 1)


async def test_notify_queues_one_delivery_per_url_with_one_delivery_id() -> None:
    outbox = MemoryWebhookOutbox()
    other = "https://chat.example.test/hook?token=abc"
    hook = notifier(outbox, urls=[URL, other])
    await hook.notify("approval.decided", {"step": "approve"})
    entries = await outbox.take(5)
    assert [e.delivery.url_ref for e in entries] == [url_reference(URL), url_reference(other)]
    assert len({e.delivery.delivery_id for e in entries}) == 1
    assert all(URL.encode() not in e.delivery.body for e in entries)
    assert hook.stats.queued == 2


class FailingOutbox(MemoryWebhookOutbox):
    async def append(self, deliveries: Sequence[Delivery]) -> int:
        raise LedgerUnavailableError("Redis is unreachable", reason="ledger.unreachable")


class HangingOutbox(MemoryWebhookOutbox):
    async def append(self, deliveries: Sequence[Delivery]) -> int:
        await asyncio.sleep(3600)
        return 0


@pytest.mark.parametrize("kind", ["unreachable", "hanging", "full"])
async def test_notify_never_raises_nor_waits_long(kind: str) -> None:
    outbox = {
        "unreachable": FailingOutbox,
        "hanging": HangingOutbox,
        "full": lambda: MemoryWebhookOutbox(max_size=1),
    }[kind]()
    hook = notifier(outbox, append_timeout=timedelta(milliseconds=100))
    if kind == "full":
        await hook.notify("approval.requested", {})  # fills it
    started = time.monotonic()
    await hook.notify("approval.requested", {})
    assert time.monotonic() - started < 1
    assert hook.stats.dropped == 1


class OneEntryOutbox(MemoryWebhookOutbox):
    """Hands out one scripted entry, then nothing."""

    def __init__(self, entry: OutboxEntry) -> None:
        super().__init__()
        self.entry = entry
        self.released: list[OutboxEntry] = []
        self.settled: list[OutboxEntry] = []
        self.handed = False
        self.done = asyncio.Event()

    async def take(self, limit: int) -> list[OutboxEntry]:
        if self.handed:
            await asyncio.sleep(3600)
        self.handed = True
        return [self.entry]

    async def settle(self, entry: OutboxEntry) -> None:
        self.settled.append(entry)
        self.done.set()

    def release(self, entry: OutboxEntry) -> None:
        self.released.append(entry)
        self.done.set()


@pytest.mark.parametrize(
    ("age", "outcome"), [(timedelta(seconds=10), "released"), (timedelta(hours=1), "dropped")]
)
async def test_a_delivery_for_a_url_not_configured_here(age: timedelta, outcome: str) -> None:
    """Within the grace it is handed back (a replica may know the URL); after it, dropped and
    counted."""
    unknown = delivery(ref=url_reference("https://gone.example.test/hook?token=old"))
    enqueued = int((NOW - age).timestamp() * 1000)
    outbox = OneEntryOutbox(OutboxEntry("1-0", unknown, enqueued))
    hook = notifier(outbox, unknown_url_grace=timedelta(minutes=5))
    task = asyncio.create_task(hook.run())
    try:
        await asyncio.wait_for(outbox.done.wait(), 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    got = "released" if outbox.released else "dropped"
    assert (got, hook.stats.unknown_url, hook.stats.handed_back) == (
        outcome,
        int(outcome == "dropped"),
        int(outcome == "released"),
    )
