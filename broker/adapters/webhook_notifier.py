"""Approval notifications as signed webhooks (aiohttp client). Satisfies
``core.ports.ApprovalNotifier``.

:meth:`WebhookNotifier.notify` only queues (a bounded queue; when it is full the notification is
dropped, logged and counted) so the request path never waits for a chat or ticketing system.
:meth:`WebhookNotifier.run` delivers in the background with ``concurrency`` workers.

One delivery per event and URL::

    POST <url>
    Content-Type: application/json
    User-Agent: tasklease-webhook/1
    X-Tasklease-Event: approval.requested | approval.decided
    X-Tasklease-Delivery: dlv_<32 hex>      (the same on every retry: deduplicate on it)
    X-Tasklease-Timestamp: <unix seconds>   (of this attempt)
    X-Tasklease-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

    {"id": "dlv_…", "type": "approval.requested", "time": "<RFC 3339>",
     "data": {"step": "request" | "approve" | "deny" | "withdraw", "by": "<principal>",
              "approval": {<GET /v1/approvals/{id}>, "links": {...}}}}

A receiver recomputes the HMAC over the timestamp header, a dot and the raw body bytes,
compares it in constant time, and refuses timestamps more than a few minutes old (each
attempt is signed afresh, so a late retry still carries a current timestamp).

Retries: a 5xx answer, 429, a timeout or a connection error is retried with full-jitter
exponential backoff (``uniform(0, min(cap, base * 2**attempt))``) up to ``max_attempts``; any
other answer (2xx: delivered; 3xx: redirects are not followed; 4xx) ends the delivery. The
HMAC secret and the URLs (chat webhook URLs are secrets too) are never logged: logs name the
URL by scheme, host and the first 12 hex digits of its SHA-256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import secrets
import ssl
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import structlog

from broker.config import NotificationSettings
from broker.errors import ConfigurationError

_log = structlog.get_logger("broker.webhooks")

SIGNATURE_HEADER: Final = "X-Tasklease-Signature"
TIMESTAMP_HEADER: Final = "X-Tasklease-Timestamp"
DELIVERY_HEADER: Final = "X-Tasklease-Delivery"
EVENT_HEADER: Final = "X-Tasklease-Event"
MIN_SECRET_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 4096


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value: ``v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"v1={digest.hexdigest()}"


def verify_signature(
    secret: bytes,
    *,
    timestamp: str,
    body: bytes,
    signature: str,
    now: float,
    tolerance_seconds: float = 300,
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def url_label(url: str) -> str:
    """A loggable name for a URL that may carry a secret: scheme, host, hash prefix."""
    parts = urlsplit(url)
    fingerprint = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{parts.scheme}://{parts.hostname or '?'}#{fingerprint}"


class WebhookSecret:
    """The HMAC key. Its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not MIN_SECRET_BYTES <= len(value) <= MAX_SECRET_BYTES:
            raise ConfigurationError(
                f"the webhook secret must be {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes, got "
                f"{len(value)} (generate one with: openssl rand -hex 32)"
            )
        self._value = value

    def reveal(self) -> bytes:
        """The key bytes (for signing only)."""
        return self._value

    def __repr__(self) -> str:
        return "WebhookSecret(**********)"

    __str__ = __repr__


def load_webhook_secret(
    settings: NotificationSettings, *, environ: Mapping[str, str] | None = None
) -> WebhookSecret:
    """Read the secret from ``webhook_secret_file`` or the variable ``webhook_secret_env``.

    Surrounding whitespace (a trailing newline) is stripped. A secret file readable by other
    users is refused: the key must not be world-readable.
    """
    env = os.environ if environ is None else environ
    if settings.webhook_secret_file:
        path = Path(settings.webhook_secret_file)
        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"notifications.webhook_secret_file {str(path)!r} cannot be read: "
                f"{type(exc).__name__}"
            ) from None
        if mode & stat.S_IROTH:
            raise ConfigurationError(
                f"notifications.webhook_secret_file {str(path)!r} is readable by every user; "
                "chmod 600 it"
            )
        return WebhookSecret(raw.strip())
    name = settings.webhook_secret_env
    value = env.get(name, "") if name else ""
    if not value:
        raise ConfigurationError(
            f"notifications.webhook_secret_env names {name!r}, which is not set or empty"
        )
    return WebhookSecret(value.strip().encode())


@dataclass(frozen=True, slots=True)
class _Delivery:
    delivery_id: str
    event: str
    url: str = field(repr=False)
    body: bytes = field(repr=False)


@dataclass
class DeliveryStats:
    """Counters (for tests and /metrics)."""

    queued: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0


