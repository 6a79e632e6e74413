"""The Redis ledger: connection, durability checks (SECURITY.md 32-33), and the ledger itself.

A ledger that can lose or evict a lease record is worse than none: a credential without a
record can never be revoked early. So start-up refuses a Redis whose ``maxmemory-policy`` is
not ``noeviction`` or that persists nothing, unless the operator explicitly configured
``redis.insecure_allow_degraded_durability`` (then every readiness check carries an alarm).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import redis.asyncio as aioredis
import redis.exceptions

from broker.config import RedisSettings
from broker.core.ports import CheckResult
from broker.errors import LedgerUnavailableError


@dataclass(frozen=True, slots=True)
class RedisDurability:
    """What ``CONFIG GET`` says about persistence and eviction."""

    appendonly: bool
    appendfsync: str
    maxmemory_policy: str
    rdb_save: str

    @property
    def problems(self) -> list[str]:
        """Each way this configuration can lose a lease record; empty when durable."""
        found = []
        if self.maxmemory_policy != "noeviction":
            found.append(
                f"maxmemory-policy is {self.maxmemory_policy!r}, expected 'noeviction' "
                "(any other policy may evict lease records)"
            )
        if not self.appendonly and not self.rdb_save.strip():
            found.append("persistence is off (appendonly no and no RDB save points)")
        elif not self.appendonly:
            found.append(
                "appendonly is off: only RDB snapshots persist, writes between them are lost"
            )
        return found


class RedisLedger:  # satisfies core.ports.Ledger (grows with issuance)
    """The lease ledger in Redis."""

    def __init__(self, *, settings: RedisSettings) -> None:
        self._settings = settings
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.url.get_secret_value(),
            socket_timeout=settings.socket_timeout_seconds,
            socket_connect_timeout=settings.socket_timeout_seconds,
            decode_responses=True,
        )

    @property
    def allows_degraded(self) -> bool:
        """True when the operator allowed running on a non-durable Redis."""
        return self._settings.insecure_allow_degraded_durability

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client (for adapters that share the connection pool)."""
        return self._redis

    async def durability(self) -> RedisDurability:
        """Read the persistence and eviction settings."""
        try:
            values: dict[str, str] = {}
            for key in ("appendonly", "appendfsync", "maxmemory-policy", "save"):
                reply = await self._redis.config_get(key)
                values.update({str(k): str(v) for k, v in reply.items()})
        except redis.exceptions.RedisError as exc:
            raise LedgerUnavailableError(
                f"cannot read Redis configuration ({type(exc).__name__})",
                reason="ledger.unreachable",
            ) from exc
        return RedisDurability(
            appendonly=values.get("appendonly") == "yes",
            appendfsync=values.get("appendfsync", ""),
            maxmemory_policy=values.get("maxmemory-policy", ""),
            rdb_save=values.get("save", ""),
        )

    async def check_durability(self) -> RedisDurability:
        """Raise unless Redis is durable (or degraded durability is explicitly allowed)."""
        durability = await self.durability()
        if durability.problems and not self._settings.insecure_allow_degraded_durability:
            raise LedgerUnavailableError(
                "Redis cannot be trusted with the ledger: "
                + "; ".join(durability.problems)
                + " (set redis.insecure_allow_degraded_durability = true to run degraded)",
                reason="ledger.not_durable",
            )
        return durability

    async def ping(self) -> None:
        """Raise :class:`LedgerUnavailableError` unless Redis answers."""
        try:
            await self._redis.ping()
        except redis.exceptions.RedisError as exc:
            raise LedgerUnavailableError(
                f"Redis is unreachable ({type(exc).__name__})", reason="ledger.unreachable"
            ) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


class RedisReadiness:  # satisfies core.ports.ReadinessCheck
    """Ready when Redis answers and keeps the ledger durable (or degraded on purpose: alarm)."""

    name = "redis"

    def __init__(self, ledger: RedisLedger) -> None:
        self._ledger = ledger

    async def check(self, now: datetime) -> CheckResult:
        """Ping, then read the durability settings."""
        await self._ledger.ping()
        durability = await self._ledger.durability()
        problems = durability.problems
        if not problems:
            return CheckResult(
                self.name,
                ok=True,
                detail=f"reachable; appendonly yes, appendfsync {durability.appendfsync}, "
                "noeviction",
            )
        if self._ledger.allows_degraded:
            return CheckResult(
                self.name,
                ok=True,
                alarm=True,
                detail="DEGRADED (allowed by configuration): " + "; ".join(problems),
            )
        return CheckResult(self.name, ok=False, detail="; ".join(problems))
