"""Approval webhooks delivered to a real aiohttp receiver on 127.0.0.1: signed JSON, retried
with backoff on 5xx and timeouts, delivered in the background, secret never logged."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr, ValidationError

from broker.adapters.webhook_notifier import (
    WebhookNotifier,
    WebhookSecret,
    load_webhook_secret,
    url_label,
    verify_signature,
)
from broker.config import NotificationSettings
from broker.errors import ConfigurationError
from tests.conftest import LOG_DIR, remember_secret

SECRET = remember_secret("whsec-" + "7f3a9c" * 8)


@dataclass
class Receiver:
    """A webhook endpoint whose answers the test scripts; it checks every signature."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Tasklease-Timestamp"]
        signature = request.headers["X-Tasklease-Signature"]
        # Verified independently of the code under test, then with its helper.
        expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
        valid = hmac.compare_digest(signature, f"v1={expected.hexdigest()}")
        assert valid == verify_signature(
            SECRET.encode(), timestamp=timestamp, body=body, signature=signature, now=time.time()
        )
        self.received.append(
            {
                "valid": valid,
                "event": request.headers["X-Tasklease-Event"],
                "delivery": request.headers["X-Tasklease-Delivery"],
                "content_type": request.headers["Content-Type"],
                "body": json.loads(body),
            }
        )
        self.arrived.set()
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        return web.Response(status=self.answers.pop(0) if self.answers else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/approvals", hook.handle)
    # No access log: the receiver would log the secret-bearing URL of the last test.
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}/hooks/approvals"
    try:
        yield hook
    finally:
        await runner.cleanup()


Start = Callable[[WebhookNotifier], None]


@pytest.fixture
async def running() -> AsyncIterator[Start]:
    """``running(notifier)`` delivers in the background until the test ends."""
    tasks: list[asyncio.Task[None]] = []

    def start(notifier: WebhookNotifier) -> None:
        tasks.append(asyncio.create_task(notifier.run()))

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def notifier(url: str, **overrides: Any) -> WebhookNotifier:
    settings: dict[str, Any] = {
        "urls": [url],
        "secret": WebhookSecret(SECRET.encode()),
        "now": lambda: datetime.now(UTC),
        "timeout": timedelta(seconds=1),
        "max_attempts": 4,
        "backoff_base": timedelta(milliseconds=20),
        "backoff_cap": timedelta(milliseconds=200),
        "rng": random.Random(7),
    }
    settings.update(overrides)
    return WebhookNotifier(**settings)


DATA = {"step": "request", "by": "spiffe://tasklease.test/agent/demo", "approval": {"id": "apr_1"}}


async def test_a_signed_json_event_is_delivered(receiver: Receiver, running: Start) -> None:
    hook = notifier(receiver.url)
    running(hook)
    await hook.notify("approval.requested", DATA)
    await asyncio.wait_for(hook.drain(), 10)
    (got,) = receiver.received
    assert (got["valid"], got["event"], got["content_type"]) == (
        True,
        "approval.requested",
        "application/json",
    )
    assert got["body"]["type"] == "approval.requested"
    assert got["body"]["id"] == got["delivery"]
    assert got["body"]["data"] == DATA
    assert (hook.stats.delivered, hook.stats.failed, hook.stats.retries) == (1, 0, 0)


async def test_a_500_is_retried_with_the_same_delivery_id(
    receiver: Receiver, running: Start
) -> None:
    receiver.answers = [500, 502]
    hook = notifier(receiver.url)
    running(hook)
    await hook.notify("approval.decided", DATA)
    await asyncio.wait_for(hook.drain(), 10)
    assert len(receiver.received) == 3
    assert all(r["valid"] for r in receiver.received)
    assert len({r["delivery"] for r in receiver.received}) == 1
    assert (hook.stats.delivered, hook.stats.retries) == (1, 2)


async def test_a_timeout_is_retried(receiver: Receiver, running: Start) -> None:
    receiver.delays = [2.0]
    hook = notifier(receiver.url, timeout=timedelta(milliseconds=300))
    running(hook)
    await hook.notify("approval.decided", DATA)
    await asyncio.wait_for(hook.drain(), 10)
    assert len(receiver.received) == 2
    assert (hook.stats.delivered, hook.stats.retries) == (1, 1)


