"""The audit trail in Redis: a stream sink (written by the chain writer) and the reader behind
``GET /v1/audit`` and ``tasklease audit``.

Keys (``S`` is ``audit.redis.stream``, default ``tl:audit``; ``W`` a run id)::

    S              stream  every record: one entry per group commit, fields ``r0``, ``r1``, …
                           = the records' JSON lines in chain order; the copy that is verified
                           (per writer: ``tasklease audit verify``)
    S:run:W        stream  a copy of the records of run W (and of a forced revocation that
                           addressed W), one entry per group commit: a run's story is one XRANGE

One group commit is one pipeline of two commands for the usual batch (one run): an XADD to
``S`` and an XADD to each run's stream touched; the runs' expiry is refreshed at most hourly.
Stream entry ids come from the Redis server clock; event times from the broker's.

Retention. The main stream never expires as a key; by default it is never trimmed either.

* ``audit.redis.retention_days`` (``retention``): the XADD to ``S`` carries ``MINID ~ <stream
  id of now - retention>`` (Redis >= 6.2, checked by :meth:`RedisStreamAuditSink.probe`), so
  each group commit drops the entries older than the retention. ``~`` trims whole radix-tree
  nodes only (up to ``stream-node-max-entries``, 100 by default, or ``stream-node-max-bytes``
  of entries): O(1) amortized, and a few entries past the retention may stay until their node
  is entirely older. The cut is computed from the broker's clock, the ids come from Redis's: a
  skew of minutes moves a cut measured in days by minutes.
* ``audit.redis.maxlen``: ``MAXLEN ~ maxlen`` (it counts entries, i.e. group commits). Redis
  takes one trimming strategy per XADD, so with both set the XADD carries ``MINID ~`` and an
  ``XTRIM S MAXLEN ~ maxlen`` follows in the same pipeline: whichever bound is tighter wins.
* A run's copy expires ``index_ttl_days`` after its last write, or ``retention_days`` when
  that is shorter, so it does not outlive the main stream's copy of its records (the expiry
  is refreshed at most hourly: a run's copy may go up to an hour before the main stream's
  copy of its last records).

A trimmed main stream verifies with ``tasklease audit verify --allow-trimmed-head`` (each
writer's chain then starts after seq 0); :meth:`RedisAuditReader.head` tells whether a stream
lost its head to trimming.

Queries: by run read the run's stream — O(events of the run); the use case turns a credential
into its run through the ledger. Anything else (actor, type, time range; a credential the
ledger no longer knows) scans the main stream from the cursor, or from the stream id of
``since`` minus a clock margin, stopping at ``limit`` matches or after ``scan_budget`` records;
the page then carries a cursor to go on (``<entry id>`` or ``<entry id>.<record index>``). A
page may hold fewer than ``limit`` records and still have a next cursor.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from broker.adapters.audit_sinks import SealedRecord
from broker.adapters.clock import SystemClock
from broker.adapters.redis_common import redis_error_code
from broker.core.audit import AuditPage, AuditQuery, record_runs
from broker.errors import AuditUnavailableError, BadRequestError

_CURSOR: Final = re.compile(r"([0-9]{1,20}-[0-9]{1,20})(?:\.([0-9]{1,6}))?")
_FIELD: Final = re.compile(r"r([0-9]{1,6})")
# Redis assigns stream ids from its own clock; widen time bounds by this much before the exact
# filter on the record's time.
_CLOCK_MARGIN: Final = timedelta(minutes=5)
_CHUNK: Final = 256
# How often the sink refreshes the expiry of a run stream it keeps writing to, and how many
# such keys it remembers.
_REFRESH_SECONDS: Final = 3600.0
_MAX_INDEXED: Final = 100_000
# After a cut connection: how far back to look for an entry that may have landed.
_LANDED_WINDOW: Final = 256
# XADD ... MINID appeared in Redis 6.2.
_MINID_SINCE: Final = (6, 2)
_VERSION: Final = re.compile(r"([0-9]+)\.([0-9]+)")


def run_copy_ttl(index_ttl: timedelta, retention: timedelta | None) -> timedelta:
    """How long a run's copy lives after its last record: ``index_ttl``, and no longer than
    the main stream's ``retention`` (None or zero: kept forever)."""
    if retention is None or retention <= timedelta(0):
        return index_ttl
    return min(index_ttl, retention)


def run_stream_key(stream: str, workflow_id: str) -> str:
    """The stream holding the copies of run ``workflow_id``'s records (``S:run:W``)."""
    return f"{stream}:run:{workflow_id}"


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def _translated(operation: str, exc: Exception) -> AuditUnavailableError:
    code = redis_error_code(exc)  # the Redis error code (WRONGTYPE, NOPERM, OOM, …), TLS's
    return AuditUnavailableError(
        f"the audit stream in Redis failed on {operation} ({code})", reason="audit.redis_failed"
    )