class WebhookNotifier:  # satisfies core.ports.ApprovalNotifier
    """Signs and POSTs approval events to the configured URLs, in the background."""

    def __init__(
        self,
        *,
        urls: Sequence[str],
        secret: WebhookSecret,
        now: Callable[[], datetime],
        timeout: timedelta = timedelta(seconds=5),
        max_attempts: int = 6,
        backoff_base: timedelta = timedelta(seconds=0.5),
        backoff_cap: timedelta = timedelta(seconds=30),
        queue_size: int = 1000,
        concurrency: int = 4,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1 or concurrency < 1 or queue_size < 1:
            raise ValueError("max_attempts, concurrency and queue_size must be positive")
        self._urls = tuple(urls)
        self._secret = secret
        self._now = now
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._base = backoff_base.total_seconds()
        self._cap = backoff_cap.total_seconds()
        self._concurrency = concurrency
        self._ssl = ssl_context
        self._rng = rng or random.SystemRandom()
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_size)
        self.stats = DeliveryStats()

    @classmethod
    def from_settings(
        cls, settings: NotificationSettings, *, now: Callable[[], datetime]
    ) -> WebhookNotifier:
        """Build from ``[notifications]``; reads the secret (file or environment)."""
        context = None
        if settings.webhook_ca_file:
            context = ssl.create_default_context(cafile=settings.webhook_ca_file)
        return cls(
            urls=[url.get_secret_value() for url in settings.webhook_urls],
            secret=load_webhook_secret(settings),
            now=now,
            timeout=timedelta(seconds=settings.timeout_seconds),
            max_attempts=settings.max_attempts,
            backoff_base=timedelta(seconds=settings.backoff_base_seconds),
            backoff_cap=timedelta(seconds=settings.backoff_cap_seconds),
            queue_size=settings.queue_size,
            concurrency=settings.concurrency,
            ssl_context=context,
        )

    def notify(self, event: str, data: Mapping[str, Any]) -> None:
        """Queue one delivery per URL; never waits (a full queue drops and logs)."""
        delivery_id = f"dlv_{secrets.token_hex(16)}"
        body = json.dumps(
            {"id": delivery_id, "type": event, "time": self._now().isoformat(), "data": data},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        for url in self._urls:
            try:
                self._queue.put_nowait(_Delivery(delivery_id, event, url, body))
            except asyncio.QueueFull:
                self.stats.dropped += 1
                _log.warning(
                    "webhook.dropped",
                    delivery_id=delivery_id,
                    event_type=event,
                    url=url_label(url),
                    detail=f"the queue holds {self._queue.maxsize} deliveries already",
                )
            else:
                self.stats.queued += 1

    async def run(self) -> None:
        """Deliver until cancelled (one session, ``concurrency`` workers)."""
        timeout = aiohttp.ClientTimeout(total=self._timeout.total_seconds())
        async with aiohttp.ClientSession(timeout=timeout) as session:
            workers = [
                asyncio.create_task(self._worker(session), name=f"webhook-worker-{i}")
                for i in range(self._concurrency)
            ]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                for worker in workers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await worker

    async def drain(self) -> None:
        """Wait until every queued delivery was delivered or given up (tests, shutdown)."""
        await self._queue.join()

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(session, delivery)
            finally:
                self._queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, delivery: _Delivery) -> None:
        label = url_label(delivery.url)
        for attempt in range(self._max_attempts):
            outcome = await self._attempt(session, delivery)
            if outcome == "delivered":
                self.stats.delivered += 1
                _log.info(
                    "webhook.delivered",
                    delivery_id=delivery.delivery_id,
                    event_type=delivery.event,
                    url=label,
                    attempts=attempt + 1,
                )
                return
            if not outcome.startswith("retry:"):
                break
            if attempt + 1 < self._max_attempts:
                delay = self._rng.uniform(0, min(self._cap, self._base * 2**attempt))
                self.stats.retries += 1
                _log.info(
                    "webhook.retrying",
                    delivery_id=delivery.delivery_id,
                    url=label,
                    attempt=attempt + 1,
                    why=outcome.removeprefix("retry:"),
                    delay_seconds=round(delay, 3),
                )
                await asyncio.sleep(delay)
        self.stats.failed += 1
        _log.warning(
            "webhook.failed",
            delivery_id=delivery.delivery_id,
            event_type=delivery.event,
            url=label,
            why=outcome.removeprefix("retry:"),
        )

    async def _attempt(self, session: aiohttp.ClientSession, delivery: _Delivery) -> str:
        """``delivered``, ``retry:<why>`` or ``<why>`` (give up)."""
        timestamp = str(int(self._now().timestamp()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tasklease-webhook/1",
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: delivery.delivery_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret.reveal(), timestamp, delivery.body),
        }
        try:
            async with session.post(
                delivery.url,
                data=delivery.body,
                headers=headers,
                allow_redirects=False,
                ssl=self._ssl if self._ssl is not None else True,
            ) as response:
                status = response.status
        except TimeoutError:
            return "retry:timeout"
        except aiohttp.ClientError as exc:
            return f"retry:{type(exc).__name__}"
        if 200 <= status < 300:
            return "delivered"
        if status >= 500 or status == 429:
            return f"retry:HTTP {status}"
        return f"HTTP {status}"
