"""Approval notifications as signed webhooks (aiohttp client). Satisfies
``core.ports.ApprovalNotifier``.

:meth:`WebhookNotifier.notify` only appends to an outbox (bounded: when it is full, or cannot
be reached, the notification is dropped, logged and counted) so the request path never waits
for a chat or ticketing system. :meth:`WebhookNotifier.run` delivers in the background with up
to ``concurrency`` deliveries at a time. The outbox is pluggable (:class:`WebhookOutbox`): the
broker uses the durable one on its Redis (``broker.adapters.redis_webhook_outbox``: delivered
at least once across stops, crashes and replicas); :class:`MemoryWebhookOutbox` keeps the
deliveries in this process (lost when it stops) for tests and embedders without Redis.

One delivery per event and URL::

    POST <url>
    Content-Type: application/json
    User-Agent: tasklease-webhook/1
    X-Tasklease-Event: approval.requested | approval.decided
    X-Tasklease-Delivery: dlv_<32 hex>      (the same on every retry, on every broker:
                                              deduplicate on it)
    X-Tasklease-Timestamp: <unix seconds>   (of this attempt)
    X-Tasklease-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

    {"id": "dlv_…", "type": "approval.requested", "time": "<RFC 3339>",
     "data": {"step": "request" | "approve" | "deny" | "withdraw", "by": "<principal>",
              "approval": {<GET /v1/approvals/{id}>, "links": {...}}}}

A receiver recomputes the HMAC over the timestamp header, a dot and the raw body bytes,
compares it in constant time, and refuses timestamps more than a few minutes old (each
attempt is signed afresh, so a late retry still carries a current timestamp).

Retries: a 5xx answer, 429, a timeout or a connection error is retried with full-jitter
exponential backoff (``uniform(0, min(cap, base * 2**(attempt - 1)))``) up to ``max_attempts``
in all (the outbox counts the attempts, so a restart does not reset them); any other answer
(2xx: delivered; 3xx: redirects are not followed; 4xx) ends the delivery.

Secrets: the HMAC secret and the URLs (chat webhook URLs are secrets too) are never logged and
never put in an outbox: a delivery names its URL by reference (:func:`url_reference`, the hex
SHA-256 of the URL) and its loggable label (:func:`url_label`: scheme, host and the first 12
hex digits of that hash); the URL is looked up among the configured ones when the delivery is
attempted, and the body is signed then. A delivery whose URL is not configured here is handed
back for ``unknown_url_grace`` (another replica may know the URL during a rolling change of
``webhook_urls``), then dropped, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import random
import secrets
import ssl
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import structlog

from broker.config import NotificationSettings
from broker.errors import ConfigurationError, LedgerUnavailableError

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


def url_reference(url: str) -> str:
    """How an outbox names a URL without holding it: the hex SHA-256 of the URL."""
    return hashlib.sha256(url.encode()).hexdigest()


def url_label(url: str) -> str:
    """A loggable name for a URL that may carry a secret: scheme, host, hash prefix."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}#{url_reference(url)[:12]}"


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
class Delivery:
    """One event for one URL, as :meth:`WebhookNotifier.notify` hands it to the outbox: the
    URL only by reference, the body as it will be signed (approval metadata, no secret)."""

    delivery_id: str
    event: str
    url_ref: str
    url_label: str
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A delivery taken from the outbox by this process (until it is settled or released)."""

    entry_id: str
    delivery: Delivery
    # When it entered the outbox (ms since the epoch), for the unknown-URL grace.
    enqueued_at_ms: int
    # Taken over from a consumer that held it past the visibility timeout (a dead broker).
    reclaimed: bool = False


class WebhookOutbox(Protocol):
    """Where deliveries wait. A taken entry stays with this process until :meth:`settle` (a
    final outcome) or :meth:`release`; an outbox shared by several processes gives an entry
    that its taker stopped holding (crash, stop, release) to another one."""

    @property
    def limit(self) -> int:
        """The most undelivered entries it keeps."""
        ...

    async def append(self, deliveries: Sequence[Delivery]) -> int:
        """Add the deliveries in order while there is room; how many were added (the first
        n). Raises :class:`LedgerUnavailableError` when the outbox cannot be reached."""
        ...

    async def take(self, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` entries for this process (waits a little for one; may return [])."""
        ...

    async def begin_attempt(self, entry: OutboxEntry) -> int | None:
        """Count one more attempt; its number (1 for the first, across restarts), or None when
        the entry is no longer this process's (settled or taken over elsewhere)."""
        ...

    async def settle(self, entry: OutboxEntry) -> None:
        """A final outcome: remove the entry (delivered, refused, given up or dropped)."""
        ...

    def release(self, entry: OutboxEntry) -> None:
        """Stop holding the entry without an outcome: it becomes available again (an outbox
        shared by processes: after its visibility timeout)."""
        ...

    async def maintain(self) -> None:
        """Background upkeep while :meth:`WebhookNotifier.run` runs (until cancelled)."""
        ...

    async def wait_empty(self) -> None:
        """Return once no entry is left (every delivery settled)."""
        ...


