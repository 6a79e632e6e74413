"""The durable webhook outbox: a Redis stream with a consumer group, next to the ledger (same
connection pool, same namespace). Satisfies ``webhook_notifier.WebhookOutbox``.

A notification accepted by ``WebhookNotifier.notify`` is in Redis when ``notify`` returns, and
is delivered at least once even if the broker that accepted it stops or is killed: any broker
process on the same Redis (a replica, or this one restarted) delivers it.

Key layout (``tl`` is the namespace; one hash tag, ``{wh}``, so every script touches one
Cluster slot)::

    tl:{wh}:outbox     stream  one entry per delivery (an event for one URL), fields
                               d → delivery id (dlv_…), e → event type,
                               u → URL reference (hex SHA-256 of the URL), l → URL label
                               (scheme://host#hash prefix, as the logs show it),
                               b → the JSON body that is signed at each attempt
                       group   ``webhooks``; one consumer per broker process
                               (``<host>-<pid>-<random>``)
    tl:{wh}:attempts   hash    entry id → attempts made so far

Never in Redis: a webhook URL (chat webhook URLs are secrets; a delivery finds its URL among
the configured ones by the reference) and the HMAC secret (each attempt is signed when it is
made). The body is the approval's public view (``core.approvals.approval_view``): ids, names,
states, decisions and comments, no credential.

Life of an entry: ``append`` adds it (a script: refused when the stream already holds
``max_backlog`` entries, so the backlog is bounded); a worker takes it with ``XREADGROUP``
(it is then pending for that consumer); before each attempt ``begin_attempt`` checks the entry
is still pending for this consumer and increments its attempt count; a final outcome
(delivered, refused, attempts exhausted, URL gone) acknowledges and deletes it and its count in
one transaction, so ``XLEN`` is the number of undelivered entries.

Why the attempt count lives in a hash beside the stream rather than in a re-added entry
(attempt + 1): the entry keeps its id, and so its place in the consumer group's pending list,
for its whole life. Re-adding would need an atomic "add the copy, acknowledge and delete the
original" at each retry, would reorder a retried delivery behind newer ones and would move the
entry out of the pending list while it waits for its backoff, where nobody could tell a
waiting entry from a lost one. The count is incremented *before* the attempt: a crash during
an attempt counts it, so a delivery is never tried more than ``max_attempts`` times in all.

Crash recovery: a consumer holds its entries (in flight, or waiting for their backoff) by
touching them (``XCLAIM … JUSTID``, only while still theirs) every third of ``visibility``.
An entry whose consumer stopped touching it (crashed, killed, stopped) is idle longer than
``visibility``, and the next ``XAUTOCLAIM`` of any live consumer takes it over, keeping its
attempt count. If the old holder is only slow (a long pause), it finds the entry no longer its
own at its next attempt and leaves it (``begin_attempt`` → None): in the normal case a
delivery is made once; after a takeover it may be made twice, with the same
``X-Tasklease-Delivery``, which receivers deduplicate on.

Consumers with nothing pending and idle longer than ``forget_consumers_after`` are deleted
(each broker start adds one); one with pending entries is never deleted, since that would
drop its entries from the group.

Durability: the entry is as durable as Redis's persistence makes any write (AOF; no
``WAITAOF`` per notification, unlike a lease activation).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from broker.adapters.audit_trail import default_writer_id
from broker.adapters.redis_common import RedisScript, redis_error_code, translated
from broker.adapters.webhook_notifier import Delivery, OutboxEntry
from broker.errors import LedgerUnavailableError

_log = structlog.get_logger("broker.webhooks")

GROUP: Final = "webhooks"
_FIELDS: Final = ("d", "e", "u", "l", "b")


# KEYS: stream. ARGV: max backlog, delivery id, event, body, then (reference, label) pairs.
_APPEND = RedisScript(
    "append",
    """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local added = 0
for i = 5, #ARGV, 2 do
  if added >= room then break end
  redis.call('XADD', KEYS[1], '*', 'd', ARGV[2], 'e', ARGV[3], 'u', ARGV[i], 'l', ARGV[i + 1],
             'b', ARGV[4])
  added = added + 1
end
return added
""",
)

# KEYS: stream, attempts. ARGV: group, consumer, entry id.
# -1: no longer pending (settled elsewhere); -2: pending for another consumer; else the
# number of this attempt.
_BEGIN_ATTEMPT = RedisScript(
    "begin_attempt",
    """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return -1 end