class RedisStreamAuditSink:
    """Writes each batch of chained records to the audit streams in one pipeline."""

    name = "redis"

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        stream: str = "tl:audit",
        durable: bool = True,
        maxlen: int = 0,
        retention: timedelta | None = None,
        index_ttl: timedelta = timedelta(days=90),
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._redis = client
        self.stream = stream
        self.durable = durable
        self._maxlen = maxlen
        # None (or zero): the main stream keeps every entry (unless maxlen).
        self.retention = retention if retention and retention > timedelta(0) else None
        self.run_ttl = run_copy_ttl(index_ttl, self.retention)
        self._ttl = max(int(self.run_ttl.total_seconds()), 1)
        self._now = now or SystemClock().now
        self._minid_checked = False
        # Run streams whose expiry this process refreshed lately, with when: at most once per
        # _REFRESH_SECONDS, not per batch. Bounded; forgetting one costs one more EXPIRE.
        self._indexed: dict[str, float] = {}

    def run_key(self, workflow_id: str) -> str:
        """The stream holding the copies of one run's records."""
        return run_stream_key(self.stream, workflow_id)

    async def write(self, records: Sequence[SealedRecord]) -> None:
        """One entry with every record on the main stream, one per run touched, in one
        pipeline."""
        by_run: dict[str, list[str]] = {}
        for sealed in records:
            for run in record_runs(sealed.record):
                by_run.setdefault(run, []).append(sealed.line)
        entries: list[tuple[str, dict[Any, Any]]] = [
            (self.stream, {f"r{index}": sealed.line for index, sealed in enumerate(records)})
        ]
        for run, lines in by_run.items():
            entries.append(
                (self.run_key(run), {f"r{index}": line for index, line in enumerate(lines)})
            )
        now = time.monotonic()
        refresh = [key for key in map(self.run_key, by_run) if self._stale(key, now)]
        try:
            results = await self._append(entries, refresh)
        except (redis.exceptions.ConnectionError, OSError) as cut:
            # A pooled connection died (Redis restarted or failed over): append once more on
            # a fresh one what did not land, so no entry is written twice (a duplicate would
            # read as an inserted record to the verifier). Not when no connection could be
            # made at all (redis-py says "… connecting to …"): Redis is down, retrying waits
            # for nothing.
            if "connecting to" in str(cut):
                raise _translated("XADD", cut) from cut
            try:
                missing = [e for e in entries if not await self._landed(*e)]
                results = await self._append(missing, refresh)
            except (redis.exceptions.RedisError, OSError) as exc:
                raise _translated("XADD", exc) from cut
        except redis.exceptions.RedisError as exc:
            raise _translated("XADD", exc) from exc
        for result in results:
            if isinstance(result, Exception):
                raise _translated("XADD", result) from result
        if len(self._indexed) > _MAX_INDEXED:
            self._indexed.clear()
        for key in refresh:
            self._indexed[key] = now

    def _min_id(self) -> str | None:
        """The stream id below which the main stream's entries are past the retention.

        Stream ids are the Redis server's clock, this is the broker's: a skew of a few minutes
        moves a cut measured in days by those minutes, which does not matter."""
        if self.retention is None:
            return None
        return f"{_stream_id(self._now() - self.retention, margin=timedelta(0))}-0"

    async def _append(
        self, entries: Sequence[tuple[str, dict[Any, Any]]], refresh: Sequence[str]
    ) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        min_id = self._min_id()
        for key, entry in entries:
            if key != self.stream:
                pipe.xadd(key, entry)
            elif min_id is not None:
                pipe.xadd(key, entry, minid=min_id, approximate=True)
                if self._maxlen:  # one strategy per XADD: the other one as its own XTRIM
                    pipe.xtrim(key, maxlen=self._maxlen, approximate=True)
            elif self._maxlen:
                pipe.xadd(key, entry, maxlen=self._maxlen, approximate=True)
            else:
                pipe.xadd(key, entry)
        for key in refresh:
            pipe.expire(key, self._ttl)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _landed(self, key: str, entry: Mapping[Any, Any]) -> bool:
        """Whether ``entry`` is among the last entries of ``key`` (its first record is unique:
        it carries its writer, sequence number and hash)."""
        recent = await self._redis.xrevrange(key, count=_LANDED_WINDOW) or []
        first = entry["r0"]
        return any(_text((fields or {}).get("r0")) == first for _, fields in recent)

    def _stale(self, key: str, now: float) -> bool:
        written = self._indexed.get(key)
        return written is None or now - written > _REFRESH_SECONDS

    @property
    def bounds(self) -> str:
        """What the main stream keeps, in words (for the start-up log and readiness)."""
        kept = []
        if self.retention is not None:
            kept.append(f"{_days(self.retention)} (MINID ~)")
        if self._maxlen:
            kept.append(f"{self._maxlen} entries (MAXLEN ~)")
        return " and ".join(kept) or "every entry (never trimmed)"

    async def probe(self) -> str:
        """Redis answers, the stream key is a stream (or absent), and with a retention the
        server knows ``XADD … MINID`` (checked once)."""
        try:
            kind = await self._redis.type(self.stream)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise _translated("TYPE", exc) from exc
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind not in ("stream", "none"):
            raise AuditUnavailableError(
                f"the audit stream key {self.stream!r} holds a {kind}, not a stream",
                reason="audit.redis_failed",
            )
        if self.retention is not None and not self._minid_checked:
            await self._check_minid()
        return f"stream {self.stream}, keeps {self.bounds}"

    async def _check_minid(self) -> None:
        """Refuse a server without ``XADD … MINID``: every write would fail on it."""
        try:
            server = await self._redis.info("server")
        except (redis.exceptions.RedisError, OSError) as exc:
            raise _translated("INFO", exc) from exc
        version = str(server.get("redis_version", ""))
        found = _VERSION.match(version)
        if found is not None and (int(found[1]), int(found[2])) < _MINID_SINCE:
            raise AuditUnavailableError(
                f"audit.redis.retention_days needs Redis >= 6.2 (XADD MINID); this server is "
                f"Redis {version}: upgrade it, or set retention_days = 0",
                reason="audit.redis_failed",
            )
        self._minid_checked = True

    async def close(self) -> None:
        """The client belongs to the ledger, which closes it."""


