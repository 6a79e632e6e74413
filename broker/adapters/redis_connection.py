"""Every Redis client the broker builds from :class:`~broker.config.RedisSettings`: one factory
for a single Redis (``redis.url``) and for a master found through Redis Sentinel
(``redis.sentinels`` + ``redis.sentinel_service``).

Through Sentinel, a connection asks the Sentinels for the current master's address when it
connects, so after a failover the next connection reaches the promoted replica: a command on a
connection to the old master fails (the callers translate that into their typed errors, e.g.
``LedgerUnavailableError``, 503), and the pool reconnects. A master demoted to a replica
answers writes with READONLY, which redis-py turns into a connection error and a reconnect.

Both kinds of client use the same pool (:class:`WaitingConnectionPool`, 64 connections, a
command waits up to the socket timeout for a free one). No password appears in a repr, a log
or an error: redis-py redacts them in reprs and the callers name only exception types.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from broker.config import RedisSettings
from broker.errors import ConfigurationError

MAX_CONNECTIONS: Final = 64


class WaitingConnectionPool(aioredis.ConnectionPool):
    """A connection pool that, like redis-py's ``BlockingConnectionPool``, makes a command
    wait up to ``timeout`` seconds for a connection when all ``max_connections`` are in use
    and then fails with ``ConnectionError("No connection available.")`` — but takes a free
    connection without a condition variable and a timer: a semaphore counts the connections
    handed out and only a command that has to wait arms a timeout.

    Measured (bench/bench_ledger_cpu.py): about 20 µs less CPU per command than the blocking
    pool, i.e. about 100 µs per credential issuance (five ledger round trips).
    """

    # Positional arguments pass through: the Sentinel pool below takes the service name and
    # the Sentinel manager positionally (that is how ``Sentinel.master_for`` builds it).
    def __init__(self, *args: Any, timeout: float, max_connections: int, **kwargs: Any) -> None:
        kwargs["max_connections"] = max_connections
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        # Connections this pool handed out and that still hold a slot.
        self._holding: set[AbstractConnection] = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        """A connected connection from the pool, waiting up to ``timeout`` for a free one."""
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.timeout):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise redis.exceptions.ConnectionError("No connection available.") from exc
        else:
            await self._slots.acquire()  # a free slot: returns without suspending
        try:
            connection: AbstractConnection = await super().get_connection(  # type: ignore[no-untyped-call]  # redis-py
                *args, **kwargs
            )
        except BaseException:
            # The parent releases a connection that failed to connect through release(),
            # which gives back no slot for a connection that was never handed out.
            self._slots.release()
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        """Give the connection back, and its slot to the next waiting command."""
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._slots.release()


class WaitingSentinelConnectionPool(WaitingConnectionPool, SentinelConnectionPool):
    """:class:`WaitingConnectionPool`'s limits on redis-py's Sentinel pool: connections go to
    the master the Sentinels name at connect time; idle connections to a previous master are
    dropped when the Sentinels name a new one."""


class SentinelMasterRedis(aioredis.Redis):
    """A client of the master behind Sentinel that also closes its Sentinel connections
    (``master_for`` leaves them open)."""

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the pool, then the connections to the Sentinels."""
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.owned_sentinel is not None:
                await self.owned_sentinel.aclose()


def redis_client(
    settings: RedisSettings,
    *,
    blocking_reads: bool = False,
    environ: Mapping[str, str] | None = None,
) -> aioredis.Redis:
    """A client of the Redis the settings name: ``redis.url``, or, with ``redis.sentinels``,
    the master of ``redis.sentinel_service``, followed across failovers.

    ``blocking_reads``: no read timeout on the data connections, for a caller whose blocking
    reads (``XREAD BLOCK``) last longer than ``redis.socket_timeout_seconds``.
    Raise :class:`ConfigurationError` when ``redis.sentinel_password_env`` names a variable
    that is not set.
    """
    timeout = settings.socket_timeout_seconds
    connection: dict[str, Any] = {
        "max_connections": MAX_CONNECTIONS,
        "timeout": timeout,
        "socket_timeout": None if blocking_reads else timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
    }
    url = settings.url.get_secret_value()
    if not settings.sentinels:
        # redis-py's default pool fails the 101st concurrent command at once ("Too many
        # connections"); a burst of requests should wait briefly for a connection instead.
        return aioredis.Redis.from_pool(WaitingConnectionPool.from_url(url, **connection))
    # The URL gives the master's credentials and database; its host and port are the
    # Sentinels' to say (config refuses other schemes than redis:// here).
    master: dict[str, Any] = dict(parse_url(url))
    for where in ("host", "port"):
        master.pop(where, None)
    master.update(connection)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py
        list(settings.sentinel_addresses),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": _sentinel_password(settings, environ),
            # One try per Sentinel and query: discovery moves on to the next Sentinel anyway,
            # and redis-py's default (10 retries, backoff) would hold a request for seconds.
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client: SentinelMasterRedis = sentinel.master_for(
        settings.sentinel_service,
        redis_class=SentinelMasterRedis,
        connection_pool_class=WaitingSentinelConnectionPool,
        **master,
    )
    client.owned_sentinel = sentinel
    return client


def _sentinel_password(settings: RedisSettings, environ: Mapping[str, str] | None) -> str | None:
    name = settings.sentinel_password_env
    if not name:
        return None
    value = (os.environ if environ is None else environ).get(name, "")
    if not value:
        raise ConfigurationError(
            f"redis.sentinel_password_env names {name!r}, which is not set or empty"
        )
    return value