if p[1][2] ~= ARGV[2] then return -2 end
return redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
""",
)

# KEYS: stream. ARGV: group, consumer, entry ids. Touches the entries still pending for the
# consumer (resets their idle time); returns the others.
_KEEP = RedisScript(
    "keep",
    """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
""",
)

# KEYS: stream. ARGV: group, idle limit (ms), this consumer. Deletes consumers with nothing
# pending that were idle longer than the limit; returns how many.
_FORGET_CONSUMERS = RedisScript(
    "forget_consumers",
    """
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
""",
)


def _text(value: object) -> str:
    """A reply value as text (the ledger's client decodes replies; another may not)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _translated(operation: str) -> contextlib.AbstractContextManager[None]:
    return translated("the webhook outbox", operation)


class RedisWebhookOutbox:  # satisfies webhook_notifier.WebhookOutbox
    """The webhook outbox in Redis (see the module docstring)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        namespace: str,
        max_backlog: int,
        visibility: timedelta = timedelta(seconds=60),
        consumer: str | None = None,
        block: timedelta = timedelta(seconds=1),
        forget_consumers_after: timedelta = timedelta(hours=1),
    ) -> None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be positive")
        if visibility <= timedelta(0) or block <= timedelta(0):
            raise ValueError("visibility and block must be positive")
        self._redis = client
        self._stream = f"{namespace}:{{wh}}:outbox"
        self._attempts = f"{namespace}:{{wh}}:attempts"
        self._max = max_backlog
        self._visibility_ms = max(1, int(visibility.total_seconds() * 1000))
        self._block_ms = max(1, int(block.total_seconds() * 1000))
        self._forget_after_ms = int(forget_consumers_after.total_seconds() * 1000)
        self.consumer = consumer or default_writer_id()
        # Entries this process took and has not settled or released: kept alive by maintain().
        self._held: set[str] = set()
        self._group_ready = False
        self._cursor = "0-0"
        self._next_reclaim = 0.0

    @property
    def limit(self) -> int:
        """The most undelivered entries (in flight included) the stream keeps."""
        return self._max

    @property
    def keys(self) -> tuple[str, str]:
        """Every key the outbox writes (the stream, the attempt counts)."""
        return (self._stream, self._attempts)

    async def append(self, deliveries: Sequence[Delivery]) -> int:
        """Add the deliveries (all of one notification) while the backlog has room."""
        if not deliveries:
            return 0
        first = deliveries[0]
        args: list[str | int] = [self._max, first.delivery_id, first.event, first.body.decode()]
        for delivery in deliveries:
            args += [delivery.url_ref, delivery.url_label]
        with _translated("append"):
            return await self._script(_APPEND, [self._stream], args)

    async def take(self, limit: int) -> list[OutboxEntry]:
        """Entries abandoned by another consumer (idle past the visibility timeout) first,
        else new ones (waiting up to ``block``)."""
        with _translated("take"):
            if not self._group_ready:
                await self._create_group()
            try:
                entries = await self._reclaim(limit) or await self._read_new(limit)
            except redis.exceptions.ResponseError as exc:
                if redis_error_code(exc) != "NOGROUP":
                    raise
                # The stream or group was lost (Redis data loss): create it again.
                self._group_ready = False
                return []
        self._held.update(entry.entry_id for entry in entries)
        return entries

    async def begin_attempt(self, entry: OutboxEntry) -> int | None:
        """The attempt's number, or None (and no longer held) when the entry is not pending
        for this consumer any more."""
        with _translated("attempt count"):
            attempt = await self._script(
                _BEGIN_ATTEMPT,
                [self._stream, self._attempts],
                [GROUP, self.consumer, entry.entry_id],
            )
        if attempt < 1:
            self._held.discard(entry.entry_id)
            return None
        return attempt

    async def settle(self, entry: OutboxEntry) -> None:
        """Acknowledge and delete the entry and its attempt count (one transaction)."""
        with _translated("acknowledgement"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, GROUP, entry.entry_id)
                pipe.xdel(self._stream, entry.entry_id)
                pipe.hdel(self._attempts, entry.entry_id)
                await pipe.execute()
        self._held.discard(entry.entry_id)

    def release(self, entry: OutboxEntry) -> None:
        """Stop touching the entry: any consumer takes it over after the visibility timeout."""
        self._held.discard(entry.entry_id)

    async def maintain(self) -> None:
        """Every third of the visibility timeout: touch the held entries; now and then, forget
        consumers long gone. Redis errors are logged and the loop goes on."""
        interval = self._visibility_ms / 3000
        # Consumers are looked at about ten times per forget_consumers_after.
        forget_every = max(1, round(self._forget_after_ms / 10 / (interval * 1000)))
        tick = 0
        while True:
            await asyncio.sleep(interval)
            tick += 1
            try:
                await self.keep_alive()
                if tick % forget_every == 0:
                    await self.forget_idle_consumers()
            except LedgerUnavailableError as exc:
                _log.warning("webhook.outbox_upkeep_failed", reason=exc.reason)

    async def keep_alive(self) -> None:
        """Reset the idle time of the entries this process holds; forget those it lost."""
        held = sorted(self._held)
        if not held:
            return
        with _translated("keep-alive"):
            reply = await self._eval(_KEEP, [self._stream], [GROUP, self.consumer, *held])
        for entry_id in reply or []:
            self._held.discard(_text(entry_id))

    async def forget_idle_consumers(self) -> int:
        """Delete the group's consumers that hold nothing and were idle past the limit."""
        with _translated("consumer clean-up"):
            try:
                removed = await self._script(
                    _FORGET_CONSUMERS,
                    [self._stream],
                    [GROUP, self._forget_after_ms, self.consumer],
                )
            except redis.exceptions.ResponseError as exc:
                if redis_error_code(exc) != "NOGROUP":
                    raise
                return 0
        if removed:
            _log.info("webhook.outbox_consumers_forgotten", count=removed)
        return removed

    async def backlog(self) -> int:
        """Undelivered entries (in flight included)."""
        with _translated("length"):
            return int(await self._redis.xlen(self._stream))

    async def wait_empty(self) -> None:
        """Poll until no entry is left (other processes settle entries too: nothing here
        could be awaited instead)."""
        while True:
            if not await self.backlog():
                return
            await asyncio.sleep(0.05)

    # ---- internals

    async def _create_group(self) -> None:
        try:
            # From the start of the stream ("0"): entries appended before the group existed
            # (a Redis that lost the group) are delivered too.
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if redis_error_code(exc) != "BUSYGROUP":
                raise
        self._group_ready = True
        _log.info("webhook.outbox_consumer", consumer=self.consumer)

    async def _reclaim(self, limit: int) -> list[OutboxEntry]:
        """XAUTOCLAIM entries idle past the visibility timeout: a full pass over the pending
        list at most every ``visibility / 4``."""
        if time.monotonic() < self._next_reclaim:
            return []
        reply = await self._redis.xautoclaim(
            self._stream,
            GROUP,
            self.consumer,
            min_idle_time=self._visibility_ms,
            start_id=self._cursor,
            count=limit,
        )
        self._cursor = _text(reply[0])
        if self._cursor == "0-0":
            self._next_reclaim = time.monotonic() + self._visibility_ms / 4000
        entries = await self._entries(reply[1], reclaimed=True)
        if entries:
            _log.info(
                "webhook.reclaimed",
                consumer=self.consumer,
                deliveries=[entry.delivery.delivery_id for entry in entries],
            )
        return entries

    async def _read_new(self, limit: int) -> list[OutboxEntry]:
        reply: Any = await self._redis.xreadgroup(
            GROUP, self.consumer, {self._stream: ">"}, count=limit, block=self._block_ms
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            batches = list(reply.values())
            messages = [m for batch in batches for m in (batch[0] if batch else [])]
        else:
            messages = [m for _, batch in reply for m in batch]
        return await self._entries(messages, reclaimed=False)

    async def _entries(self, messages: Sequence[Any], *, reclaimed: bool) -> list[OutboxEntry]:
        """Parse stream messages; settle (drop) malformed ones at once."""
        entries = []
        for raw_id, raw_fields in messages:
            if raw_id is None:
                continue
            entry_id = _text(raw_id)
            fields = {_text(k): _text(v) for k, v in (raw_fields or {}).items()}
            if any(not fields.get(name) for name in _FIELDS):
                _log.warning("webhook.outbox_malformed_entry", entry_id=entry_id)
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.xack(self._stream, GROUP, entry_id)
                    pipe.xdel(self._stream, entry_id)
                    pipe.hdel(self._attempts, entry_id)
                    await pipe.execute()
                continue
            delivery = Delivery(
                delivery_id=fields["d"],
                event=fields["e"],
                url_ref=fields["u"],
                url_label=fields["l"],
                body=fields["b"].encode(),
            )
            enqueued_ms = int(entry_id.split("-", 1)[0])
            entries.append(OutboxEntry(entry_id, delivery, enqueued_ms, reclaimed=reclaimed))
        return entries

    async def _eval(
        self, script: RedisScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        return await script.run(self._redis, keys, args)

    async def _script(
        self, script: RedisScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> int:
        return int(await self._eval(script, keys, args))