def _stream_id(moment: datetime, *, margin: timedelta) -> int:
    return max(int((moment + margin).timestamp() * 1000), 0)


def _days(span: timedelta) -> str:
    days = span / timedelta(days=1)
    return f"{days:g} day{'' if days == 1 else 's'}"


def _id_tuple(value: object) -> tuple[int, int] | None:
    text = _entry_id(value) if value is not None else ""
    ms, _, seq = text.partition("-")
    if not ms.isdigit() or not (seq or "0").isdigit():
        return None
    return int(ms), int(seq or "0")


@dataclass(frozen=True, slots=True)
class StreamHead:
    """What ``XINFO STREAM`` says about entries a stream lost (Redis >= 7.0)."""

    stream: str
    length: int
    # Entries ever added; None when the server does not say (Redis < 7.0).
    entries_added: int | None
    # Whether every removed entry was older than the first one left: the head was trimmed
    # (MINID/MAXLEN, or XDEL of the oldest entries), nothing was deleted from the middle.
    # None when the server does not say.
    head_only: bool | None

    @property
    def removed(self) -> int | None:
        """Entries no longer in the stream."""
        return None if self.entries_added is None else self.entries_added - self.length

    @property
    def trimmed(self) -> bool:
        """The stream lost entries, and only from its head."""
        return bool(self.removed) and self.head_only is True


def _parse(raw: object) -> object:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _decode(fields: object) -> list[object]:
    """The records of one stream entry, in chain order (fields ``r0``, ``r1``, …); anything
    else in the entry is returned as it is (verification reports it as malformed)."""
    if not isinstance(fields, Mapping):
        return [fields]
    numbered: list[tuple[int, object]] = []
    for name, value in fields.items():
        key = name.decode() if isinstance(name, bytes) else str(name)
        match = _FIELD.fullmatch(key)
        if match is None:
            return [dict(fields)]
        numbered.append((int(match.group(1)), value))
    return [_parse(value) for _, value in sorted(numbered, key=lambda item: item[0])]


def _entry_id(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: object) -> list[tuple[str, list[object]]]:
    """(entry id, its records) from an XRANGE/XREVRANGE reply (redis-py's types are looser
    than the protocol)."""
    if not isinstance(reply, list):
        return []
    return [(_entry_id(item[0]), _decode(item[1])) for item in reply]


def _flat(entries: Sequence[tuple[str, list[object]]]) -> list[tuple[str, object]]:
    """One (``<entry id>.<index>``, record) per record."""
    return [
        (f"{entry_id}.{index}", record)
        for entry_id, records in entries
        for index, record in enumerate(records)
    ]