def _epoch_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryWebhookOutbox:  # satisfies WebhookOutbox
    """Deliveries in this process: an asyncio queue. Whatever is queued or being retried is
    lost when the process stops; for tests and for embedding without Redis."""

    def __init__(self, *, max_size: int = 1000) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._max = max_size
        # Unbounded underneath so that a released entry always fits back; ``append`` bounds it.
        self._queue: asyncio.Queue[OutboxEntry] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._attempts: dict[str, int] = {}

    @property
    def limit(self) -> int:
        """The most deliveries waiting (not counting those being attempted)."""
        return self._max

    async def append(self, deliveries: Sequence[Delivery]) -> int:
        """Queue while there is room."""
        added = 0
        for delivery in deliveries:
            if self._queue.qsize() >= self._max:
                break
            self._queue.put_nowait(OutboxEntry(str(next(self._ids)), delivery, _epoch_ms()))
            added += 1
        return added

    async def take(self, limit: int) -> list[OutboxEntry]:
        """Wait for one entry, then take what else is queued, up to ``limit``."""
        taken = [await self._queue.get()]
        while len(taken) < limit:
            try:
                taken.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return taken

    async def begin_attempt(self, entry: OutboxEntry) -> int | None:
        """Count in memory."""
        attempt = self._attempts.get(entry.entry_id, 0) + 1
        self._attempts[entry.entry_id] = attempt
        return attempt

    async def settle(self, entry: OutboxEntry) -> None:
        """Forget the entry."""
        self._attempts.pop(entry.entry_id, None)
        self._queue.task_done()

    def release(self, entry: OutboxEntry) -> None:
        """Queue the entry again (at the back)."""
        self._queue.put_nowait(entry)
        self._queue.task_done()

    async def maintain(self) -> None:
        """Nothing to keep up."""
        await asyncio.Event().wait()

    async def wait_empty(self) -> None:
        """Until every queued entry was settled."""
        await self._queue.join()


