"""What the ledger, the approval store and the webhook outbox share on Redis: Lua scripts run
with ``EVALSHA``, and Redis errors translated into the broker's own.

A script's SHA-1 (Redis's name for a loaded script) is computed once, not on every call: the
texts are kilobytes and the ledger runs several per issuance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline

from broker.adapters.tls import failure_code
from broker.errors import LedgerUnavailableError


def redis_error_code(exc: BaseException) -> str:
    """The leading error code of a Redis error reply (OOM, READONLY, NOPERM, NOGROUP …), else
    the exception type, with OpenSSL's reason when TLS failed (``ConnectionError, TLS
    CERTIFICATE_VERIFY_FAILED: Hostname mismatch …``): enough to act on, and never part of the
    connection URL."""
    first = str(exc).split(" ", 1)[0]
    if isinstance(exc, redis.exceptions.ResponseError) and re.fullmatch(r"[A-Z]{2,16}", first):
        return first
    return failure_code(exc)


@contextlib.contextmanager
def translated(owner: str, operation: str) -> Iterator[None]:
    """Redis (and socket) exceptions become :class:`LedgerUnavailableError`, chained. The
    message names the owner (``the ledger``), the operation and the error code, never the
    URL."""
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        raise LedgerUnavailableError(
            f"Redis refused {owner}'s {operation} ({redis_error_code(exc)})",
            reason="ledger.refused",
        ) from exc
    except (redis.exceptions.RedisError, OSError) as exc:
        raise LedgerUnavailableError(
            f"Redis is unreachable for {owner}'s {operation} ({redis_error_code(exc)})",
            reason="ledger.unreachable",
        ) from exc


@dataclass(frozen=True, slots=True)
class RedisScript:
    """A Lua script; ``name`` only labels it for readers and tests."""

    name: str
    text: str
    sha: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[str | int]) -> None:
        """Add an ``EVALSHA`` of this script to ``pipe``."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def run(
        self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """``EVALSHA``, or ``EVAL`` (which also loads it) when Redis lost its script cache
        (restart, failover, ``SCRIPT FLUSH``): a script that answered NOSCRIPT did nothing."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(self.text, len(keys), *keys, *args)
