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
"""

from __future__ import annotations

import json
from datetime import datetime

import redis.asyncio as aioredis
import structlog

from broker.adapters.redis_common import translated
from broker.core.ports import ReevaluationMarker

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
