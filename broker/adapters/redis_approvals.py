"""Approvals in Redis, next to the ledger (same connection pool, same namespace).

Approvals move at human speed and are few, so they all share one hash tag, ``{ap}``: every
script below touches one Cluster slot and is atomic. Key layout (``tl`` is the namespace,
``A`` an approval id, ``D`` a request digest)::

    tl:{ap}:a:A        hash    v → version, doc → the approval (core.approvals.encode_approval)
    tl:{ap}:d:D        string  A: the open (pending or approved) approval for that request
    tl:{ap}:pending    zset    A → created_at (µs): the approvals waiting for a decision
    tl:{ap}:recent     zset    A → created_at (µs): every approval still retained

Scripts (results are integers; no JSON is parsed in Lua):

* ``create`` (record, pointer, pending, recent; A, doc, version, replaces, created, prune
  below, gc at): refuses (0) unless the pointer holds exactly ``replaces`` ('' = absent); -1
  if A exists; else writes the record, points D at A, indexes A and drops index entries older
  than the retention.
* ``save`` (record, pointer, pending; A, expected, version, doc, open, pending, created, gc at):
  a compare-and-set on the version (0 when it moved); keeps A in the pending index exactly
  while it is pending, and the pointer on A exactly while it is open (a pointer that moved to
  a newer approval is left alone). Using an approval (approved → used) is one such
  compare-and-set, so of two concurrent uses exactly one wins, on any number of replicas.

Retention: records, pointers and index entries are garbage-collected ``retention`` after the
approval expires (``PEXPIREAT`` computed from the broker's clock; Redis applies it with its own
clock, which only decides *when* garbage goes, never whether an approval is valid). Durability:
an approval is used before the lease is written ahead, on the same Redis; the lease's
activation is durably acknowledged (``redis.durability``) and, AOF and replication being
ordered logs, that acknowledgement covers the earlier use as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import redis.asyncio as aioredis

from broker.adapters.memory_approvals import check_list_limit, check_successor
from broker.adapters.redis_common import RedisScript, translated
from broker.core.approvals import (
    Approval,
    ApprovalStatus,
    check_approval_id,
    decode_approval,
    encode_approval,
)
from broker.core.model import epoch_micros
from broker.errors import LedgerUnavailableError

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)
# Approvals live at most this long (config caps approvals.ttl_seconds): the index pruning
# below must not drop an entry whose approval can still be open.
MAX_VALIDITY: Final = timedelta(days=7)


_CREATE = RedisScript(
    "create",
    """
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[4] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'doc', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
redis.call('SET', KEYS[2], ARGV[1], 'PXAT', ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return 1
""",
)

_SAVE = RedisScript(
    "save",
    """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'doc', ARGV[4])
if ARGV[6] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local pointer = redis.call('GET', KEYS[2])
if ARGV[5] == '1' then
  if not pointer then redis.call('SET', KEYS[2], ARGV[1], 'PXAT', ARGV[8]) end
elseif pointer == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
""",
)


def _millis(moment: datetime) -> int:
    return (moment - _EPOCH) // _MILLISECOND


def _translated(operation: str) -> contextlib.AbstractContextManager[None]:
    return translated("the approval store", operation)


class RedisApprovalStore:  # satisfies core.ports.ApprovalStore
    """Approvals in Redis (see the module docstring for the layout)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        namespace: str = "tl",
        retention: timedelta = timedelta(days=7),
    ) -> None:
        if retention <= timedelta(0):
            raise ValueError("approval retention must be positive")
        self._redis = client
        self._retention = retention
        tag = f"{namespace}:{{ap}}"
        self._record_prefix = f"{tag}:a:"
        self._pointer_prefix = f"{tag}:d:"
        self._pending = f"{tag}:pending"
        self._recent = f"{tag}:recent"

    def _record(self, approval_id: str) -> str:
        return self._record_prefix + approval_id

    def _pointer(self, digest: str) -> str:
        return self._pointer_prefix + digest

    def _gc_at(self, approval: Approval) -> int:
        return _millis(approval.expires_at + self._retention)

    async def _script(
        self, script: RedisScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> int:
        return int(await script.run(self._redis, keys, args))

    async def create_approval(self, approval: Approval, *, replaces: str | None) -> bool:
        """Store a new approval and point its digest at it, if the pointer holds ``replaces``."""
        check_approval_id(approval.id)
        prune_below = epoch_micros(approval.created_at - self._retention - MAX_VALIDITY)
        with _translated("create"):
            result = await self._script(
                _CREATE,
                [
                    self._record(approval.id),
                    self._pointer(approval.digest),
                    self._pending,
                    self._recent,
                ],
                [
                    approval.id,
                    encode_approval(approval),
                    approval.version,
                    replaces or "",
                    epoch_micros(approval.created_at),
                    prune_below,
                    self._gc_at(approval),
                ],
            )
        if result == -1:
            raise ValueError(f"approval id {approval.id} is taken")
        return result == 1

    async def open_approval_for(self, digest: str) -> str | None:
        """The id the digest's pointer holds, or None."""
        with _translated("open_approval_for"):
            found = await self._redis.get(self._pointer(digest))
        return None if found is None else str(found)

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The stored approval, or None."""
        check_approval_id(approval_id)
        with _translated("get_approval"):
            raw = await self._redis.hget(self._record(approval_id), "doc")
        return None if raw is None else self._decode(str(raw), approval_id)

    async def save_approval(self, approval: Approval, *, expected_version: int) -> bool:
        """Compare-and-set on the version (see the ``save`` script)."""
        check_approval_id(approval.id)
        check_successor(approval, expected_version)
        with _translated("save_approval"):
            result = await self._script(
                _SAVE,
                [self._record(approval.id), self._pointer(approval.digest), self._pending],
                [
                    approval.id,
                    str(expected_version),
                    approval.version,
                    encode_approval(approval),
                    "1" if approval.state.is_open else "0",
                    "1" if approval.state is ApprovalStatus.PENDING else "0",
                    epoch_micros(approval.created_at),
                    self._gc_at(approval),
                ],
            )
        return result == 1

    async def count_pending(self) -> int:
        """ZCARD of the pending index."""
        with _translated("count_pending"):
            return int(await self._redis.zcard(self._pending))

    async def list_approvals(self, *, pending_only: bool, limit: int) -> list[Approval]:
        """Newest first; index entries whose record was garbage-collected are dropped."""
        check_list_limit(limit)
        index = self._pending if pending_only else self._recent
        with _translated("list_approvals"):
            ids = [str(i) for i in await self._redis.zrevrange(index, 0, limit - 1)]
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for approval_id in ids:
                    pipe.hget(self._record(approval_id), "doc")
                raws = await pipe.execute()
        found: list[Approval] = []
        gone: list[str] = []
        for approval_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                gone.append(approval_id)
            else:
                found.append(self._decode(str(raw), approval_id))
        if gone:
            with _translated("list_approvals"):
                await self._redis.zrem(index, *gone)
        return found

    def _decode(self, raw: str, approval_id: str) -> Approval:
        try:
            approval = decode_approval(raw)
        except ValueError as exc:
            raise LedgerUnavailableError(
                f"the approval record {self._record(approval_id)} is unreadable "
                f"({type(exc).__name__}); it was not written by this version of tasklease or "
                "was modified by hand",
                reason="ledger.corrupt",
            ) from exc
        if approval.id != approval_id:
            raise LedgerUnavailableError(
                f"the approval record {self._record(approval_id)} holds another approval",
                reason="ledger.corrupt",
            )
        return approval
