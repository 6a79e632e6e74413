"""Ports: the Protocols the use cases are written against. Adapters satisfy them."""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
)
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from broker.core.approvals import APPROVAL_ID, Approval
from broker.core.model import (
    MAX_LABELS,
    MAX_LIVE_LIMIT,
    Decision,
    DelegationChain,
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    RunState,
    Sensitivity,
    Target,
    WorkflowRun,
    check_id,
)
from broker.errors import BadRequestError


class Clock(Protocol):
    """The one source of time. Only ``adapters.clock.SystemClock`` reads the system clock."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One dependency's readiness: ``ok`` and a reason a person can act on (never a secret)."""

    name: str
    ok: bool
    detail: str
    alarm: bool = False


class ReadinessCheck(Protocol):
    """Something /readyz asks: is this dependency able to serve issuance right now?"""

    name: str

    async def check(self, now: datetime) -> CheckResult:
        """Probe the dependency."""
        ...


# --------------------------------------------------------------------------- issuance ports


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """Everything a policy decision may look at, evaluated at request time."""

    principal: str
    principal_roles: frozenset[str]
    trust_domain: str
    action: str
    target: Target
    run: WorkflowRun
    chain: DelegationChain
    task_id: str
    tool: str
    justification: str
    ttl: timedelta
    now: datetime
    # None: no approval presented. Otherwise its state as the broker verified it.
    approval: ApprovalState | None = None


@dataclass(frozen=True, slots=True)
class ApprovalState:
    """An approval presented with a request, as verified by the broker."""

    approval_id: str
    approved: bool
    approvers: tuple[str, ...]
    expires_at: datetime


class PolicyEngine(Protocol):
    """Decides a :class:`PolicyRequest`. Anything but an explicit allow is not an allow."""

    def decide(self, request: PolicyRequest) -> Decision:
        """The decision, with the policy ids and the evaluated context."""
        ...


@dataclass(frozen=True, slots=True)
class MintSpec:
    """What to mint: one credential for one task, with a TTL Vault will enforce."""

    credential_id: str
    workflow_id: str
    task_id: str
    holder: str
    owner: str
    chain: DelegationChain
    target: Target
    ttl: timedelta
    # Kind-specific request parameters (e.g. the agent's SSH public key).
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MintedCredential:
    """What Vault returned. ``secret`` is handed to the caller once and never stored or logged."""

    token_accessor: str
    vault_lease_ids: tuple[str, ...]
    expires_at: datetime
    secret: Mapping[str, Any] = field(repr=False)
    # Work the minter left to finish before the secret may be handed out (e.g. shortening a
    # database lease to the task), which the caller awaits concurrently with recording the
    # credential. It raises (a TaskleaseError) if the credential must not be handed out; the
    # caller then revokes it.
    finish: Callable[[], Awaitable[None]] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RevokeOutcome:
    """What a revocation confirmed: revoked only when Vault no longer knows token and leases."""

    confirmed: bool
    still_live: tuple[str, ...] = ()
    error: str = ""


class SecretMinter(Protocol):
    """Mints per-task credentials and revokes them (OpenBao/Vault)."""

    async def mint(self, spec: MintSpec) -> MintedCredential:
        """Create the per-task token and read the target's secret with it."""
        ...

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        """Revoke the task token by accessor and each lease; confirm with lookups."""
        ...


@dataclass(frozen=True, slots=True)
class LeaseSelector:
    """Which leases a query or a forced revocation addresses. Empty fields match anything;
    ``everything`` must be set explicitly to address every lease."""

    workflow_id: str | None = None
    task_id: str | None = None
    holder: str | None = None
    holder_prefix: str | None = None
    owner: str | None = None
    target: str | None = None
    sensitivity: Sensitivity | None = None
    states: frozenset[LeaseState] | None = None
    everything: bool = False

    def matches(self, lease: Lease) -> bool:
        """True when ``lease`` satisfies every set field."""
        checks = [
            self.workflow_id is None or lease.workflow_id == self.workflow_id,
            self.task_id is None or lease.task_id == self.task_id,
            self.holder is None or lease.holder == self.holder,
            self.holder_prefix is None or lease.holder.startswith(self.holder_prefix),
            self.owner is None or lease.owner == self.owner,
            self.target is None or lease.target == self.target,
            self.sensitivity is None or lease.sensitivity is self.sensitivity,
            self.states is None or lease.state in self.states,
        ]
        return all(checks)