@pytest.mark.parametrize(
    ("answers", "attempts"),
    [([400], 1), ([503] * 10, 3)],
    ids=["4xx-not-retried", "5xx-until-max-attempts"],
)
async def test_giving_up(
    receiver: Receiver, running: Start, answers: list[int], attempts: int
) -> None:
    receiver.answers = list(answers)
    hook = notifier(receiver.url, max_attempts=3)
    running(hook)
    await hook.notify("approval.decided", DATA)
    await asyncio.wait_for(hook.drain(), 10)
    assert len(receiver.received) == attempts
    assert (hook.stats.delivered, hook.stats.failed) == (0, 1)


async def test_an_unreachable_receiver_is_retried_then_given_up(
    running: Start,
) -> None:
    hook = notifier("http://127.0.0.1:9/nothing-listens-here", max_attempts=2)
    running(hook)
    await hook.notify("approval.decided", DATA)
    await asyncio.wait_for(hook.drain(), 10)
    assert (hook.stats.failed, hook.stats.retries) == (1, 1)


async def test_notify_never_waits_and_the_queue_is_bounded(
    receiver: Receiver, running: Start
) -> None:
    receiver.delays = [0.5, 0.5, 0.5]
    hook = notifier(receiver.url, queue_size=2, concurrency=1)
    running(hook)
    started = time.monotonic()
    await hook.notify("approval.requested", DATA)
    await asyncio.wait_for(receiver.arrived.wait(), 5)  # the worker holds the first one
    for _ in range(3):
        await hook.notify("approval.requested", DATA)
    assert time.monotonic() - started < 0.5  # nobody waited for the slow receiver
    assert (hook.stats.queued, hook.stats.dropped) == (3, 1)
    await asyncio.wait_for(hook.drain(), 10)
    assert hook.stats.delivered == 3


async def test_the_secret_and_the_url_path_are_never_logged(
    receiver: Receiver, running: Start
) -> None:
    receiver.answers = [500]
    secret_url = receiver.url + "?token=" + remember_secret("T0k3n-in-a-chat-webhook-url")
    hook = notifier(secret_url)
    running(hook)
    await hook.notify("approval.requested", DATA)
    await asyncio.wait_for(hook.drain(), 10)
    assert hook.stats.delivered == 1
    log = (LOG_DIR / "broker.jsonl").read_text()
    assert url_label(secret_url) in log
    assert "T0k3n-in-a-chat-webhook-url" not in log
    assert SECRET not in log
    assert SECRET not in repr(WebhookSecret(SECRET.encode()))


# --------------------------------------------------------------------------- configuration


def settings(**values: Any) -> NotificationSettings:
    return NotificationSettings(**values)


def test_the_secret_comes_from_a_private_file_or_the_environment(tmp_path: Path) -> None:
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    urls = (SecretStr("https://hooks.example.test/approvals"),)
    from_file = load_webhook_secret(
        settings(webhook_urls=urls, webhook_secret_file=str(secret_file))
    )
    assert from_file.reveal() == SECRET.encode()
    secret_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by every user"):
        load_webhook_secret(settings(webhook_urls=urls, webhook_secret_file=str(secret_file)))
    from_env = settings(webhook_urls=urls, webhook_secret_env="HOOK_SECRET")
    assert load_webhook_secret(from_env, environ={"HOOK_SECRET": SECRET}).reveal() == (
        SECRET.encode()
    )
    with pytest.raises(ConfigurationError, match="not set"):
        load_webhook_secret(from_env, environ={})
    with pytest.raises(ConfigurationError, match="16-4096 bytes"):
        load_webhook_secret(from_env, environ={"HOOK_SECRET": "short"})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webhook_urls": ["http://hooks.example.test/x"], "webhook_secret_env": "S"}, "loopback"),
        ({"webhook_urls": ["ftp://127.0.0.1/x"], "webhook_secret_env": "S"}, "https://"),
        ({"webhook_urls": ["https://hooks.example.test/x"]}, "exactly one"),
        (
            {
                "webhook_urls": ["https://hooks.example.test/x"],
                "webhook_secret_env": "S",
                "webhook_secret_file": "/f",
            },
            "exactly one",
        ),
        ({"webhook_secret": SECRET}, "Extra inputs"),
    ],
    ids=["http-remote", "other-scheme", "no-secret", "two-secrets", "inline-secret"],
)
def test_bad_notification_settings(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(**values)
