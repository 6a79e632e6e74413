"""A reconciler replica in a process of its own, for tests/integration/test_reconciler_lock.py.

``python -m tests.integration.reconciler_replica`` takes the reconciler lock in the ledger
namespace ``TL_NAMESPACE`` of the Redis at ``TASKLEASE_REDIS__URL`` (from the environment, never
the command line) with a lock TTL of ``TL_LOCK_TTL_SECONDS``, and then its pass is stuck
listing task tokens: only its heartbeat keeps the lock, until the process is killed.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import structlog

from broker.adapters.clock import SystemClock
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.ports import MintedCredential, MintSpec, RevokeOutcome, TaskToken
from broker.reconciler import Reconciler

_log = structlog.get_logger("tests.reconciler_replica")


class StuckInventory:  # satisfies core.ports.TaskTokenInventory
    """An OpenBao listing that never answers: the pass holds the lock for as long as it lives."""

    async def task_tokens(self, *, limit: int) -> list[TaskToken]:
        _log.info("replica.listing_stuck")
        await asyncio.Event().wait()
        return []


class NoMinter:  # satisfies core.ports.SecretMinter
    """Never reached: the pass does not get past its listing."""

    async def mint(self, spec: MintSpec) -> MintedCredential:
        raise AssertionError("the reconciler never mints")

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        raise AssertionError("this replica's pass never gets past its listing")


async def main() -> None:
    ledger = RedisLedger(
        settings=RedisSettings(url=os.environ["TASKLEASE_REDIS__URL"]),
        namespace=os.environ["TL_NAMESPACE"],
    )
    reconciler = Reconciler(
        inventory=StuckInventory(),
        minter=NoMinter(),
        ledger=ledger,
        locks=ledger,
        clock=SystemClock(),
        lock_ttl=timedelta(seconds=float(os.environ["TL_LOCK_TTL_SECONDS"])),
    )
    _log.info("replica.started", owner=reconciler.owner)
    report = await reconciler.reconcile()
    _log.info("replica.pass_ended", ran=report.ran, lock_lost=report.lock_lost)


if __name__ == "__main__":
    asyncio.run(main())
