"""Approvals in memory: the fake the unit tests use, with the Redis store's semantics.

``tests/contract/test_approval_store.py`` runs one suite against this class and
:class:`broker.adapters.redis_approvals.RedisApprovalStore`. Records are kept as the same JSON
the Redis store writes (so a value read back is a fresh copy, as from Redis). The fake reads
no clock, so nothing is dropped after the retention period (Redis drops it).
"""

from __future__ import annotations

from broker.core.approvals import (
    Approval,
    ApprovalStatus,
    check_approval_id,
    decode_approval,
    encode_approval,
)

MAX_LIST_LIMIT = 1000


def check_list_limit(limit: int) -> None:
    """``list_approvals`` takes 1..``MAX_LIST_LIMIT``."""
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be 1..{MAX_LIST_LIMIT}, got {limit}")


def check_successor(approval: Approval, expected_version: int) -> None:
    """A saved approval must be a later version than the one it replaces."""
    if approval.version <= expected_version:
        raise ValueError(
            f"approval {approval.id}: version {approval.version} does not follow {expected_version}"
        )


class InMemoryApprovalStore:  # satisfies core.ports.ApprovalStore
    """Approvals in dictionaries, for unit tests."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[int, str]] = {}
        self._open: dict[str, str] = {}
        self._pending: set[str] = set()
        self._order: list[str] = []

    async def create_approval(self, approval: Approval, *, replaces: str | None) -> bool:
        """Store it and point its digest at it, if the digest points at ``replaces``."""
        check_approval_id(approval.id)
        if self._open.get(approval.digest) != replaces:
            return False
        if approval.id in self._records:
            raise ValueError(f"approval id {approval.id} is taken")
        self._records[approval.id] = (approval.version, encode_approval(approval))
        self._open[approval.digest] = approval.id
        self._order.append(approval.id)
        if approval.state is ApprovalStatus.PENDING:
            self._pending.add(approval.id)
        return True

    async def open_approval_for(self, digest: str) -> str | None:
        """The id the digest points at, or None."""
        return self._open.get(digest)

    async def get_approval(self, approval_id: str) -> Approval | None:
        """A fresh copy of the stored approval, or None."""
        check_approval_id(approval_id)
        record = self._records.get(approval_id)
        return None if record is None else decode_approval(record[1])

    async def save_approval(self, approval: Approval, *, expected_version: int) -> bool:
        """Compare-and-set on the version; keeps the pending index and digest pointer."""
        check_approval_id(approval.id)
        check_successor(approval, expected_version)
        record = self._records.get(approval.id)
        if record is None or record[0] != expected_version:
            return False
        self._records[approval.id] = (approval.version, encode_approval(approval))
        if approval.state is ApprovalStatus.PENDING:
            self._pending.add(approval.id)
        else:
            self._pending.discard(approval.id)
        if approval.state.is_open:
            self._open.setdefault(approval.digest, approval.id)
        elif self._open.get(approval.digest) == approval.id:
            del self._open[approval.digest]
        return True

    async def count_pending(self) -> int:
        """The size of the pending index."""
        return len(self._pending)

    async def list_approvals(self, *, pending_only: bool, limit: int) -> list[Approval]:
        """Newest first (by creation), at most ``limit``."""
        check_list_limit(limit)
        ids = [i for i in reversed(self._order) if not pending_only or i in self._pending]
        return [decode_approval(self._records[i][1]) for i in ids[:limit]]
