"""The re-evaluation marker on the ledger's Redis: one small key per namespace.

``<namespace>:continuous:reevaluated`` (string) holds compact JSON
``{"digest": <sha256 hex>, "at": <RFC 3339>, "writer": <broker process id>}``: the decision
inputs under which a broker last decided *every* live lease again, completely
(:class:`broker.core.ports.ReevaluationMarker`). Nothing else, and never a secret. It shares
the ledger's connection pool (and so its durability settings); a single key lives in one
Cluster slot. Every replica reads it at start-up; the last one to complete a full
re-evaluation writes it (a plain ``SET``: replicas with the same inputs write the same digest,
and one with other inputs only causes one more, harmless, re-evaluation at the next start).

A value that does not parse as a marker counts as none (a re-evaluation follows, which then
replaces it): erring towards deciding again is the fail-closed direction.

``<namespace>:continuous:pending`` (hash) holds the re-evaluations owed to live leases that
must survive a broker stop (:class:`broker.core.ports.PendingScopeRecord`, today a withdrawn
approval's): field = the record's id (``pnd_<24 hex>``), value = compact JSON
``{"v": 1, "kind", "key", "workflow_id", "task_id", "reason", "noted_at", "noted_by"}`` — ids
and text, never a secret. One key, so one Cluster slot. ``HSET`` notes one, ``HDEL`` clears
one; a read is an ``HSCAN`` that stops at its limit. It is written with the same durability
as the approval store's writes (a plain write on the ledger's connections, after the
withdrawal it follows; AOF is an ordered log). An entry that does not parse (another
version, a hand edit, bytes that are not UTF-8) is reported by id as unreadable, never raised:
the authorizer then re-evaluates every live lease, which covers whatever it was.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.client import NEVER_DECODE

from broker.adapters.redis_common import translated
from broker.core.ports import PendingScopeRecord, PendingScopesRead, ReevaluationMarker

_log = structlog.get_logger("broker.continuous")


def marker_key(namespace: str) -> str:
    """The key holding the marker of the ledger in ``namespace``."""
    return f"{namespace}:continuous:reevaluated"


class RedisReevaluationMarkers:  # satisfies core.ports.ReevaluationMarkers
    """The marker next to the ledger (same client, same namespace)."""

    def __init__(self, *, client: aioredis.Redis, namespace: str = "tl") -> None:
        self._redis = client
        self._key = marker_key(namespace)

    async def last_reevaluated(self) -> ReevaluationMarker | None:
        """The stored marker; None when absent or unreadable (logged)."""
        with translated("the continuous authorizer", "last_reevaluated"):
            raw = await self._redis.get(self._key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return ReevaluationMarker(
                digest=str(doc["digest"]),
                at=datetime.fromisoformat(str(doc["at"])),
                writer=str(doc["writer"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("continuous.marker_unreadable", error=type(exc).__name__)
            return None

    async def mark_reevaluated(self, marker: ReevaluationMarker) -> None:
        """Store ``marker`` (replacing the one before)."""
        doc = {"digest": marker.digest, "at": marker.at.isoformat(), "writer": marker.writer}
        with translated("the continuous authorizer", "mark_reevaluated"):
            await self._redis.set(self._key, json.dumps(doc, separators=(",", ":")))


# Fields asked for per HSCAN round trip, and removed per HDEL.
_SCAN_COUNT: Final = 500
_CLEAR_CHUNK: Final = 500
_OWNER: Final = "the continuous authorizer"


def pending_key(namespace: str) -> str:
    """The hash holding the pending re-evaluation records of the ledger in ``namespace``."""
    return f"{namespace}:continuous:pending"


def encode_pending(record: PendingScopeRecord) -> str:
    """The stored JSON of ``record`` (its id is the hash field)."""
    doc = {
        "v": 1,
        "kind": record.kind,
        "key": record.key,
        "workflow_id": record.workflow_id,
        "task_id": record.task_id,
        "reason": record.reason,
        "noted_at": record.noted_at.isoformat(),
        "noted_by": record.noted_by,
    }
    return json.dumps(doc, separators=(",", ":"))


def _decode_pending(entry: str, raw: bytes) -> PendingScopeRecord:
    doc: Any = json.loads(raw.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise ValueError("not a version 1 pending record")
    return PendingScopeRecord(
        id=entry,
        kind=str(doc["kind"]),
        key=str(doc["key"]),
        workflow_id=str(doc["workflow_id"]),
        task_id=str(doc["task_id"]),
        reason=str(doc["reason"]),
        noted_at=datetime.fromisoformat(str(doc["noted_at"])),
        noted_by=str(doc["noted_by"]),
    )


class RedisPendingScopeRecords:  # satisfies core.ports.PendingScopeRecords
    """The pending re-evaluation records next to the ledger (same client, same namespace)."""

    def __init__(self, *, client: aioredis.Redis, namespace: str = "tl") -> None:
        self._redis = client
        self._key = pending_key(namespace)

    async def note_pending(self, record: PendingScopeRecord) -> None:
        """``HSET`` the record under its id."""
        with translated(_OWNER, "note_pending"):
            await self._redis.hset(self._key, record.id, encode_pending(record))

    async def read_pending(self, *, limit: int) -> PendingScopesRead:
        """``HSCAN`` until every entry or ``limit`` of them were read. Read undecoded: a field
        or value that is not UTF-8 is an unreadable entry like any other, not an error."""
        if limit < 1:
            raise ValueError("limit must be positive")
        records: dict[str, PendingScopeRecord] = {}
        unreadable: dict[str, None] = {}
        cursor = 0
        while True:
            with translated(_OWNER, "read_pending"):
                cursor, page = await self._redis.execute_command(  # type: ignore[no-untyped-call]  # redis-py
                    "HSCAN", self._key, cursor, "COUNT", _SCAN_COUNT, **{NEVER_DECODE: []}
                )
            for field, raw in page.items():
                # surrogateescape: a non-UTF-8 field round-trips to the bytes clear_pending
                # must delete.
                entry = bytes(field).decode("utf-8", "surrogateescape")
                if entry in records or entry in unreadable:
                    continue  # HSCAN may return an entry twice (a rehash meanwhile)
                if len(records) + len(unreadable) >= limit:
                    return PendingScopesRead(tuple(records.values()), tuple(unreadable), False)
                try:
                    records[entry] = _decode_pending(entry, bytes(raw))
                except (ValueError, KeyError, TypeError) as exc:
                    _log.warning("continuous.pending_entry_unreadable", error=type(exc).__name__)
                    unreadable[entry] = None
            if int(cursor) == 0:
                return PendingScopesRead(tuple(records.values()), tuple(unreadable), True)

    async def clear_pending(self, ids: Collection[str]) -> None:
        """``HDEL`` these fields, a chunk at a time."""
        fields = [entry.encode("utf-8", "surrogateescape") for entry in ids]
        for start in range(0, len(fields), _CLEAR_CHUNK):
            with translated(_OWNER, "clear_pending"):
                await self._redis.hdel(self._key, *fields[start : start + _CLEAR_CHUNK])
