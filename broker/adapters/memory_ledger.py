"""The lease ledger in memory, and the rules every ledger shares.

:class:`InMemoryLedger` is the fake the unit tests use; ``tests/contract/test_ledger.py`` runs
one suite against it and :class:`broker.adapters.redis_ledger.RedisLedger`, so the two agree on
every observable behaviour. The module-level functions below are those shared semantics
(selector validation, the tombstone rule, which lease rewrites are allowed); the Redis ledger
imports them rather than restating them.

The fake reads no clock: every time comes in as an argument. Two consequences, both documented
where they matter: idempotency bindings never expire here (Redis drops them after their TTL),
and nothing is ever evicted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta

from broker.core.model import (
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    WorkflowRun,
    check_id,
    epoch_micros,
    purge_recheck_at,
    refuse_quarantined,
    run_over_at,
)
from broker.core.ports import (
    IdempotencyBinding,
    IssuanceLimits,
    LeaseSelector,
    PurgePlan,
    RunPage,
    RunQuery,
    run_page,
)
from broker.errors import BadRequestError, ConflictError, LimitExceededError, NotFoundError

MAX_FIND_LIMIT = 10_000

# The fields that place a lease in an index or a key. A rewrite may not change them: the
# indexes (and, in Redis, the key itself) were built from them at write-ahead.
_IDENTITY_FIELDS = (
    "credential_id",
    "workflow_id",
    "task_id",
    "target",
    "kind",
    "sensitivity",
    "holder",
    "owner",
    "issued_at",
)


MAX_PURGE_BATCH = 10_000


def check_purge_limit(limit: int) -> None:
    """Raise :class:`BadRequestError` unless ``limit`` is within 1..``MAX_PURGE_BATCH``."""
    if not 1 <= limit <= MAX_PURGE_BATCH:
        raise BadRequestError(
            f"a retention pass takes 1..{MAX_PURGE_BATCH} runs, got {limit}",
            reason="invalid.limit",
        )


def check_purge_plan(plan: PurgePlan) -> WorkflowRun:
    """The run of a ready plan; :class:`ValueError` for a plan that is not ready (nothing may
    be purged on it)."""
    if not plan.ready or plan.run is None or not plan.version:
        raise ValueError(f"run {plan.workflow_id!r} is not ready to purge")
    return plan.run


def check_selector(selector: LeaseSelector, limit: int) -> None:
    """Raise :class:`BadRequestError` unless ``selector`` names at least one field (or says
    ``everything``) and ``limit`` is within 1..``MAX_FIND_LIMIT``.

    An empty selector matches every lease; addressing all of them must be explicit, so that a
    forgotten filter in a forced revocation cannot revoke the world.
    """
    narrowing = (
        selector.workflow_id,
        selector.task_id,
        selector.holder,
        selector.holder_prefix,
        selector.owner,
        selector.target,
        selector.sensitivity,
    )
    if all(value is None for value in narrowing) and not selector.everything:
        raise BadRequestError(
            "a lease selector needs at least one of workflow_id, task_id, holder, "
            "holder_prefix, owner, target, sensitivity, or everything=true",
            reason="selector.unbounded",
        )
    if selector.holder_prefix == "":
        raise BadRequestError(
            "holder_prefix must not be empty (use everything=true to address all leases)",
            reason="selector.unbounded",
        )
    if not 1 <= limit <= MAX_FIND_LIMIT:
        raise BadRequestError(
            f"limit must be between 1 and {MAX_FIND_LIMIT}, got {limit}",
            reason="selector.limit",
        )


def lease_order(lease: Lease) -> tuple[datetime, str]:
    """The order :meth:`find_leases` returns leases in: oldest issued first, then by id."""
    return (lease.issued_at, lease.credential_id)


def tombstone_blocks(lease: Lease, tombstone_until: datetime | None) -> bool:
    """True when a tombstone of the lease's task forbids activating it.

    A tombstone set by ``tombstone_task(..., until=u)`` covers every lease of the task written
    ahead before ``u``: the mint that raced the revocation (written before it) and any new
    request until ``u``. Both times come from the broker's clock (``issued_at`` was stamped by
    it at write-ahead), so no ledger needs a clock of its own to apply the rule (SECURITY 36).
    """
    return tombstone_until is not None and lease.issued_at < tombstone_until


def check_rewrite(stored: Lease, new: Lease) -> None:
    """Raise :class:`ConflictError` unless ``new`` may overwrite ``stored``.

    Refused: changing a field an index or key was built from; dropping the Vault references
    (a stale read written back would make the credential unrevocable); leaving ``revoked``;
    going back to ``issuing``.
    """
    for name in _IDENTITY_FIELDS:
        if getattr(stored, name) != getattr(new, name):
            raise ConflictError(
                f"lease {stored.credential_id}: {name} cannot change once written "
                f"(stored {getattr(stored, name)!s:.80}, new {getattr(new, name)!s:.80})",
                reason="lease.identity_changed",
            )
    if (stored.token_accessor and not new.token_accessor) or (
        stored.vault_lease_ids and not new.vault_lease_ids
    ):
        raise ConflictError(
            f"lease {stored.credential_id}: the write would drop its Vault references "
            "(a stale copy?); re-read the lease and apply the change to it",
            reason="lease.stale_write",
        )
    if stored.state is LeaseState.REVOKED and new.state is not LeaseState.REVOKED:
        raise ConflictError(
            f"lease {stored.credential_id} is revoked; it cannot become {new.state.value}",
            reason="lease.stale_write",
        )
    if new.state is LeaseState.ISSUING and stored.state is not LeaseState.ISSUING:
        raise ConflictError(
            f"lease {stored.credential_id} is {stored.state.value}; it cannot go back to issuing",
            reason="lease.stale_write",
        )


def check_write_ahead(lease: Lease) -> None:
    """Raise unless ``lease`` can be written ahead: state issuing and key-safe identifiers."""
    check_lease_ids(lease.credential_id, lease.workflow_id, lease.task_id)
    if lease.state is not LeaseState.ISSUING:
        raise ValueError(
            f"write_ahead records leases in state issuing, got {lease.state.value} "
            f"for {lease.credential_id}"
        )


def check_lease_ids(credential_id: str, workflow_id: str, task_id: str) -> None:
    """Identifiers that end up in keys must be plain identifiers (no braces, separators)."""
    check_id(credential_id, "credential id")
    check_id(workflow_id, "workflow id")
    check_id(task_id, "task id")


def activated(lease: Lease, *, token_accessor: str, vault_lease_ids: tuple[str, ...]) -> Lease:
    """``lease`` made active with its Vault references, or a :class:`ConflictError` when it
    is in no state to be (an activation that already happened with the same references is a
    retry and returns the lease as stored)."""
    if lease.state is LeaseState.ISSUING:
        return dataclasses.replace(
            lease,
            state=LeaseState.ACTIVE,
            token_accessor=token_accessor,
            vault_lease_ids=vault_lease_ids,
        )
    if (
        lease.state is LeaseState.ACTIVE
        and lease.token_accessor == token_accessor
        and lease.vault_lease_ids == vault_lease_ids
    ):
        return lease
    raise ConflictError(
        f"lease {lease.credential_id} is {lease.state.value}, not issuing: it was revoked or "
        "activated with other Vault references meanwhile",
        reason="lease.not_issuing",
    )


def refused_by_tombstone(
    lease: Lease, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
) -> Lease:
    """What a refused activation leaves behind: the lease keeps its state (issuing) but records
    the Vault references of the credential that was minted anyway, so the sweeper can revoke
    it by accessor. A lease already marked revoked goes back to revoking: a live token exists.
    """
    if lease.token_accessor:
        recorded = lease
    else:
        recorded = dataclasses.replace(
            lease, token_accessor=token_accessor, vault_lease_ids=vault_lease_ids
        )
    if recorded.state is LeaseState.REVOKED:
        recorded = dataclasses.replace(recorded, state=LeaseState.REVOKING, revoked_at=None)
    return recorded


def tombstoned_error(lease: Lease) -> ConflictError:
    """The refusal :meth:`activate` raises for a tombstoned task (SECURITY 29)."""
    return ConflictError(
        f"task {lease.task_id!r} of run {lease.workflow_id!r} was revoked while credential "
        f"{lease.credential_id} was being minted; the credential must be revoked",
        reason="lease.tombstoned",
    )


def key_reused_error() -> ConflictError:
    """An idempotency key presented again with a different request."""
    return ConflictError(
        "this Idempotency-Key was used for a different request; use a new key",
        reason="idempotency.key_reused",
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MINUTE = timedelta(minutes=1)


def _bucket_empty(
    done: str, per_minute: int, wait: float, *, again: str, reason: str
) -> LimitExceededError:
    """An identity's token bucket of ``per_minute`` is empty (``done``: what it did that fast);
    the next token comes in ``wait`` seconds."""
    seconds = math.ceil(wait)
    return LimitExceededError(
        f"{done} faster than the {per_minute} per minute allowed per identity; {again} in "
        f"{max(1, seconds)} s",
        reason=reason,
        limit=per_minute,
        retry_after=seconds,
    )


def rate_limit_error(lease: Lease, per_minute: int, *, wait: float) -> LimitExceededError:
    """The holder of ``lease`` was issued ``per_minute`` credentials in the last minute (its
    token bucket is empty); the next token comes in ``wait`` seconds."""
    return _bucket_empty(
        f"{lease.holder} was issued credentials",
        per_minute,
        wait,
        again="ask again",
        reason="limit.rate_per_identity",
    )


def run_rate_limit_error(run: WorkflowRun, per_minute: int, *, wait: float) -> LimitExceededError:
    """The orchestrator of ``run`` started ``per_minute`` runs in the last minute (its token
    bucket is empty); the next token comes in ``wait`` seconds."""
    return _bucket_empty(
        f"{run.started_by} started workflow runs",
        per_minute,
        wait,
        again="start it again",
        reason="limit.runs_per_identity",
    )


def retired_run_id_error(workflow_id: str, until: datetime) -> ConflictError:
    """A run of this id was purged and its id is retired until ``until``."""
    return ConflictError(
        f"workflow run id {workflow_id!r} was used by a run the ledger has since purged; a run "
        "id names one run while the audit trail keeps that run's records under it, so it "
        f"cannot start a new run until {until.replace(microsecond=0).isoformat()}: choose "
        "another id",
        reason="workflow.id_retired",
    )


def refill(
    held: tuple[float, datetime] | None, per_minute: int, at: datetime
) -> tuple[float, datetime]:
    """A token bucket ``held`` (tokens, when last refilled; None: full) refilled at ``at``: a
    token per 60/``per_minute`` s, at most ``per_minute`` (as the Redis ledger's scripts do)."""
    tokens, refilled = held if held is not None else (float(per_minute), at)
    if at > refilled:
        gained = (at - refilled).total_seconds() * per_minute / 60
        tokens, refilled = min(float(per_minute), tokens + gained), at
    return tokens, refilled


def counted_until(lease: Lease) -> datetime:
    """Until when a live lease counts against its holder's limits: the end of the minute its
    expiry falls in (the Redis ledger counts per minute)."""
    minutes = -(-(lease.expires_at - _EPOCH) // _MINUTE)
    return _EPOCH + minutes * _MINUTE


def live_limit_error(
    lease: Lease, *, per_target: bool, limit: int, earliest_expiry: datetime
) -> LimitExceededError:
    """The holder of ``lease`` holds ``limit`` live credentials already (of its target, when
    ``per_target``); the earliest of them expires at ``earliest_expiry``."""
    wait = math.ceil((earliest_expiry - lease.issued_at).total_seconds())
    scope = f"of target {lease.target!r} " if per_target else ""
    return LimitExceededError(
        f"{lease.holder} holds {limit} live credentials {scope}already, the most allowed "
        f"{'per identity for this target' if per_target else 'per identity'}; one expires in "
        f"{max(1, wait)} s, or release one you no longer need (DELETE /v1/credentials/{{id}})",
        reason="limit.live_per_target" if per_target else "limit.live_per_identity",
        limit=limit,
        retry_after=wait,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class DueBacklog:
    """The due index at one moment (for metrics): how much revocation work is waiting."""

    due: int  # due at that moment and not claimed
    claimed: int  # held by a claimer (a sweep settling them)
    claim_expired: int  # claims past their visibility deadline: the claimer died or stalled
    oldest_due_at: datetime | None  # the oldest due time among the ``due`` ones


def check_claim(limit: int, visibility: timedelta) -> None:
    """``claim_due`` arguments: a positive limit and a positive visibility timeout."""
    if limit < 1:
        raise ValueError(f"claim_due limit must be positive, got {limit}")
    if visibility <= timedelta(0):
        raise ValueError(f"claim_due visibility must be positive, got {visibility}")


class InMemoryLedger:  # satisfies core.ports.Ledger
    """The ledger in a few dictionaries: same semantics as the Redis ledger, no clock.

    Not shared between processes and not durable: for unit tests and ``tasklease`` demos only.
    """

    def __init__(self) -> None:
        self._runs: dict[str, WorkflowRun] = {}
        self._leases: dict[str, Lease] = {}
        self._tombstones: dict[tuple[str, str], datetime] = {}
        self._idempotency: dict[str, tuple[str, str]] = {}
        # (holder, target) → the ids written while the target had a per-identity limit
        self._counted_for_target: dict[tuple[str, str], set[str]] = {}
        # holder → its issuance token bucket: (tokens, refilled at)
        self._buckets: dict[str, tuple[float, datetime]] = {}
        # orchestrator → its run-start token bucket: (tokens, refilled at)
        self._run_buckets: dict[str, tuple[float, datetime]] = {}
        self._due: dict[str, datetime] = {}
        # credential id → (visibility deadline, the due time it was claimed at)
        self._in_flight: dict[str, tuple[datetime, datetime]] = {}
        self._quarantines: dict[tuple[QuarantineKind, str], Quarantine] = {}
        self._locks: dict[str, str] = {}
        # run id → its recorded end (the retention index: its deadline, or when it ended)
        self._run_ends: dict[str, datetime] = {}
        # Purged runs' ids, retired until then (purge(retire_until=...)).
        self._retired: dict[str, datetime] = {}

    # ---- runs

    async def create_run(self, run: WorkflowRun, *, per_minute: int = 0) -> bool:
        """Store a new run; False if the id is taken; LimitExceededError when its
        orchestrator's run-start bucket is empty (then nothing is written)."""
        check_id(run.id, "workflow id")
        if run.id in self._runs:
            return False
        retired = self._retired.get(run.id)
        if retired is not None and retired > run.created_at:
            raise retired_run_id_error(run.id, retired)
        if per_minute:
            held = self._run_buckets.get(run.started_by)
            tokens, refilled = refill(held, per_minute, run.created_at)
            if tokens < 1:
                raise run_rate_limit_error(run, per_minute, wait=(1 - tokens) * 60 / per_minute)
            self._run_buckets[run.started_by] = (tokens - 1, refilled)
        self._runs[run.id] = run
        self._run_ends[run.id] = run.deadline
        return True

    async def get_run(self, workflow_id: str) -> WorkflowRun | None:
        """The run, or None."""
        check_id(workflow_id, "workflow id")
        return self._runs.get(workflow_id)

    async def list_runs(self, query: RunQuery) -> RunPage:
        """The runs ``query`` selects, latest over first (the retention index's order)."""
        ordered = sorted(
            ((epoch_micros(over), run_id) for run_id, over in self._run_ends.items()),
            reverse=True,
        )
        after = query.after
        entries = (
            (over_us, run_id, self._runs.get(run_id))
            for over_us, run_id in ordered
            if after is None or after.follows(over_us, run_id)
        )
        return run_page(entries, query, more=False)

    async def save_run(self, run: WorkflowRun) -> None:
        """Overwrite an existing run (:class:`NotFoundError` if there is none)."""
        check_id(run.id, "workflow id")
        if run.id not in self._runs:
            raise NotFoundError(
                f"no workflow run {run.id!r} to update", reason="workflow.not_found"
            )
        self._runs[run.id] = run
        if run.ended_at is not None:
            end = self._run_ends.get(run.id)
            self._run_ends[run.id] = run.ended_at if end is None else min(end, run.ended_at)

    # ---- leases

    async def write_ahead(
        self,
        lease: Lease,
        *,
        idempotency: IdempotencyBinding | None = None,
        limits: IssuanceLimits | None = None,
    ) -> str | None:
        """Record an issuing lease, indexed and due at its expiry. Writing the same lease
        again is a no-op (a retried call); another lease with the same id is a conflict.
        With ``idempotency``, a key bound already writes nothing and answers the bound
        credential id (the fake keeps bindings forever: it has no clock). A lease of a stored run
        that is not active at its ``issued_at`` writes nothing (ConflictError
        ``workflow.not_active``), nor does one a quarantine in force then covers
        (ForbiddenError ``quarantine.active``). With ``limits``, a lease over the holder's
        live-credential limits writes nothing (LimitExceededError)."""
        check_write_ahead(lease)
        if idempotency is not None:
            bound = self._idempotency.get(idempotency.key)
            if bound is not None:
                if bound[0] != idempotency.fingerprint:
                    raise key_reused_error()
                if bound[1] != lease.credential_id:
                    return bound[1]
                # Bound to this very lease: a retried call (the record was written with it).
        stored = self._leases.get(lease.credential_id)
        if stored is None:
            run = self._runs.get(lease.workflow_id)
            if run is not None and not run.is_active(lease.issued_at):
                raise run.inactive_error()
            refuse_quarantined(
                (q for q in self._quarantines.values() if q.is_active(lease.issued_at)),
                principal=lease.holder,
                workflow_id=lease.workflow_id,
                target=lease.target,
            )
        tokens: tuple[float, datetime] | None = None
        if limits is not None and stored is None:
            self._check_limits(lease, limits)
            tokens = self._take_token(lease, limits.per_minute)
        if stored is not None and stored != lease:
            raise ConflictError(
                f"credential id {lease.credential_id} is taken by another lease",
                reason="lease.exists",
            )
        self._leases[lease.credential_id] = lease
        if tokens is not None:
            self._buckets[lease.holder] = tokens
        if limits is not None and limits.per_target:
            counted = self._counted_for_target.setdefault((lease.holder, lease.target), set())
            counted.add(lease.credential_id)
        if idempotency is not None:
            self._idempotency[idempotency.key] = (idempotency.fingerprint, lease.credential_id)
        await self.schedule(lease.credential_id, lease.expires_at)
        return None

    def _take_token(self, lease: Lease, per_minute: int) -> tuple[float, datetime] | None:
        """The holder's token bucket after this issuance takes a token (stored once the lease
        is written); LimitExceededError when it has none; None without a rate limit."""
        if not per_minute:
            return None
        tokens, refilled = refill(self._buckets.get(lease.holder), per_minute, lease.issued_at)
        if tokens < 1:
            raise rate_limit_error(lease, per_minute, wait=(1 - tokens) * 60 / per_minute)
        return tokens - 1, refilled

    def _check_limits(self, lease: Lease, limits: IssuanceLimits) -> None:
        """Raise LimitExceededError if ``lease`` would exceed one of ``limits``."""
        at = lease.issued_at
        live = [
            held
            for held in self._leases.values()
            if held.holder == lease.holder
            and held.state is not LeaseState.REVOKED
            and counted_until(held) > at
        ]
        counted = self._counted_for_target.get((lease.holder, lease.target), set())
        for per_target, limit, scope in (
            (False, limits.per_identity, live),
            (True, limits.per_target, [h for h in live if h.credential_id in counted]),
        ):
            if limit and len(scope) >= limit:
                raise live_limit_error(
                    lease,
                    per_target=per_target,
                    limit=limit,
                    earliest_expiry=min(counted_until(held) for held in scope),
                )

    async def discard(self, lease: Lease) -> bool:
        """Remove a lease exactly as written ahead (its mint was definitely refused); False
        when the stored record differs or is absent."""
        check_write_ahead(lease)
        if self._leases.get(lease.credential_id) != lease:
            return False
        del self._leases[lease.credential_id]
        self._due.pop(lease.credential_id, None)
        self._in_flight.pop(lease.credential_id, None)
        return True

    async def activate(
        self,
        credential_id: str,
        *,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        written: Lease | None = None,
    ) -> Lease:
        """issuing → active with its Vault references (see :func:`activated`); refused with
        ``lease.tombstoned`` when the task was tombstoned (the lease then stays issuing, with
        the references recorded, and is due at once)."""
        check_id(credential_id, "credential id")
        lease = self._leases.get(credential_id)
        if lease is None:
            raise NotFoundError(f"no lease {credential_id}", reason="lease.not_found")
        tombstone = self._tombstones.get((lease.workflow_id, lease.task_id))
        if tombstone_blocks(lease, tombstone):
            self._leases[credential_id] = refused_by_tombstone(
                lease, token_accessor=token_accessor, vault_lease_ids=vault_lease_ids
            )
            await self.schedule(credential_id, lease.issued_at)
            raise tombstoned_error(lease)
        active = activated(lease, token_accessor=token_accessor, vault_lease_ids=vault_lease_ids)
        self._leases[credential_id] = active
        return active

    async def get_lease(self, credential_id: str) -> Lease | None:
        """The lease, or None."""
        check_id(credential_id, "credential id")
        return self._leases.get(credential_id)

    async def save_lease(self, lease: Lease) -> None:
        """Overwrite an existing lease; see :func:`check_rewrite` for what is refused."""
        check_id(lease.credential_id, "credential id")
        stored = self._leases.get(lease.credential_id)
        if stored is None:
            raise NotFoundError(f"no lease {lease.credential_id}", reason="lease.not_found")
        check_rewrite(stored, lease)
        self._leases[lease.credential_id] = lease

    async def find_leases(self, selector: LeaseSelector, *, limit: int = 1000) -> list[Lease]:
        """Up to ``limit`` matching leases, oldest issued first. When more match, which
        ``limit`` of them come back is unspecified (the Redis ledger stops at the first
        ``limit`` it meets in its index)."""
        check_selector(selector, limit)
        found = [lease for lease in self._leases.values() if selector.matches(lease)]
        return sorted(found, key=lease_order)[:limit]

    async def iter_leases(
        self, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        """Every matching lease, in batches of at most ``batch``, in write order (order is
        unspecified by the port). The ids are taken when the iteration starts and each lease
        is read as it is when its batch is made: a lease written meanwhile does not come, one
        removed meanwhile does not come, one changed meanwhile comes as it is then (if it
        still matches)."""
        check_selector(selector, batch)
        ids = list(self._leases)
        for start in range(0, len(ids), batch):
            chunk = (self._leases.get(cid) for cid in ids[start : start + batch])
            found = [lease for lease in chunk if lease is not None and selector.matches(lease)]
            if found:
                yield found

    # ---- idempotency and tombstones

    async def forget_idempotency(self, key: str, credential_id: str) -> None:
        """Unbind ``key`` if it is still bound to ``credential_id``."""
        existing = self._idempotency.get(key)
        if existing is not None and existing[1] == credential_id:
            del self._idempotency[key]

    async def tombstone_task(self, workflow_id: str, task_id: str, *, until: datetime) -> None:
        """Block activation of leases of this task written ahead before ``until`` (the latest
        ``until`` given wins)."""
        check_id(workflow_id, "workflow id")
        check_id(task_id, "task id")
        current = self._tombstones.get((workflow_id, task_id))
        if current is None or until > current:
            self._tombstones[(workflow_id, task_id)] = until

    # ---- due index

    async def schedule(self, credential_id: str, due_at: datetime) -> None:
        """Place the lease in the due index at ``due_at``, ending any claim on it."""
        check_id(credential_id, "credential id")
        self._in_flight.pop(credential_id, None)
        self._due[credential_id] = due_at

    async def claim_due(self, now: datetime, *, limit: int, visibility: timedelta) -> list[str]:
        """Return expired claims to the due index (at their original due time), then claim
        the ``limit`` oldest items due at ``now`` until ``now + visibility``."""
        check_claim(limit, visibility)
        for credential_id, (deadline, due_at) in list(self._in_flight.items()):
            if deadline <= now:
                del self._in_flight[credential_id]
                self._due[credential_id] = due_at
        ready = sorted(
            (due_at, credential_id) for credential_id, due_at in self._due.items() if due_at <= now
        )[:limit]
        for due_at, credential_id in ready:
            del self._due[credential_id]
            self._in_flight[credential_id] = (now + visibility, due_at)
        return [credential_id for _, credential_id in ready]

    async def unschedule(self, credential_id: str) -> None:
        """Remove a revoked lease's due entry and any claim on it."""
        check_id(credential_id, "credential id")
        self._due.pop(credential_id, None)
        self._in_flight.pop(credential_id, None)

    async def ack(self, credential_id: str) -> None:
        """Drop the claim on a lease (no-op when it holds none)."""
        check_id(credential_id, "credential id")
        self._in_flight.pop(credential_id, None)

    async def due_backlog(self, now: datetime) -> DueBacklog:
        """What is due at ``now`` and not settled: unclaimed, claimed, claims expired."""
        due = [due_at for due_at in self._due.values() if due_at <= now]
        return DueBacklog(
            due=len(due),
            claimed=len(self._in_flight),
            claim_expired=sum(1 for deadline, _ in self._in_flight.values() if deadline <= now),
            oldest_due_at=min(due, default=None),
        )

    # ---- quarantines

    async def set_quarantine(self, quarantine: Quarantine) -> None:
        """Add or replace the quarantine for ``(kind, value)``."""
        self._quarantines[(quarantine.kind, quarantine.value)] = quarantine

    async def lift_quarantine(self, kind: QuarantineKind, value: str) -> bool:
        """Remove it; False if there was none."""
        return self._quarantines.pop((kind, value), None) is not None

    async def quarantines(self, now: datetime) -> list[Quarantine]:
        """Every quarantine still active at ``now``; expired ones are dropped."""
        for key in [k for k, q in self._quarantines.items() if not q.is_active(now)]:
            del self._quarantines[key]
        return sorted(self._quarantines.values(), key=lambda q: (q.kind, q.value))

    # ---- retention

    async def runs_over_before(self, cutoff: datetime, *, limit: int) -> list[str]:
        """Up to ``limit`` run ids whose recorded end is at or before ``cutoff``, oldest
        first."""
        check_purge_limit(limit)
        ended = sorted((end, run_id) for run_id, end in self._run_ends.items() if end <= cutoff)
        return [run_id for _, run_id in ended[:limit]]

    async def index_runs(self, *, batch: int = 1000) -> int:
        """Every run here is in the index from its creation: nothing to add."""
        return 0

    async def plan_purge(self, workflow_id: str, *, cutoff: datetime) -> PurgePlan:
        """Ready when everything of the run is over by ``cutoff`` and no credential of it is
        live (:func:`~broker.core.model.purge_recheck_at`); otherwise the run is put back in
        the index at the time to look again; gone when there is no run."""
        check_id(workflow_id, "workflow id")
        run = self._runs.get(workflow_id)
        if run is None:
            self._run_ends.pop(workflow_id, None)
            return PurgePlan(workflow_id, None, None, ready=False)
        leases = sorted(
            (lease for lease in self._leases.values() if lease.workflow_id == workflow_id),
            key=lambda lease: lease.credential_id,
        )
        over = run_over_at(run, leases)
        later = purge_recheck_at(over, cutoff, unsettled=sum(lease.is_live for lease in leases))
        ready = later is None
        if later is not None:
            self._run_ends[workflow_id] = later
        version = hashlib.sha256(repr((run, leases)).encode()).hexdigest() if ready else ""
        return PurgePlan(
            workflow_id,
            run,
            over,
            ready=ready,
            lease_states=dict(Counter(lease.state.value for lease in leases)),
            version=version,
        )

    async def purge(self, plan: PurgePlan, *, retire_until: datetime | None = None) -> bool:
        """Delete the run, its leases and tombstones, and their index entries, if unchanged
        since ``plan``; with ``retire_until``, its id may not start a new run until then."""
        check_purge_plan(plan)
        run = self._runs.get(plan.workflow_id)
        leases = sorted(
            (lease for lease in self._leases.values() if lease.workflow_id == plan.workflow_id),
            key=lambda lease: lease.credential_id,
        )
        if run is None or hashlib.sha256(repr((run, leases)).encode()).hexdigest() != plan.version:
            return False
        del self._runs[plan.workflow_id]
        self._run_ends.pop(plan.workflow_id, None)
        if retire_until is not None:
            self._retired[plan.workflow_id] = retire_until
        for lease in leases:
            cid = lease.credential_id
            del self._leases[cid]
            self._due.pop(cid, None)
            self._in_flight.pop(cid, None)
            self._counted_for_target.get((lease.holder, lease.target), set()).discard(cid)
        for key in [key for key in self._tombstones if key[0] == plan.workflow_id]:
            del self._tombstones[key]
        return True

    # ---- locks (no clock: a lock is held until unlocked; tests drive expiry themselves)

    async def try_lock(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        """Take ``name`` for ``owner`` unless someone else holds it."""
        holder = self._locks.setdefault(name, owner)
        return holder == owner

    async def extend(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        """True if ``owner`` still holds ``name`` (which, without a clock, it keeps anyway)."""
        return self._locks.get(name) == owner

    async def unlock(self, name: str, owner: str) -> None:
        """Release ``name`` if ``owner`` holds it."""
        if self._locks.get(name) == owner:
            del self._locks[name]