RUN_PAGE_LIMIT: Final = 500
"""The most runs one listing returns."""
RUN_EXAMINE_FACTOR: Final = 10
"""A listing reads at most ``limit`` times this many index entries; a selective filter then
returns fewer runs (even none) with a cursor to go on from, rather than reading every run."""


@dataclass(frozen=True, slots=True)
class RunCursor:
    """Where a listing of runs stopped: the last run it examined, by when that run is over
    (microseconds since the epoch, as the retention index orders runs) and its id."""

    over_us: int
    workflow_id: str

    def __post_init__(self) -> None:
        check_id(self.workflow_id, "workflow id")

    def follows(self, over_us: int, workflow_id: str) -> bool:
        """Whether the run at ``(over_us, workflow_id)`` comes after this cursor (listings go
        from the latest end to the earliest, ids descending among equal ends)."""
        return (over_us, workflow_id) < (self.over_us, self.workflow_id)


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Which runs a listing returns: filters (empty: any), at most ``limit``, after a cursor.
    Runs come latest first by when they are over (their deadline, their end when they ended
    earlier, the expiry of a credential that outlives both)."""

    owner: str | None = None
    started_by: str | None = None
    states: frozenset[RunState] | None = None
    labels: tuple[tuple[str, str], ...] = ()
    """Label key and value pairs the run must all carry (e.g. a ticket reference)."""
    limit: int = 100
    after: RunCursor | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= RUN_PAGE_LIMIT:
            raise BadRequestError(f"limit must be 1-{RUN_PAGE_LIMIT}", reason="query.invalid")
        if len(self.labels) > MAX_LABELS:
            raise BadRequestError(f"at most {MAX_LABELS} labels", reason="query.invalid")
        for key, _ in self.labels:
            check_id(key, "label key")

    @property
    def filtered(self) -> bool:
        """Whether any filter is set (else every run matches)."""
        return (self.owner, self.started_by, self.states, self.labels) != (None, None, None, ())

    def matches(self, run: WorkflowRun) -> bool:
        """True when ``run`` satisfies every set filter."""
        return (
            (self.owner is None or run.owner == self.owner)
            and (self.started_by is None or run.started_by == self.started_by)
            and (self.states is None or run.state in self.states)
            and all(run.labels.get(key) == value for key, value in self.labels)
        )


@dataclass(frozen=True, slots=True)
class RunPage:
    """One page of a listing: the runs, and where to go on from (None: nothing more)."""

    runs: tuple[WorkflowRun, ...]
    next: RunCursor | None


def run_page(
    entries: Iterable[tuple[int, str, WorkflowRun | None]], query: RunQuery, *, more: bool
) -> RunPage:
    """The page of ``query`` from index entries read in listing order after its cursor: (when
    over in µs, run id, the run or None when it is gone). At most ``query.limit`` matching
    runs, having examined at most ``limit * RUN_EXAMINE_FACTOR`` entries; ``more``: the index
    had entries beyond those given. The cursor is the last entry examined, so a run is never
    returned twice nor skipped."""
    runs: list[WorkflowRun] = []
    last: tuple[int, str] | None = None
    budget = query.limit * RUN_EXAMINE_FACTOR
    unexamined = more
    for examined, (over_us, workflow_id, run) in enumerate(entries):
        if len(runs) == query.limit or examined == budget:
            unexamined = True
            break
        last = (over_us, workflow_id)
        if run is not None and query.matches(run):
            runs.append(run)
    cursor = RunCursor(*last) if unexamined and last is not None else None
    return RunPage(tuple(runs), cursor)


@dataclass(frozen=True, slots=True)
class IdempotencyBinding:
    """An ``Idempotency-Key`` to bind to the credential being written ahead.

    ``key`` names the caller and its key (never a secret); ``fingerprint`` digests the request
    it came with; ``ttl`` is how long the binding lasts.
    """

    key: str
    fingerprint: str
    ttl: timedelta

    def __post_init__(self) -> None:
        if self.ttl <= timedelta(0):
            raise ValueError(f"idempotency ttl must be positive, got {self.ttl}")


@dataclass(frozen=True, slots=True)
class IssuanceLimits:
    """What the lease's holder may do, whatever the policy allows; 0 means no limit.

    ``per_identity``: live credentials (written ahead, neither revoked nor past the end of the
    minute they expire in) it may hold with this one included, in all; ``per_target``: the
    same, of the lease's target; ``per_minute``: credentials it may be issued per minute (a
    token bucket of that many, refilled at that rate: bursts up to it, then a steady rate).
    A write-ahead over a limit writes nothing and raises
    :class:`~broker.errors.LimitExceededError`."""

    per_identity: int = 0
    per_target: int = 0
    per_minute: int = 0

    def __post_init__(self) -> None:
        for name in ("per_identity", "per_target", "per_minute"):
            if not 0 <= getattr(self, name) <= MAX_LIVE_LIMIT:
                raise ValueError(f"{name} must be 0..{MAX_LIVE_LIMIT}")


class Ledger(Protocol):
    """The lease ledger (Redis in production, in memory in unit tests). Never a secret."""

    async def create_run(self, run: WorkflowRun, *, per_minute: int = 0) -> bool:
        """Store a new run; False if the id is taken. The id of a purged run retired past
        ``created_at`` (:meth:`RunRetention.purge`) raises
        :class:`~broker.errors.ConflictError` (``workflow.id_retired``, saying until when).
        ``per_minute``: runs its orchestrator (``started_by``) may start per minute, a token
        bucket of that many refilled at that rate (0: no limit), timed by ``created_at``; over
        it nothing is written and :class:`~broker.errors.LimitExceededError`
        (``limit.runs_per_identity``) is raised."""
        ...

    async def get_run(self, workflow_id: str) -> WorkflowRun | None:
        """The run, or None."""
        ...

    async def save_run(self, run: WorkflowRun) -> None:
        """Overwrite a run (state changes)."""
        ...

    async def list_runs(self, query: RunQuery) -> RunPage:
        """The runs ``query`` selects, latest over first, a page at a time (see
        :func:`run_page`)."""
        ...

    async def write_ahead(
        self,
        lease: Lease,
        *,
        idempotency: IdempotencyBinding | None = None,
        limits: IssuanceLimits | None = None,
    ) -> str | None:
        """Record a lease in state issuing *before* minting, indexed and due at its expiry,
        so that even a mint whose answer is lost is found and revoked.

        With ``idempotency``, atomically with the record: bind the key to the lease's
        credential id unless it is bound already. When it is, nothing is written and the bound
        credential id is returned (ConflictError ``idempotency.key_reused`` if bound with
        another fingerprint). None when the lease was written.

        With ``limits``, also atomically: the holder's live credentials and its issuance rate
        (at the lease's ``issued_at``) are counted, and a lease over a limit writes nothing and
        raises LimitExceededError (``limit.live_per_identity``, ``limit.live_per_target``,
        ``limit.rate_per_identity``). A key bound
        already answers its credential before any limit is looked at. A lease leaves the count
        when it is revoked or discarded, or once the minute it expires in has ended (counts
        are kept per expiry minute: a lease may count up to 59 s past its expiry). Per-target
        counts cover the leases written while that target had a limit.

        Atomically too, unless this very lease is written already: a quarantine in force at
        the lease's ``issued_at`` that covers its holder (or a prefix of it), its run or its
        target writes nothing and raises its refusal (ForbiddenError ``quarantine.active``),
        so a quarantine stored after the caller last read them still blocks the credential."""
        ...

    async def activate(
        self,
        credential_id: str,
        *,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        written: Lease | None = None,
    ) -> Lease:
        """issuing → active with the Vault references, durably acknowledged. Raises
        ConflictError (``lease.tombstoned``) if the task was revoked meanwhile. ``written``,
        the lease as written ahead, lets an implementation skip reading it back."""
        ...

    async def discard(self, lease: Lease) -> bool:
        """Remove ``lease`` if the stored record is still exactly it as written ahead
        (issuing, no Vault references): its mint was definitely refused. False otherwise."""
        ...

    async def forget_idempotency(self, key: str, credential_id: str) -> None:
        """Unbind an idempotency key still bound to ``credential_id`` (its mint was refused)."""
        ...

    async def get_lease(self, credential_id: str) -> Lease | None:
        """The lease, or None."""
        ...

    async def save_lease(self, lease: Lease) -> None:
        """Overwrite a lease (state transitions), keeping indexes consistent."""
        ...

    async def find_leases(self, selector: LeaseSelector, *, limit: int = 1000) -> list[Lease]:
        """Leases matching ``selector``, using the narrowest index available."""
        ...

    def iter_leases(self, selector: LeaseSelector, *, batch: int) -> AsyncGenerator[list[Lease]]:
        """Every lease matching ``selector``, in batches of at most ``batch`` (1..10 000), read
        from the narrowest index available; memory stays bounded by a batch, not by how many
        match. Order is unspecified, within a batch and across batches. Each lease comes at
        most once per iteration, as it is stored when its batch is read (so ``states`` is
        checked then). A lease that exists and matches for the whole iteration comes; one
        written, changed or removed meanwhile may or may not. Raises ``BadRequestError`` (on
        the first iteration) for a selector that names nothing or a batch out of range. Close
        it (``contextlib.aclosing``) when stopping early."""
        ...

    async def tombstone_task(self, workflow_id: str, task_id: str, *, until: datetime) -> None:
        """Block activation of any further lease of this task (it was revoked)."""
        ...

    async def schedule(self, credential_id: str, due_at: datetime) -> None:
        """(Re)place a lease in the due index."""
        ...

    async def claim_due(self, now: datetime, *, limit: int, visibility: timedelta) -> list[str]:
        """Atomically claim up to ``limit`` due leases (oldest first) for ``visibility``;
        claims not acknowledged in time come back."""
        ...

    async def ack(self, credential_id: str) -> None:
        """Done with a claimed lease (revoked, or rescheduled with :meth:`schedule`)."""
        ...

    async def unschedule(self, credential_id: str) -> None:
        """Take a lease that is confirmed revoked out of the due index (and any claim), so no
        sweep has to find that out again. Only for leases in a final state."""
        ...


class QuarantineStore(Protocol):
    """Quarantines, shared by every replica (the ledger implements it)."""

    async def set_quarantine(self, quarantine: Quarantine) -> None:
        """Add or replace the quarantine for ``(kind, value)``."""
        ...

    async def lift_quarantine(self, kind: QuarantineKind, value: str) -> bool:
        """Remove it; False if there was none."""
        ...

    async def quarantines(self, now: datetime) -> list[Quarantine]:
        """Every quarantine still active at ``now`` (expired ones are dropped)."""
        ...


@dataclass(frozen=True, slots=True)
class TaskToken:
    """A task token OpenBao holds that tasklease minted (found by its metadata)."""

    accessor: str
    credential_id: str
    created_at: datetime
    expires_at: datetime | None


class TaskTokenInventory(Protocol):
    """Lists the task tokens tasklease minted that OpenBao still holds (for the reconciler)."""

    async def task_tokens(self, *, limit: int) -> list[TaskToken]:
        """Up to ``limit`` live tasklease task tokens."""
        ...


class Locks(Protocol):
    """Leased locks shared by every replica (the ledger implements them)."""

    async def try_lock(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        """Take ``name`` for ``owner`` for ``ttl`` unless someone else holds it."""
        ...

    async def extend(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        """Keep ``name`` for ``owner`` for ``ttl`` from now, atomically, only if ``owner``
        still holds it; False if the lock expired or another owner holds it (a lock that
        lapsed is never taken back here: that is :meth:`try_lock`'s job)."""
        ...

    async def unlock(self, name: str, owner: str) -> None:
        """Release ``name`` if ``owner`` still holds it."""
        ...


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True, slots=True)
class PurgePlan:
    """What a ledger found of one run whose end is past a retention cutoff
    (:meth:`RunRetention.plan_purge`).

    ``over_at``: when everything of the run ended (:func:`~broker.core.model.run_over_at`);
    None when the run is gone (its index entry was dropped). ``ready``: ``over_at`` is at or
    before the cutoff and no credential of it is live in the ledger, so
    :meth:`RunRetention.purge` may delete it (otherwise the run was put back in the index at
    the time to look again: :func:`~broker.core.model.purge_recheck_at`). ``version``: the
    ledger's fingerprint of what it read; the purge deletes only that."""

    workflow_id: str
    run: WorkflowRun | None
    over_at: datetime | None
    ready: bool
    lease_states: Mapping[str, int] = field(default_factory=dict)
    version: str = ""

    @property
    def leases(self) -> int:
        """How many lease records the run holds."""
        return sum(self.lease_states.values())


class RunRetention(Protocol):
    """Deleting ended runs, with their leases and index entries, once they are past a retention
    cutoff (the ledger implements it). The audit trail keeps their history; the ledger keeps
    what is live, so Redis (``noeviction``) does not grow with every run ever started."""

    async def runs_over_before(self, cutoff: datetime, *, limit: int) -> list[str]:
        """Up to ``limit`` run ids whose recorded end is at or before ``cutoff``, oldest first
        (a run's recorded end is its deadline until it ends earlier)."""
        ...

    async def index_runs(self, *, batch: int = 1000) -> int:
        """Index the runs stored before the ledger kept a retention index (once per ledger);
        how many it added."""
        ...

    async def plan_purge(self, workflow_id: str, *, cutoff: datetime) -> PurgePlan:
        """Read the run and its leases: ready to purge, or not yet (then its index entry
        moves to when it will be), or gone."""
        ...

    async def purge(self, plan: PurgePlan, *, retire_until: datetime | None = None) -> bool:
        """Atomically delete the run of a ready ``plan``, its leases, tombstones and every
        index entry of them, if nothing of it changed since the plan; False (nothing deleted)
        when something did. With ``retire_until``, the run's id is retired until then, in the
        same step: :meth:`Ledger.create_run` refuses it meanwhile (a run id names one run
        while the audit trail keeps that run's records under it)."""
        ...


# --------------------------------------------------------------------------- continuous authz

_MARKER_WRITER_LIMIT = 200


@dataclass(frozen=True, slots=True)
class ReevaluationMarker:
    """The decision inputs under which every live lease was last decided again, completely.

    ``digest`` is a SHA-256 (64 lowercase hex digits) of what decisions depend on besides the
    lease (policy set and schema, targets catalog, workload role rules, working hours); ``at``
    when that re-evaluation completed; ``writer`` the broker process that completed it. No
    secret: nothing here is more than the broker's own configuration fingerprint.
    """

    digest: str
    at: datetime
    writer: str

    def __post_init__(self) -> None:
        if len(self.digest) != 64 or any(c not in "0123456789abcdef" for c in self.digest):
            raise ValueError("digest must be 64 lowercase hex digits (a SHA-256)")
        if self.at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        if not 1 <= len(self.writer) <= _MARKER_WRITER_LIMIT or not self.writer.isprintable():
            raise ValueError(f"writer must be 1..{_MARKER_WRITER_LIMIT} printable characters")


class ReevaluationMarkers(Protocol):
    """Where the last complete re-evaluation of every live lease is noted, shared by every
    replica (one small key on the ledger's Redis; a dictionary in unit tests)."""

    async def last_reevaluated(self) -> ReevaluationMarker | None:
        """The marker stored last, or None when there is none (or it cannot be read as one)."""
        ...

    async def mark_reevaluated(self, marker: ReevaluationMarker) -> None:
        """Store ``marker`` in place of the one before (the last writer wins)."""
        ...


# The kinds of re-evaluation whose pending state must outlive the broker process: only those
# nothing else redoes at start-up (a policy or catalog change has the decision-inputs marker,
# a quarantine is applied again while it is in force; a withdrawn approval has neither).
PENDING_APPROVAL = "approval"
_PENDING_KINDS = frozenset({PENDING_APPROVAL})
_PENDING_ID_PREFIX = "pnd_"
PENDING_REASON_LIMIT = 500


def _check_pending_text(value: str, what: str, limit: int) -> None:
    if not 1 <= len(value) <= limit or not value.isprintable():
        raise ValueError(f"{what} must be 1..{limit} printable characters")


@dataclass(frozen=True, slots=True)
class PendingScopeRecord:
    """A re-evaluation owed to live leases, noted before its first attempt and removed once
    one completed, so that a broker stopping meanwhile does not forget it.

    ``id`` (``pnd_`` + 24 hex digits) names this note (each note is its own, so removing one
    never removes a newer note of the same scope); ``kind`` is :data:`PENDING_APPROVAL`, with
    ``key`` the withdrawn approval's id and ``workflow_id``/``task_id`` the task its
    credential was issued for; ``reason`` says what changed (printable, bounded); ``noted_at``
    and ``noted_by`` when and by which broker process. Ids and text only, never a secret.
    """

    id: str
    kind: str
    key: str
    workflow_id: str
    task_id: str
    reason: str
    noted_at: datetime
    noted_by: str

    def __post_init__(self) -> None:
        suffix = self.id.removeprefix(_PENDING_ID_PREFIX)
        if (
            suffix == self.id
            or len(suffix) != 24
            or any(c not in "0123456789abcdef" for c in suffix)
        ):
            raise ValueError("a pending record id must look like pnd_<24 hex digits>")
        if self.kind not in _PENDING_KINDS:
            raise ValueError(f"unknown pending re-evaluation kind {self.kind[:40]!r}")
        if APPROVAL_ID.fullmatch(self.key) is None:
            raise ValueError("the key of a pending approval re-evaluation is its approval id")
        for value, what in ((self.workflow_id, "workflow id"), (self.task_id, "task id")):
            try:
                check_id(value, what)
            except BadRequestError as exc:
                raise ValueError(exc.detail) from None
        _check_pending_text(self.reason, "reason", PENDING_REASON_LIMIT)
        _check_pending_text(self.noted_by, "noted_by", _MARKER_WRITER_LIMIT)
        if self.noted_at.tzinfo is None:
            raise ValueError("noted_at must be timezone-aware")


@dataclass(frozen=True, slots=True)
class PendingScopesRead:
    """One bounded read of the pending records: the ``records`` that parse, the ids of the
    entries that do not (``unreadable``: written by another version or by hand; their scope is
    unknown), and whether that was every entry (``complete``) or the read stopped at its
    limit."""

    records: tuple[PendingScopeRecord, ...] = ()
    unreadable: tuple[str, ...] = ()
    complete: bool = True


class PendingScopeRecords(Protocol):
    """The re-evaluations owed to live leases that must survive a broker stop, shared by
    every replica (one hash on the ledger's Redis; a dictionary in unit tests)."""

    async def note_pending(self, record: PendingScopeRecord) -> None:
        """Store ``record`` (under its own id)."""
        ...

    async def read_pending(self, *, limit: int) -> PendingScopesRead:
        """Up to ``limit`` entries (records and unreadable ones together), in no set order;
        an entry that does not parse is reported in ``unreadable``, never raised."""
        ...

    async def clear_pending(self, ids: Collection[str]) -> None:
        """Remove these entries (a record's id, or an unreadable entry's); unknown ids are
        ignored."""
        ...


# --------------------------------------------------------------------------- approvals


class ApprovalStore(Protocol):
    """Approvals, shared by every replica (Redis in production, in memory in unit tests).

    Every change is a compare-and-set on :attr:`Approval.version`, so concurrent decisions,
    withdrawals and uses serialize: of two uses of one approval exactly one succeeds. The store
    also keeps, per request digest, a pointer to the open approval for it (so an identical
    request reuses it) and an index of pending approvals.
    """

    async def create_approval(self, approval: Approval, *, replaces: str | None) -> bool:
        """Store a new approval and point its digest at it, if the digest currently points at
        ``replaces`` (None: at nothing). False when it does not (someone else opened one for
        the same request meanwhile): read :meth:`open_approval_for` again."""
        ...

    async def open_approval_for(self, digest: str) -> str | None:
        """The id the digest points at: the last approval opened for that request, while it
        is open (pending or approved; it may have expired meanwhile). None otherwise."""
        ...

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The approval, or None (unknown, or dropped after its retention)."""
        ...

    async def save_approval(self, approval: Approval, *, expected_version: int) -> bool:
        """Replace the stored approval if its version is still ``expected_version``
        (``approval.version`` must be higher); keep the pending index and the digest pointer
        in step. False when the version moved (re-read and decide again)."""
        ...

    async def list_approvals(self, *, pending_only: bool, limit: int) -> list[Approval]:
        """Up to ``limit`` approvals, newest first: those in the pending index, or every one
        still retained."""
        ...

    async def count_pending(self) -> int:
        """How many approvals the pending index holds (those past their expiry included until
        an operation records the expiry)."""
        ...


class ApprovalNotifier(Protocol):
    """Tells people and bots that an approval was requested or decided (e.g. webhooks).

    ``notify`` must not wait for delivery: it queues (durably, where the queue is an outbox
    in Redis: that is why it is a coroutine) and returns within a short bound, never raising,
    so the request path never depends on a chat or ticketing system being up.
    """

    async def notify(self, event: str, data: Mapping[str, Any]) -> None:
        """Queue ``event`` (``approval.requested`` | ``approval.decided``) with ``data`` (the
        step, who took it, and the approval's JSON view) for delivery in the background."""
        ...
