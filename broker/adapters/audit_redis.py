"""The audit trail in Redis: a stream sink (written by the chain writer) and the reader behind
``GET /v1/audit`` and ``tasklease audit``.

Keys (``S`` is ``audit.redis.stream``, default ``tl:audit``; ``W`` a run id)::

    S              stream  every record: one entry per group commit, fields ``r0``, ``r1``, …
                           = the records' JSON lines in chain order; the copy that is verified
                           (per writer: ``tasklease audit verify``)
    S:run:W        stream  a copy of the records of run W (and of a forced revocation that
                           addressed W), one entry per group commit: a run's story is one XRANGE

One group commit is one pipeline of two commands for the usual batch (one run): an XADD to
``S`` (``MAXLEN ~`` only when ``audit.redis.maxlen`` is set; it counts entries, i.e. group
commits) and an XADD to each run's stream touched; the runs' expiry (``index_ttl_days``) is
refreshed at most hourly. The main stream never expires. Stream entry ids come from the Redis
server clock; event times from the broker's.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions

from broker.adapters.audit_sinks import SealedRecord
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


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def _translated(operation: str, exc: Exception) -> AuditUnavailableError:
    code = type(exc).__name__
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc):
        code = str(exc).split()[0]  # the Redis error code (WRONGTYPE, NOPERM, OOM, …)
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
        index_ttl: timedelta = timedelta(days=90),
    ) -> None:
        self._redis = client
        self.stream = stream
        self.durable = durable
        self._maxlen = maxlen
        self._ttl = max(int(index_ttl.total_seconds()), 1)
        # Run streams whose expiry this process refreshed lately, with when: at most once per
        # _REFRESH_SECONDS, not per batch. Bounded; forgetting one costs one more EXPIRE.
        self._indexed: dict[str, float] = {}

    def run_key(self, workflow_id: str) -> str:
        """The stream holding the copies of one run's records."""
        return f"{self.stream}:run:{workflow_id}"

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

    async def _append(
        self, entries: Sequence[tuple[str, dict[Any, Any]]], refresh: Sequence[str]
    ) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for key, entry in entries:
            if key == self.stream and self._maxlen:
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

    async def probe(self) -> str:
        """Redis answers and the stream key is a stream (or absent)."""
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
        return f"stream {self.stream}"

    async def close(self) -> None:
        """The client belongs to the ledger, which closes it."""


def _stream_id(moment: datetime, *, margin: timedelta) -> int:
    return max(int((moment + margin).timestamp() * 1000), 0)


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
            f"{self.stream}:run:{query.workflow_id}"
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