@dataclass
class DeliveryStats:
    """Counters of this process (for tests and /metrics)."""

    queued: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    # Dropped at delivery time because the URL is no longer configured (after the grace).
    unknown_url: int = 0
    # Handed back because the URL is not configured here (within the grace).
    handed_back: int = 0
    # Taken over from a consumer that stopped holding them (crash, stop).
    reclaimed: int = 0
    # Found settled or taken over by another process before an attempt.
    lost: int = 0


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
        outbox: WebhookOutbox | None = None,
        append_timeout: timedelta = timedelta(seconds=1),
        unknown_url_grace: timedelta = timedelta(minutes=5),
    ) -> None:
        if max_attempts < 1 or concurrency < 1 or queue_size < 1:
            raise ValueError("max_attempts, concurrency and queue_size must be positive")
        # Reference → URL: deliveries carry the reference; the URL never leaves this object.
        self._urls = {url_reference(url): url for url in urls}
        self._secret = secret
        self._now = now
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._base = backoff_base.total_seconds()
        self._cap = backoff_cap.total_seconds()
        self._concurrency = concurrency
        self._ssl = ssl_context
        self._rng = rng or random.SystemRandom()
        self._outbox: WebhookOutbox = (
            outbox if outbox is not None else MemoryWebhookOutbox(max_size=queue_size)
        )
        self._append_timeout = append_timeout.total_seconds()
        self._grace_ms = int(unknown_url_grace.total_seconds() * 1000)
        self.stats = DeliveryStats()

    @classmethod
    def from_settings(
        cls,
        settings: NotificationSettings,
        *,
        now: Callable[[], datetime],
        outbox: WebhookOutbox | None = None,
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
            outbox=outbox,
        )

    async def notify(self, event: str, data: Mapping[str, Any]) -> None:
        """Append one delivery per URL to the outbox. Waits at most ``append_timeout`` and
        never raises: a full or unreachable outbox drops the notification (logged, counted)."""
        delivery_id = f"dlv_{secrets.token_hex(16)}"
        body = json.dumps(
            {"id": delivery_id, "type": event, "time": self._now().isoformat(), "data": data},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        deliveries = [
            Delivery(delivery_id, event, ref, url_label(url), body)
            for ref, url in self._urls.items()
        ]
        try:
            async with asyncio.timeout(self._append_timeout):
                added = await self._outbox.append(deliveries)
        except LedgerUnavailableError as exc:
            added, why = 0, f"the outbox is unavailable ({exc.reason})"
        except TimeoutError:
            # The append may still have landed: then it is delivered (and counted) anyway.
            added, why = 0, f"the outbox did not answer within {self._append_timeout:g} s"
        else:
            why = f"the outbox holds {self._outbox.limit} deliveries already"
        self.stats.queued += added
        for delivery in deliveries[added:]:
            self.stats.dropped += 1
            _log.warning(
                "webhook.dropped",
                delivery_id=delivery_id,
                event_type=event,
                url=delivery.url_label,
                detail=why,
            )

    async def run(self) -> None:
        """Deliver until cancelled: one session, at most ``concurrency`` deliveries at once,
        each taken from the outbox only when a slot is free."""
        timeout = aiohttp.ClientTimeout(total=self._timeout.total_seconds())
        free = asyncio.Semaphore(self._concurrency)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            free.release()

        async with aiohttp.ClientSession(timeout=timeout) as session:
            upkeep = asyncio.create_task(self._outbox.maintain(), name="webhook-outbox-upkeep")
            failures = 0
            try:
                while True:
                    await free.acquire()
                    wanted = 1
                    while wanted < self._concurrency and not free.locked():
                        await free.acquire()  # a free slot: returns without suspending
                        wanted += 1
                    try:
                        entries = await self._outbox.take(wanted)
                    except LedgerUnavailableError as exc:
                        entries = []
                        failures += 1
                        delay = self._rng.uniform(0, min(self._cap, self._base * 2**failures))
                        _log.warning(
                            "webhook.outbox_unavailable",
                            reason=exc.reason,
                            retry_in_seconds=round(delay, 3),
                        )
                        await asyncio.sleep(delay)
                    else:
                        failures = 0
                    for _ in range(wanted - len(entries)):
                        free.release()
                    for entry in entries:
                        task = asyncio.create_task(
                            self._deliver(session, entry), name=f"webhook-{entry.entry_id}"
                        )
                        running.add(task)
                        task.add_done_callback(finished)
            finally:
                tasks = [upkeep, *running]
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def drain(self) -> None:
        """Wait until the outbox is empty: every delivery delivered or given up (tests)."""
        await self._outbox.wait_empty()

    async def _deliver(self, session: aiohttp.ClientSession, entry: OutboxEntry) -> None:
        if entry.reclaimed:
            self.stats.reclaimed += 1
        try:
            await self._deliver_entry(session, entry)
        except LedgerUnavailableError as exc:
            # The outcome could not be recorded: another try after the visibility timeout
            # (a delivered one may then be sent again; receivers deduplicate).
            self._outbox.release(entry)
            _log.warning(
                "webhook.outbox_unavailable",
                delivery_id=entry.delivery.delivery_id,
                reason=exc.reason,
                detail="the delivery stays in the outbox and is retried",
            )

    async def _deliver_entry(self, session: aiohttp.ClientSession, entry: OutboxEntry) -> None:
        delivery = entry.delivery
        url = self._urls.get(delivery.url_ref)
        if url is None:
            await self._unknown_url(entry)
            return
        label = url_label(url)
        outcome = "attempts exhausted"
        while True:
            attempt = await self._outbox.begin_attempt(entry)
            if attempt is None:
                self.stats.lost += 1
                _log.info("webhook.taken_over", delivery_id=delivery.delivery_id, url=label)
                return
            if attempt > self._max_attempts:
                # The last attempt was made before a restart; its outcome was not recorded.
                break
            outcome = await self._attempt(session, delivery, url)
            if outcome == "delivered":
                await self._outbox.settle(entry)
                self.stats.delivered += 1
                _log.info(
                    "webhook.delivered",
                    delivery_id=delivery.delivery_id,
                    event_type=delivery.event,
                    url=label,
                    attempts=attempt,
                )
                return
            if not outcome.startswith("retry:") or attempt >= self._max_attempts:
                break
            delay = self._rng.uniform(0, min(self._cap, self._base * 2 ** (attempt - 1)))
            self.stats.retries += 1
            _log.info(
                "webhook.retrying",
                delivery_id=delivery.delivery_id,
                url=label,
                attempt=attempt,
                why=outcome.removeprefix("retry:"),
                delay_seconds=round(delay, 3),
            )
            await asyncio.sleep(delay)
        await self._outbox.settle(entry)
        self.stats.failed += 1
        _log.warning(
            "webhook.failed",
            delivery_id=delivery.delivery_id,
            event_type=delivery.event,
            url=label,
            why=outcome.removeprefix("retry:"),
        )

    async def _unknown_url(self, entry: OutboxEntry) -> None:
        """A delivery for a URL this broker does not have (any more)."""
        delivery = entry.delivery
        age_ms = int(self._now().timestamp() * 1000) - entry.enqueued_at_ms
        if age_ms < self._grace_ms:
            # Maybe a replica with a newer (or older) webhook_urls knows it: let it take it.
            self._outbox.release(entry)
            self.stats.handed_back += 1
            _log.info(
                "webhook.url_unknown_here",
                delivery_id=delivery.delivery_id,
                url=delivery.url_label,
                detail="handed back for a replica that has this URL configured",
            )
            return
        await self._outbox.settle(entry)
        self.stats.unknown_url += 1
        _log.warning(
            "webhook.dropped_unknown_url",
            delivery_id=delivery.delivery_id,
            event_type=delivery.event,
            url=delivery.url_label,
            detail="the URL is not in notifications.webhook_urls any more",
        )

    async def _attempt(self, session: aiohttp.ClientSession, delivery: Delivery, url: str) -> str:
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
                url,
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