class RedisAuditReader:  # satisfies core.audit.AuditReader
    """Reads the audit streams back: paged queries, the tail, and every record for
    verification."""

    def __init__(
        self, *, client: aioredis.Redis, stream: str = "tl:audit", scan_budget: int = 10_000
    ) -> None:
        self._redis = client
        self.stream = stream
        self._budget = scan_budget

    async def query(self, query: AuditQuery) -> AuditPage:
        """One page of records matching ``query``, oldest first."""
        cursor = _CURSOR.fullmatch(query.cursor) if query.cursor is not None else None
        if query.cursor is not None and cursor is None:
            raise BadRequestError(
                "cursor must be the next_cursor of a previous page", reason="audit.bad_cursor"
            )
        try:
            return await self._query(query, cursor)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise _translated("XRANGE", exc) from exc

    async def _query(self, query: AuditQuery, cursor: re.Match[str] | None) -> AuditPage:
        stream = (
            run_stream_key(self.stream, query.workflow_id)
            if query.workflow_id is not None
            else self.stream
        )
        skip = 0
        if cursor is not None:
            if cursor.group(2) is None:
                start = f"({cursor.group(1)}"
            else:  # resume inside an entry
                start, skip = cursor.group(1), int(cursor.group(2))
        elif query.since is not None:
            start = f"{_stream_id(query.since, margin=-_CLOCK_MARGIN)}-0"
        else:
            start = "-"
        end = str(_stream_id(query.until, margin=_CLOCK_MARGIN)) if query.until is not None else "+"
        found: list[Mapping[str, Any]] = []
        scanned = 0
        while True:
            entries = _entries(await self._redis.xrange(stream, min=start, max=end, count=_CHUNK))
            for entry_id, records in entries:
                for index in range(skip, len(records)):
                    scanned += 1
                    record = records[index]
                    if isinstance(record, Mapping) and query.matches(record):
                        found.append(record)
                    last = index == len(records) - 1
                    here = entry_id if last else f"{entry_id}.{index + 1}"
                    if len(found) >= query.limit or scanned >= self._budget:
                        return AuditPage(tuple(found), next_cursor=here, scanned=scanned)
                skip = 0
            if len(entries) < _CHUNK:
                return AuditPage(tuple(found), next_cursor=None, scanned=scanned)
            start = f"({entries[-1][0]}"

    async def tail(self, count: int) -> list[tuple[str, object]]:
        """The last ``count`` records of the main stream, oldest first."""
        entries: list[tuple[str, list[object]]] = []
        end = "+"
        while sum(len(records) for _, records in entries) < count:
            chunk = _entries(await self._redis.xrevrange(self.stream, max=end, count=_CHUNK))
            entries.extend(chunk)
            if len(chunk) < _CHUNK:
                break
            end = f"({chunk[-1][0]}"
        return _flat(list(reversed(entries)))[-count:]

    async def follow(self, after: str, *, block_ms: int) -> list[tuple[str, object]]:
        """Records of entries after the entry ``after`` (``$`` for new ones), waiting up to
        ``block_ms``; each one's id is ``<entry id>.<index>``."""
        entry = after.split(".", 1)[0]
        reply = await self._redis.xread({self.stream: entry}, block=block_ms, count=_CHUNK)
        if not isinstance(reply, list):
            return []
        return [item for _, entries in reply for item in _flat(_entries(entries))]

    async def head(self, stream: str | None = None) -> StreamHead:
        """Whether a stream (default: the main one) lost entries, and only from its head.

        Redis >= 7.0 counts the entries ever added and remembers the largest id deleted by
        XDEL (trimming does not set it): entries were removed when fewer are left than were
        added, and only from the head when no XDEL reached past the first entry left."""
        key = stream or self.stream
        try:
            info: Mapping[str, Any] = await self._redis.xinfo_stream(key)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return StreamHead(key, 0, None, None)
            raise
        length = int(info.get("length") or 0)
        added = info.get("entries-added")
        if added is None:
            return StreamHead(key, length, None, None)
        deleted = _id_tuple(info.get("max-deleted-entry-id"))
        first = info.get("first-entry")
        first_id = _id_tuple(first[0]) if isinstance(first, list | tuple) and first else None
        head_only = (
            None if deleted is None else deleted == (0, 0) or first_id is None or deleted < first_id
        )
        return StreamHead(key, length, int(added), head_only)

    async def every_record(self, stream: str | None = None) -> AsyncIterator[tuple[str, object]]:
        """Every record of a stream (default: the main one), oldest first, in chunks."""
        key = stream or self.stream
        start = "-"
        while True:
            entries = _entries(await self._redis.xrange(key, min=start, max="+", count=1000))
            for item in _flat(entries):
                yield item
            if len(entries) < 1000:
                return
            start = f"({entries[-1][0]}"
