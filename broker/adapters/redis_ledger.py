"""The Redis ledger: connection, durability checks (SECURITY.md 32-33), and the ledger itself.

A ledger that can lose or evict a lease record is worse than none: a credential without a
record can never be revoked early. So start-up refuses a Redis whose ``maxmemory-policy`` is
not ``noeviction``, that persists nothing, or on which the configured durable acknowledgement
cannot be had, unless the operator explicitly configured
``redis.insecure_allow_degraded_durability`` (then every readiness check carries an alarm).

Key layout (``tl`` is the namespace; ``W`` a run id, ``C`` a credential id, ``T`` a task id,
``b`` = CRC32(C) mod ``due_buckets``). Everything of one run shares the hash tag ``{wf:W}``
and so one Cluster slot; each due bucket is its own tag, so every Lua script but
``write_ahead``, ``discard`` and the ``cas`` of a revocation touches one slot
(``write_ahead`` spans the run, its indexes, a due bucket and the holder's live counts, as
the MULTI/EXEC it replaced did; the other two also take the lease out of the live counts)::

    tl:meta                   hash    layout version, due_buckets (checked by every replica)
    tl:{wf:W}:run             string  the run (compact JSON)
    tl:{wf:W}:leases          hash    C → the lease (compact JSON; never a secret): the
                                      run's leases and so also the by-run (and task) index
    tl:{wf:W}:tombs           hash    T → tombstone "until" (µs since the epoch)
    tl:{wf:W}:retired         string  after W was purged: until when (µs) its id starts no
                                      run (expires then; ``create_run`` compares its now)
    tl:creds:b                hash    C → W: where lease C lives; together the all-lease index
    tl:idx:holder:<spiffe id> set     C
    tl:idx:owner:<owner>      set     C
    tl:idx:target:<name>      set     C
    tl:idx:holders            zset    every holder (score 0) for prefix search (BYLEX)
    tl:{due:b}                zset    C → due time (µs)
    tl:{due:b}:inflight       zset    C → visibility deadline (µs) while claimed
    tl:{due:b}:claimed        hash    C → the due time it was claimed at (while claimed)
    tl:idem:<sha256(key)>     string  [fingerprint, C], expires after the idempotency TTL
    tl:live:<holder>          hash    m → how many of the holder's leases, neither revoked
                                      nor expired, expire in the minute ending at minute m
                                      since the epoch (what live-credential limits count)
    tl:live:<holder>|<target> hash    the same, of one target, while it has a limit
    tl:rate:<holder>          hash    t → tokens, at → when last refilled (µs): the holder's
                                      issuance token bucket (expires 2 min after its last use)
    tl:runrate:<orchestrator> hash    the same, of the runs an orchestrator starts
    tl:quarantines            hash    <kind>|<value> → the quarantine (compact JSON)
    tl:idx:run_ends           zset    W → when the run is over (µs): its deadline, earlier when
                                      it ended earlier, later when a lease outlives that (the
                                      retention index; ``broker/retention.py`` purges from it,
                                      and run listings read it backwards)

Memory, not convenience, shaped this (goal: 1 KiB per lease with its index entries, measured
by ``bench/bench_ledger.py``): a hash field costs about half of a key, so leases are fields of
their run's hash (which doubles as the run index) and the id → run pointers are fields of 16
hashes (which double as the all-lease index); a lease record leaves out what its key says
(credential and run id) and refers to the holder and owner instead of repeating them in its
delegation chain. There is no task index: a task is found through its run's hash (runs are
small); a task id alone scans every lease, in bounded batches.

Times are integers in microseconds (exact in JSON and, below 2^53, in sorted-set scores).
Every time is the caller's ``now``: no script reads the Redis server clock (SECURITY 36). The
only server-clock uses are the expiry of idempotency bindings and of idle live counts (a day
after their newest lease expired), which are garbage collection.

Live counts are kept per minute, not per lease, so limits cost a few bytes per holder and
minute rather than per lease: a lease counts from its write-ahead until it is revoked,
discarded, or the minute it expires in has ended (up to 59 s after its expiry: a limit errs on
the side of refusing). A lease's minute is ``ceil(expires_at / 60 s)``.

Lua scripts (each atomic; results are plain strings; only ``write_ahead`` parses JSON, the
run's and the quarantines', with Redis's cjson):

* ``write_ahead`` (the run's leases, the id → run hash, the holder, owner and target sets, the
  holders, the due bucket's three keys, the holder's live counts and token bucket, the
  quarantines, the run, and the idempotency key when the request has one; C, W, record,
  holder, due, binding, binding TTL, now, N, the lease's minute, when to forget the counts,
  the limits, the target): everything a write-ahead writes, in one command; ``{bound,
  binding}`` when the idempotency key is bound already, and, for a new record, ``{run, the
  run}`` when its run is no longer active, ``{quarantined, the quarantine}`` when one in
  force covers it, ``{limit, i, earliest minute}`` when live count ``i`` is at its limit and
  ``{rate, µs}`` without a token (then nothing is written, so a run ended or a quarantine
  stored after the request read them still refuses it); ``ok`` when the record is new or
  exactly this one (a retry),
  ``exists`` when the id is taken (a record written into this run for an id of another run is
  taken back).
* ``cas`` (run leases, and the live counts when the lease is saved revoked for the first
  time; C, expected, new, its minute): set field C to ``new`` only if it holds exactly
  ``expected`` (and count the lease out of the live counts); 1 or 0. ``save_lease`` reads,
  checks the rewrite in Python, then CASes.
* ``activate`` (run leases, run tombstones; C, expected, task, issued_at, activated,
  refused): ``stale`` if the lease changed since it was read; ``tombstoned`` (after writing
  ``refused`` when given: issuing, Vault references recorded) if the task's tombstone is later
  than ``issued_at``; else writes ``activated`` and answers ``ok``.
* ``tombstone`` (run tombstones; task, until): keep the later of the stored and the new until.
* ``discard`` (run leases, the live counts; C, expected, -, its minute): delete field C (and
  count the lease out of the live counts) only if it holds exactly ``expected`` (a write-ahead
  record whose mint was definitely refused); 1 or 0.
* ``forget_idempotency`` (idempotency key; C): delete the binding only if it names C.
* ``peek`` (due, in-flight, claimed; now, limit, cap): first return up to ``cap`` claims whose
  deadline is ≤ now to the due set at the due time they were claimed at (a crashed claimer's
  items come back: SECURITY 35), then list the ``limit`` oldest items due at ``now`` with
  their scores, without claiming them.
* ``claim`` (due, in-flight, claimed; cutoff, count, deadline): move the ``count`` oldest
  items with due ≤ ``cutoff`` into in-flight, scored by ``deadline``; returns them with their
  due times. Items another claimer took in between are simply not there any more, so two
  claimers never hold the same item within a visibility window (SECURITY 34).

``claim_due`` peeks every bucket in one pipeline, picks the globally oldest ``limit`` items,
then claims exactly those per bucket (cutoff = the newest chosen there). A sweep costs
O(buckets + due), not O(active): sorted-set range reads are O(log n + returned).

Durably acknowledged (``redis.durability``), checked on the connection that wrote, in the
same round trip as the ``activate`` script:

* ``fsync`` (default): with WAITAOF (Redis >= 7.2), ``WAITAOF 1 0 <timeout>`` must report the
  local AOF fsynced. Without it (Redis 7.0 has none), the server must run ``appendonly yes``
  and ``appendfsync always``: Redis then fsyncs the AOF before it sends the reply, so the
  script's answer is itself the acknowledgement. ``appendfsync everysec`` without WAITAOF can
  lose up to about two seconds of acknowledged writes on a power loss or kernel crash, so it
  is refused at start-up and at every activation.
* ``replicas``: ``WAIT <durability_replicas> <timeout>`` must report that many replicas.
* ``none``: nothing is awaited (needs ``insecure_allow_degraded_durability``).

A barrier that is not met raises :class:`LedgerUnavailableError` (``ledger.not_acknowledged``);
the write stays (the lease is active and due at its expiry) and the caller revokes.

Every Redis exception becomes a :class:`LedgerUnavailableError` (chained) whose message names
the operation and the exception type or Redis error code, never the URL or the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import re
import zlib
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.client import Pipeline

from broker.adapters.memory_ledger import (
    DueBacklog,
    activated,
    check_claim,
    check_purge_limit,
    check_purge_plan,
    check_rewrite,
    check_selector,
    check_write_ahead,
    key_reused_error,
    lease_order,
    live_limit_error,
    rate_limit_error,
    refused_by_tombstone,
    retired_run_id_error,
    run_rate_limit_error,
    tombstoned_error,
)
from broker.adapters.redis_common import RedisScript, redis_error_code, translated
from broker.adapters.redis_connection import redis_client
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    RunState,
    Sensitivity,
    TargetKind,
    WorkflowRun,
    check_id,
    epoch_micros,
    purge_recheck_at,
    run_over_at,
)
from broker.core.ports import (
    RUN_EXAMINE_FACTOR,
    CheckResult,
    IdempotencyBinding,
    IssuanceLimits,
    LeaseSelector,
    PurgePlan,
    RunPage,
    RunQuery,
    run_page,
)
from broker.errors import (
    BadRequestError,
    ConflictError,
    LedgerUnavailableError,
    NotFoundError,
)

_log = structlog.get_logger("broker.ledger")


def _translated(operation: str) -> contextlib.AbstractContextManager[None]:
    return translated("the ledger", operation)


LAYOUT_VERSION: Final = "1"
# Every Lease field, and only those, is written by _encode_lease; a contract test compares this
# with the dataclass, so a field added to Lease (a secret, say) cannot slip in or out unseen.
STORED_LEASE_FIELDS: Final = frozenset(
    {
        "credential_id",  # in the key
        "workflow_id",  # in the key
        "task_id",
        "target",
        "kind",
        "sensitivity",
        "holder",
        "owner",
        "chain",
        "issued_at",
        "expires_at",
        "state",
        "approval_id",
        "token_accessor",
        "vault_lease_ids",
        "revocable",
        "revoke_reason",
        "attempts",
        "last_error",
        "revoked_at",
        "tool",
        "justification",
    }
)
_NAMESPACE = re.compile(r"[a-z][a-z0-9-]{0,15}")
_SCAN_BATCH = 500
# Claims whose deadline passed, returned per bucket and sweep: bounds one script's run time
# after a claimer with many items died; the rest come back on the next sweeps.
_RETURN_CAP = 1000
# Compare-and-set retries when a lease changes between our read and our write.
_CAS_ATTEMPTS = 8
# Pauses before each new attempt at an activation whose connection was cut (seconds; about a
# second in all, then the last attempt's failure stands).
ACTIVATION_RETRY_DELAYS: Final = (0.0, 0.1, 0.3, 0.6)
_pause = asyncio.sleep  # replaced in tests
# Lease records a purge reads, and deletes in one MULTI/EXEC, at a time.
PURGE_PAGE: Final = 500
# Peek-and-claim rounds of one claim_due when other claimers took chosen items first.
_CLAIM_ROUNDS = 3
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MILLISECOND = timedelta(milliseconds=1)
# Delete a lock only if it still names its owner (another replica may hold it by now).
_UNLOCK: Final = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# Push a lock's expiry out only if it still names its owner (a lapsed lock is not taken back).
_EXTEND: Final = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then"
    " return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
# Redis forgets a holder's live counts this long after its newest lease expired.
_LIVE_SET_GRACE_MS = 86_400_000
_MINUTE_US = 60_000_000
# Hex digits of a request's fingerprint an idempotency binding stores (128 bits: it is only
# compared with the fingerprint of a request presenting the same key).
_STORED_FINGERPRINT = 32
_NO_LIMITS: Final = IssuanceLimits()


# --------------------------------------------------------------------------- durability


@dataclass(frozen=True, slots=True)
class RedisMemory:
    """What Redis holds against its limit (``INFO memory``): with ``noeviction`` a full Redis
    refuses every ledger write, and issuance fails closed."""

    used: int
    maximum: int  # maxmemory; 0: no limit of Redis's own

    @property
    def share(self) -> float | None:
        """``used`` over ``maximum``, or None without a limit."""
        return self.used / self.maximum if self.maximum > 0 else None


MEMORY_ALARM_SHARE: Final = 0.9


@dataclass(frozen=True, slots=True)
class RedisDurability:
    """What Redis says about persistence, eviction and acknowledgements, and what the
    broker is configured to require (``mode``: ``redis.durability``)."""

    appendonly: bool
    appendfsync: str
    maxmemory_policy: str
    rdb_save: str
    server_version: str = ""
    waitaof: bool = False
    connected_replicas: int = 0
    mode: str = "fsync"
    replicas_required: int = 1

    @property
    def acknowledgement(self) -> str | None:
        """How an activation is durably acknowledged here, or None when it cannot be."""
        if self.mode == "none":
            return "none"
        if self.mode == "replicas":
            if self.connected_replicas >= self.replicas_required:
                return f"WAIT {self.replicas_required}"
            return None
        if not self.appendonly:
            return None
        if self.waitaof:
            return "WAITAOF 1"
        if self.appendfsync == "always":
            return "appendfsync always"
        return None

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
        if self.mode == "none":
            found.append(
                "redis.durability is 'none': secrets are returned without a durable "
                "acknowledgement of their lease"
            )
        elif self.mode == "replicas" and self.connected_replicas < self.replicas_required:
            found.append(
                f"redis.durability is 'replicas' and needs {self.replicas_required} connected "
                f"replica(s) for WAIT, found {self.connected_replicas}"
            )
        elif self.mode == "fsync" and self.appendonly and self.acknowledgement is None:
            version = self.server_version or "this server"
            found.append(
                f"appendfsync is {self.appendfsync!r} and Redis {version} has no WAITAOF "
                "(Redis >= 7.2): an acknowledged lease can be lost on a power loss; set "
                "appendfsync always, or redis.durability = 'replicas'"
            )
        return found


def _online_replicas(replication: dict[str, Any]) -> int:
    """Replicas in state ``online`` (INFO replication's ``slaveN`` entries): one still in its
    initial sync counts in ``connected_slaves`` but acknowledges no WAIT."""
    return sum(
        1
        for name, replica in replication.items()
        if name.startswith("slave")
        and name[5:].isdecimal()
        and isinstance(replica, dict)
        and replica.get("state") == "online"
    )


# --------------------------------------------------------------------------- errors


def _raise_first_error(results: Sequence[object]) -> None:
    for result in results:
        if isinstance(result, redis.exceptions.RedisError):
            raise result


def _corrupt(what: str, exc: Exception) -> LedgerUnavailableError:
    return LedgerUnavailableError(
        f"the ledger record {what} is unreadable ({type(exc).__name__}); it was not written "
        "by this version of tasklease or was modified by hand",
        reason="ledger.corrupt",
    )


# --------------------------------------------------------------------------- records


def _live_minute(lease: Lease) -> int:
    """The minute (since the epoch) whose end the lease counts against live limits until: the
    minute its expiry falls in, rounded up."""
    return -(-epoch_micros(lease.expires_at) // _MINUTE_US)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _grouped(pairs: Iterable[tuple[_K, _V]]) -> dict[_K, list[_V]]:
    """The values of ``(key, value)`` pairs by key, each group in the order given."""
    groups: dict[_K, list[_V]] = {}
    for name, value in pairs:
        groups.setdefault(name, []).append(value)
    return groups


def _moment(micros: int) -> datetime:
    if not isinstance(micros, int):
        raise TypeError(f"expected integer microseconds, got {type(micros).__name__}")
    return _EPOCH + micros * _MICROSECOND


# A delegation hop's principal is usually the lease's holder or owner: stored as a reference.
_HOLDER_REF, _OWNER_REF = 1, 2


def _principal_ref(principal: str, lease: Lease) -> str | int:
    if principal == lease.holder:
        return _HOLDER_REF
    if principal == lease.owner:
        return _OWNER_REF
    return principal


def _principal(ref: object, holder: str, owner: str) -> str:
    if isinstance(ref, str):
        return ref
    if ref == _HOLDER_REF and not isinstance(ref, bool):
        return holder
    if ref == _OWNER_REF and not isinstance(ref, bool):
        return owner
    raise ValueError(f"unknown principal reference {ref!r}")


def _encode_lease(lease: Lease) -> str:
    """Compact JSON of everything but the credential and run ids (the key holds those)."""
    doc: dict[str, Any] = {
        "v": 1,
        "t": lease.task_id,
        "g": lease.target,
        "k": lease.kind.value,
        "s": lease.sensitivity.value,
        "h": lease.holder,
        "o": lease.owner,
        "ch": [
            [hop.role, _principal_ref(hop.principal, lease), int(hop.verified)]
            for hop in lease.chain.hops
        ],
        "ia": epoch_micros(lease.issued_at),
        "ea": epoch_micros(lease.expires_at),
        "st": lease.state.value,
    }
    # Fields at their defaults are left out: most leases carry few of them, and every byte is
    # paid once per lease.
    if lease.approval_id is not None:
        doc["ap"] = lease.approval_id
    if lease.token_accessor:
        doc["ta"] = lease.token_accessor
    if lease.vault_lease_ids:
        doc["vl"] = list(lease.vault_lease_ids)
    if not lease.revocable:
        doc["rv"] = 0
    if lease.revoke_reason:
        doc["rr"] = lease.revoke_reason
    if lease.attempts:
        doc["at"] = lease.attempts
    if lease.last_error:
        doc["le"] = lease.last_error
    if lease.revoked_at is not None:
        doc["ra"] = epoch_micros(lease.revoked_at)
    if lease.tool:
        doc["tl"] = lease.tool
    if lease.justification:
        doc["js"] = lease.justification
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _decode_quarantine(text: str) -> Quarantine:
    """A quarantine as :meth:`RedisLedger.set_quarantine` stored it (``ledger.corrupt`` when
    it is unreadable)."""
    try:
        doc = json.loads(text)
        return Quarantine(
            kind=QuarantineKind(doc["kind"]),
            value=doc["value"],
            reason=doc["reason"],
            created_by=doc["by"],
            created_at=_moment(doc["at"]),
            expires_at=_moment(doc["until"]),
        )
    except (ValueError, KeyError, TypeError, BadRequestError) as exc:
        raise LedgerUnavailableError(
            f"a stored quarantine is unreadable ({type(exc).__name__})",
            reason="ledger.corrupt",
        ) from exc


def _unindex(pipe: Pipeline, keys: _Keys, lease: Lease) -> None:
    """Queue the removal of ``lease`` from every index and due entry outside its run's keys
    (its id → run pointer, the holder, owner and target sets, its due bucket's three keys)."""
    cid = lease.credential_id
    bucket = keys.bucket(cid)
    due, in_flight, claimed = keys.due(bucket)
    pipe.hdel(keys.creds(bucket), cid)
    pipe.srem(keys.holder(lease.holder), cid)
    pipe.srem(keys.owner(lease.owner), cid)
    pipe.srem(keys.target(lease.target), cid)
    pipe.zrem(due, cid)
    pipe.zrem(in_flight, cid)
    pipe.hdel(claimed, cid)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Survey(NamedTuple):
    """What a purge reads of a run's leases (``RedisLedger._survey``)."""

    over: datetime
    states: dict[str, int]
    live: int
    digest: str


class _LeasesDigest:
    """An order-free fingerprint of lease records ``(id, text)``, added a page at a time: how
    many, and the XOR of their SHA-256 (a scan's pages come in no particular order)."""

    def __init__(self, records: Iterable[tuple[str, str]] = ()) -> None:
        self._count, self._folded = 0, 0
        self.add(records)

    def add(self, records: Iterable[tuple[str, str]]) -> None:
        for cid, raw in records:
            self._count += 1
            digest = hashlib.sha256(f"{cid}\t{raw}".encode()).digest()
            self._folded ^= int.from_bytes(digest, "big")

    @property
    def value(self) -> str:
        return f"{self._count}-{self._folded:064x}"


def _decode_lease(raw: str, credential_id: str, workflow_id: str, where: str) -> Lease:
    try:
        doc = json.loads(raw)
        holder, owner = str(doc["h"]), str(doc["o"])
        revoked_at = doc.get("ra")
        return Lease(
            credential_id=credential_id,
            workflow_id=workflow_id,
            task_id=str(doc["t"]),
            target=str(doc["g"]),
            kind=TargetKind(doc["k"]),
            sensitivity=Sensitivity(doc["s"]),
            holder=holder,
            owner=owner,
            chain=DelegationChain(
                tuple(
                    DelegationHop(str(role), _principal(ref, holder, owner), bool(verified))
                    for role, ref, verified in doc["ch"]
                )
            ),
            issued_at=_moment(doc["ia"]),
            expires_at=_moment(doc["ea"]),
            state=LeaseState(doc["st"]),
            approval_id=None if doc.get("ap") is None else str(doc["ap"]),
            token_accessor=str(doc.get("ta", "")),
            vault_lease_ids=tuple(str(i) for i in doc.get("vl", ())),
            revocable=bool(doc.get("rv", 1)),
            revoke_reason=str(doc.get("rr", "")),
            attempts=int(doc.get("at", 0)),
            last_error=str(doc.get("le", "")),
            revoked_at=None if revoked_at is None else _moment(revoked_at),
            tool=str(doc.get("tl", "")),
            justification=str(doc.get("js", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(where, exc) from exc


def _encode_run(run: WorkflowRun) -> str:
    doc: dict[str, Any] = {
        "v": 1,
        "id": run.id,
        "o": run.owner,
        "p": run.purpose,
        "sb": run.started_by,
        "ca": epoch_micros(run.created_at),
        "dl": epoch_micros(run.deadline),
        "st": run.state.value,
    }
    if run.labels:
        doc["lb"] = dict(run.labels)
    if run.participants:
        doc["pt"] = list(run.participants)
    if run.ended_at is not None:
        doc["ed"] = epoch_micros(run.ended_at)
    if run.outcome:
        doc["oc"] = run.outcome
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _score(value: bytes | str) -> int:
    """A sorted-set score of this ledger (integer microseconds, below 2^53) as an int."""
    return int(float(value))


def _decode_run(raw: str, where: str) -> WorkflowRun:
    try:
        doc = json.loads(raw)
        ended = doc.get("ed")
        return WorkflowRun(
            id=str(doc["id"]),
            owner=str(doc["o"]),
            purpose=str(doc["p"]),
            started_by=str(doc["sb"]),
            created_at=_moment(doc["ca"]),
            deadline=_moment(doc["dl"]),
            labels={str(k): str(v) for k, v in doc.get("lb", {}).items()},
            participants=tuple(str(p) for p in doc.get("pt", ())),
            state=RunState(doc["st"]),
            ended_at=None if ended is None else _moment(ended),
            outcome=str(doc.get("oc", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(where, exc) from exc


# --------------------------------------------------------------------------- keys and scripts


class _Keys:
    """Every key name of the layout in the module docstring."""

    def __init__(self, namespace: str, due_buckets: int) -> None:
        self.ns = namespace
        self.due_buckets = due_buckets
        self.meta = f"{namespace}:meta"
        self.holders = f"{namespace}:idx:holders"
        self.run_ends = f"{namespace}:idx:run_ends"

    def run(self, workflow_id: str) -> str:
        return f"{self.ns}:{{wf:{workflow_id}}}:run"

    def leases(self, workflow_id: str) -> str:
        return f"{self.ns}:{{wf:{workflow_id}}}:leases"

    def tombstones(self, workflow_id: str) -> str:
        return f"{self.ns}:{{wf:{workflow_id}}}:tombs"

    def retired(self, workflow_id: str) -> str:
        """Until when (µs) a purged run's id may not start a new run."""
        return f"{self.ns}:{{wf:{workflow_id}}}:retired"

    def bucket(self, credential_id: str) -> int:
        # CRC32, not hash(): every process must put an id in the same bucket.
        return zlib.crc32(credential_id.encode()) % self.due_buckets

    def creds(self, bucket: int) -> str:
        return f"{self.ns}:creds:{bucket}"

    def holder(self, holder: str) -> str:
        return f"{self.ns}:idx:holder:{holder}"

    def owner(self, owner: str) -> str:
        return f"{self.ns}:idx:owner:{owner}"

    def target(self, target: str) -> str:
        return f"{self.ns}:idx:target:{target}"

    def due(self, bucket: int) -> list[str]:
        """The due set, its in-flight set and its claimed-at hash (one slot)."""
        tag = f"{self.ns}:{{due:{bucket}}}"
        return [tag, f"{tag}:inflight", f"{tag}:claimed"]

    def lock(self, name: str) -> str:
        return f"{self.ns}:lock:{name}"

    def rate(self, holder: str) -> str:
        """The holder's issuance token bucket."""
        return f"{self.ns}:rate:{holder}"

    def run_rate(self, orchestrator: str) -> str:
        """The orchestrator's run-start token bucket."""
        return f"{self.ns}:runrate:{orchestrator}"

    def live(self, holder: str, target: str | None = None) -> str:
        """The holder's live counts per expiry minute, of all its leases or of one target's
        ('|' is in neither a SPIFFE ID nor a target name)."""
        if target is None:
            return f"{self.ns}:live:{holder}"
        return f"{self.ns}:live:{holder}|{target}"

    @property
    def quarantines(self) -> str:
        """One hash of every quarantine: ``<kind>|<value>`` → JSON (a handful, read per
        issuance in one round trip)."""
        return f"{self.ns}:quarantines"

    def idempotency(self, key: str) -> str:
        # Hashed: keys embed the caller's SPIFFE ID and may be long or contain braces.
        return f"{self.ns}:idem:{hashlib.sha256(key.encode()).hexdigest()}"


# A token bucket (``bucket``: t → tokens, at → when last refilled, µs) refilled at ``now`` for
# the time since, a token per 60/``rate`` s and at most ``rate``; into ``tokens`` and
# ``refilled``; without a whole token the script answers {'rate', <µs until the next>}.
_REFILL = """
    local held = redis.call('HMGET', bucket, 't', 'at')
    tokens = tonumber(held[1]) or rate
    refilled = tonumber(held[2]) or now
    if now > refilled then
      tokens = math.min(rate, tokens + (now - refilled) * rate / 60000000)
      refilled = now
    end
    if tokens < 1 then
      return {'rate', tostring(math.ceil((1 - tokens) * 60000000 / rate))}
    end
"""

# One write-ahead, atomically and in one command (it was a MULTI of nine). KEYS: the nine of
# the record, its indexes and due entry; then N live counts (the holder's, and the holder's
# for this target when the target has a limit); the holder's issuance token bucket; the
# quarantines hash; the run; then the idempotency key when there is a binding. ARGV:
# credential id, run id, the lease record, its holder, its due time = expiry (µs), the
# idempotency binding (or ''), its TTL (ms), now (µs), N, the lease's minute, when the live
# counts may be forgotten (ms, garbage collection only), N limits (0: none), the issuances per
# minute (0: none), the lease's target.
# 1. A key bound already answers {'bound', <the binding>} and nothing is written.
# 2. Unless this very record is stored already (a retried call): a stored run that is not
#    active now (ended, or past its deadline) answers {'run', <its stored text>}; a quarantine
#    in force now that covers the holder (or a prefix of it), the run or the target answers
#    {'quarantined', <its stored text>} (unreadable ones answer too: fail closed); each live
#    count drops the minutes that ended by now and sums the rest; one at its limit answers
#    {'limit', <its index>, <its earliest minute>}; then the bucket is refilled for the time
#    since it last was (a token per 60/rate s, at most rate) and, without a whole token,
#    answers {'rate', <µs until the next>}: in all these cases nothing is written.
# 3. Everything is written as the MULTI wrote it, the index and due entries also when the id
#    turns out to be taken (harmless: extra index members are filtered on read, and the due
#    time can only move earlier, ZADD LT); then 'ok' when the record is new (counted in the
#    live counts, a token taken, the key bound) or exactly this one (a retried call), else
#    'exists' — after taking back the record just written into this run if the id belongs to
#    another run.
_WRITE_AHEAD = RedisScript(
    "write_ahead",
    """
local n = tonumber(ARGV[9])
local bucket = KEYS[10 + n]
local quarantines = KEYS[11 + n]
local idem = KEYS[13 + n]
local rate = tonumber(ARGV[12 + n])
local tokens, refilled = 0, 0
if ARGV[6] ~= '' then
  local bound = redis.call('GET', idem)
  if bound then return {'bound', bound} end
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then
  local now = tonumber(ARGV[8])
  local run = redis.call('GET', KEYS[12 + n])
  if run then
    local ok, r = pcall(cjson.decode, run)
    if not ok or type(r) ~= 'table' or r['st'] ~= 'active' or type(r['dl']) ~= 'number'
        or now >= r['dl'] then
      return {'run', run}
    end
  end
  local held = redis.call('HGETALL', quarantines)
  for j = 2, #held, 2 do
    local ok, q = pcall(cjson.decode, held[j])
    if not ok or type(q) ~= 'table' or type(q['kind']) ~= 'string'
        or type(q['value']) ~= 'string' or type(q['until']) ~= 'number' then
      return {'quarantined', held[j]}
    end
    local kind, value = q['kind'], q['value']
    if now < q['until'] and ((kind == 'identity' and value == ARGV[4])
        or (kind == 'identity_prefix' and string.sub(ARGV[4], 1, #value) == value)
        or (kind == 'workflow' and value == ARGV[2])
        or (kind == 'target' and value == ARGV[13 + n])) then
      return {'quarantined', held[j]}
    end
  end
  for i = 1, n do
    local limit = tonumber(ARGV[11 + i])
    local counts = redis.call('HGETALL', KEYS[9 + i])
    local live, earliest = 0, nil
    for j = 1, #counts, 2 do
      local minute = tonumber(counts[j])
      if minute * 60000000 <= now then
        redis.call('HDEL', KEYS[9 + i], counts[j])
      else
        live = live + tonumber(counts[j + 1])
        if earliest == nil or minute < earliest then earliest = minute end
      end
    end
    if limit > 0 and live >= limit then return {'limit', tostring(i), tostring(earliest)} end
  end
  if rate > 0 then
"""
    + _REFILL
    + """
  end
end
local located = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local recorded = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[6], 0, ARGV[4])
redis.call('ZREM', KEYS[8], ARGV[1])
redis.call('HDEL', KEYS[9], ARGV[1])
redis.call('ZADD', KEYS[7], 'LT', ARGV[5], ARGV[1])
if located == 1 and recorded == 1 then
  for i = 1, n do
    redis.call('HINCRBY', KEYS[9 + i], ARGV[10], 1)
    redis.call('PEXPIREAT', KEYS[9 + i], ARGV[11], 'NX')
    redis.call('PEXPIREAT', KEYS[9 + i], ARGV[11], 'GT')
  end
  if rate > 0 then
    redis.call('HSET', bucket, 't', tostring(tokens - 1), 'at', tostring(refilled))
    redis.call('PEXPIRE', bucket, 120000)
  end
  if ARGV[6] ~= '' then redis.call('SET', idem, ARGV[6], 'PX', ARGV[7]) end
  return 'ok'
end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  if recorded == 1 then redis.call('HDEL', KEYS[2], ARGV[1]) end
  return 'exists'
end
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[3] then return 'ok' end
return 'exists'
""",
)

# Count a lease out of the live counts KEYS[2..] in its minute ARGV[4], if that minute is
# still counted (a minute that ended was dropped with every lease in it).
_UNCOUNT = """
for i = 2, #KEYS do
  local left = tonumber(redis.call('HGET', KEYS[i], ARGV[4]) or '0')
  if left > 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[4], -1)
  elseif left == 1 then
    redis.call('HDEL', KEYS[i], ARGV[4])
  end
end
"""

# KEYS: the run's leases, then the live counts the lease leaves (saved revoked the first time);
# ARGV: C, expected, new, the lease's minute.
_CAS = RedisScript(
    "cas",
    """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
"""
    + _UNCOUNT
    + """
return 1
""",
)

_ACTIVATE = RedisScript(
    "activate",
    """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 'stale' end
local tomb = redis.call('HGET', KEYS[2], ARGV[3])
if tomb and tonumber(tomb) > tonumber(ARGV[4]) then
  if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[6]) end
  return 'tombstoned'
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[5]) end
return 'ok'
""",
)

_TOMBSTONE = RedisScript(
    "tombstone",
    """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (not current) or tonumber(ARGV[2]) > tonumber(current) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
""",
)

_PEEK = RedisScript(
    "peek",
    """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(expired) do
  local due = redis.call('HGET', KEYS[3], member) or redis.call('ZSCORE', KEYS[2], member)
  redis.call('ZADD', KEYS[1], due, member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[3], member)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
""",
)

_CLAIM = RedisScript(
    "claim",
    """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
                         'LIMIT', 0, ARGV[2])
for i = 1, #items, 2 do
  redis.call('ZREM', KEYS[1], items[i])
  redis.call('ZADD', KEYS[2], ARGV[3], items[i])
  redis.call('HSET', KEYS[3], items[i], items[i + 1])
end
return items
""",
)

# KEYS: the run's leases, then the live counts the lease leaves; ARGV: C, expected, (unused),
# the lease's minute.
_DISCARD = RedisScript(
    "discard",
    """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
"""
    + _UNCOUNT
    + """
return 1
""",
)

# The binding is [fingerprint, credential id] as JSON; delete it only if it names ARGV[1].
_FORGET_IDEMPOTENCY = RedisScript(
    "forget_idempotency",
    """
local bound = redis.call('GET', KEYS[1])
if not bound then return 0 end
local ok, doc = pcall(cjson.decode, bound)
if ok and type(doc) == 'table' and doc[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
)

# A new run and its entry in the retention index (score: its deadline, µs): 0 and nothing
# written when the id is taken; {'retired', <until, µs>} when a purged run's id is retired
# past now; with a rate (runs per minute, 0: none) its orchestrator's token bucket is
# refilled for the time since it last was, as the write-ahead's is, and without a whole token
# answers {'rate', <µs until the next>} and writes nothing. KEYS: run, run ends, the bucket,
# the id's retirement; ARGV: the run, its deadline, its id, now (µs), the rate.
_CREATE_RUN = RedisScript(
    "create_run",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local retired = redis.call('GET', KEYS[4])
if retired and tonumber(retired) > tonumber(ARGV[4]) then return {'retired', retired} end
local bucket = KEYS[3]
local rate = tonumber(ARGV[5])
local now = tonumber(ARGV[4])
local tokens, refilled = rate, now
if rate > 0 then
"""
    + _REFILL
    + """
  redis.call('HSET', bucket, 't', tostring(tokens - 1), 'at', tostring(refilled))
  redis.call('PEXPIRE', bucket, 120000)
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
""",
)

# Overwrite an existing run; when it ended, its index entry moves to when it ended if that is
# earlier (LT; a run stored before the index existed gets its entry here). KEYS: run, run
# ends; ARGV: the run, when it ended (µs) or '', its id.
_SAVE_RUN = RedisScript(
    "save_run",
    """
if not redis.call('SET', KEYS[1], ARGV[1], 'XX') then return 0 end
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], 'LT', ARGV[2], ARGV[3]) end
return 1
""",
)

# Retention: drop the index entry of a run that does not exist (KEYS: run, run ends; ARGV: its
# id), and the holder from the holders index once its last lease is gone (KEYS: the holder's
# set, holders; ARGV: the holder). Each checks and removes in one step, so a run or lease
# written meanwhile keeps its entry.
_FORGET_RUN_END = RedisScript(
    "forget_run_end",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
""",
)
_FORGET_HOLDER = RedisScript(
    "forget_holder",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
""",
)

_SCRIPTS: Final = (
    _WRITE_AHEAD,
    _CAS,
    _ACTIVATE,
    _TOMBSTONE,
    _PEEK,
    _CLAIM,
    _DISCARD,
    _FORGET_IDEMPOTENCY,
    _CREATE_RUN,
    _SAVE_RUN,
    _FORGET_RUN_END,
    _FORGET_HOLDER,
)


def _pairs(flat: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(score, member) from a flat WITHSCORES reply; scores are whole microseconds."""
    for i in range(0, len(flat), 2):
        yield int(float(flat[i + 1])), flat[i]


# --------------------------------------------------------------------------- the ledger


class RedisLedger:  # satisfies core.ports.Ledger
    """The lease ledger in Redis (single node or Sentinel; the layout is Cluster-ready).

    ``namespace`` prefixes every key (tests and benchmarks use their own).
    """

    def __init__(self, *, settings: RedisSettings, namespace: str = "tl") -> None:
        if _NAMESPACE.fullmatch(namespace) is None:
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        self._settings = settings
        self._keys = _Keys(namespace, settings.due_buckets)
        # One Redis or the master behind Sentinel, with a pool on which a burst of commands
        # waits briefly for a connection (broker/adapters/redis_connection.py).
        self._redis: aioredis.Redis = redis_client(settings)
        self._layout_checked = False
        self._waitaof: bool | None = None

    @property
    def namespace(self) -> str:
        """The prefix of every key of this ledger."""
        return self._keys.ns

    @property
    def allows_degraded(self) -> bool:
        """True when the operator allowed running on a non-durable Redis."""
        return self._settings.insecure_allow_degraded_durability

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client (for adapters that share the connection pool)."""
        return self._redis

    # ---- durability

    async def durability(self) -> RedisDurability:
        """Read the persistence, eviction and replication settings."""
        try:
            values: dict[str, str] = {}
            for key in ("appendonly", "appendfsync", "maxmemory-policy", "save"):
                reply = await self._redis.config_get(key)
                values.update({str(k): str(v) for k, v in reply.items()})
            server = await self._redis.info("server")
            replication = await self._redis.info("replication")
        except (redis.exceptions.RedisError, OSError) as exc:
            raise LedgerUnavailableError(
                f"cannot read Redis configuration ({redis_error_code(exc)})",
                reason="ledger.unreachable",
            ) from exc
        return RedisDurability(
            appendonly=values.get("appendonly") == "yes",
            appendfsync=values.get("appendfsync", ""),
            maxmemory_policy=values.get("maxmemory-policy", ""),
            rdb_save=values.get("save", ""),
            server_version=str(server.get("redis_version", "")),
            waitaof=await self._supports_waitaof(),
            connected_replicas=_online_replicas(replication),
            mode=self._settings.durability,
            replicas_required=self._settings.durability_replicas,
        )

    async def memory(self) -> RedisMemory:
        """How much memory Redis uses, and its ``maxmemory``."""
        with _translated("memory"):
            info = await self._redis.info("memory")
        return RedisMemory(
            used=int(info.get("used_memory", 0)), maximum=int(info.get("maxmemory", 0))
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

    async def _supports_waitaof(self) -> bool:
        """Whether the server knows WAITAOF (Redis >= 7.2), probed once with a no-op call
        (0 local, 0 replicas: answers at once) rather than guessed from the version."""
        if self._waitaof is None:
            try:
                await self._redis.execute_command(  # type: ignore[no-untyped-call]  # redis-py
                    "WAITAOF", 0, 0, 1
                )
            except redis.exceptions.ResponseError:
                self._waitaof = False
            except redis.exceptions.RedisError as exc:
                raise LedgerUnavailableError(
                    f"Redis is unreachable ({redis_error_code(exc)})", reason="ledger.unreachable"
                ) from exc
            else:
                self._waitaof = True
        return self._waitaof

    def _queue_barrier(self, pipe: Pipeline) -> None:
        settings = self._settings
        if settings.durability == "replicas":
            pipe.wait(settings.durability_replicas, settings.durability_timeout_ms)
        elif settings.durability == "fsync":
            if self._waitaof:
                pipe.execute_command("WAITAOF", 1, 0, settings.durability_timeout_ms)
            else:
                pipe.config_get("appendonly", "appendfsync")

    def _check_barrier(self, replies: Sequence[object], credential_id: str) -> None:
        """Raise ``ledger.not_acknowledged`` unless the barrier's reply confirms the write."""
        settings = self._settings
        if settings.durability == "none":
            return
        reply = replies[0] if replies else None
        problem = ""
        if isinstance(reply, redis.exceptions.RedisError):
            problem = f"the acknowledgement failed ({redis_error_code(reply)})"
        elif settings.durability == "replicas":
            if not isinstance(reply, int) or reply < settings.durability_replicas:
                problem = (
                    f"WAIT: {reply} of {settings.durability_replicas} replica(s) acknowledged "
                    f"within {settings.durability_timeout_ms} ms"
                )
        elif self._waitaof:
            if not isinstance(reply, list) or not reply or int(reply[0]) < 1:
                problem = (
                    f"WAITAOF: the AOF was not fsynced within {settings.durability_timeout_ms} ms"
                )
        else:
            config = reply if isinstance(reply, dict) else {}
            if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
                problem = (
                    f"Redis runs appendonly {config.get('appendonly')!r} with appendfsync "
                    f"{config.get('appendfsync')!r} and has no WAITAOF, so the write is not "
                    "known to be fsynced (needs appendonly yes and appendfsync always)"
                )
        if problem:
            _log.warning("ledger.not_acknowledged", credential_id=credential_id, problem=problem)
            raise LedgerUnavailableError(
                f"lease {credential_id} was written but not durably acknowledged: {problem}",
                reason="ledger.not_acknowledged",
            )

    async def ping(self) -> None:
        """Raise :class:`LedgerUnavailableError` unless Redis answers."""
        try:
            await self._redis.ping()
        except redis.exceptions.RedisError as exc:
            raise LedgerUnavailableError(
                f"Redis is unreachable ({redis_error_code(exc)})", reason="ledger.unreachable"
            ) from exc

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    # ---- retention

    async def runs_over_before(self, cutoff: datetime, *, limit: int) -> list[str]:
        """Up to ``limit`` run ids whose recorded end is at or before ``cutoff``, oldest
        first (``ZRANGE BYSCORE`` on the run-ends index)."""
        check_purge_limit(limit)
        with _translated("runs_over_before"):
            found = await self._redis.zrange(
                self._keys.run_ends, 0, epoch_micros(cutoff), byscore=True, offset=0, num=limit
            )
        return [str(run_id) for run_id in found]

    async def list_runs(self, query: RunQuery) -> RunPage:
        """The runs ``query`` selects, latest over first: the run-ends index read backwards
        from the cursor (``ZRANGE BYSCORE REV``), then those runs in one ``MGET``. Reads at
        most the examining budget of :func:`~broker.core.ports.run_page` (``limit`` entries
        with no filter); a run that cannot be read is skipped and logged."""
        wanted = query.limit * RUN_EXAMINE_FACTOR if query.filtered else query.limit
        after = query.after
        index = self._keys.run_ends
        with _translated("list_runs"):
            # Entries at the cursor's own time that the last page already examined are read
            # again (a score range cannot start in the middle of equal scores) and skipped.
            ties = 0
            if after is not None:
                ties = int(await self._redis.zcount(index, after.over_us, after.over_us))
            asked = wanted + ties + 1
            found: list[tuple[str, int]] = await self._redis.zrange(  # type: ignore[assignment]  # withscores, score_cast_func
                index,
                "+inf" if after is None else after.over_us,
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=asked,
                withscores=True,
                score_cast_func=_score,
            )
            entries = [
                (over_us, str(run_id))
                for run_id, over_us in found
                if after is None or after.follows(over_us, str(run_id))
            ][: wanted + 1]
            keys = [self._keys.run(run_id) for _, run_id in entries[:wanted]]
            raws = await self._redis.mget(keys) if keys else []
        runs: list[WorkflowRun | None] = []
        for key, raw in zip(keys, raws, strict=True):
            try:
                runs.append(None if raw is None else _decode_run(str(raw), key))
            except LedgerUnavailableError as exc:  # one bad record hides no other
                _log.error("ledger.run_unreadable", key=key, detail=exc.detail)
                runs.append(None)
        if len(entries) > wanted:
            runs.append(None)  # the entry past the budget: never examined, only counted
        listed = [
            (over_us, run_id, run) for (over_us, run_id), run in zip(entries, runs, strict=True)
        ]
        return run_page(listed, query, more=len(found) == asked)

    async def index_runs(self, *, batch: int = 1000) -> int:
        """Put each run stored before the retention index existed into it, at its recorded
        end (``ZADD NX``: an entry already there stays), scanning the runs in bounded batches;
        once per ledger (the meta hash records that it was done). How many it added."""
        meta = self._keys.meta
        with _translated("index_runs"):
            if await self._redis.hget(meta, "runs_indexed") == "1":
                return 0
            added, cursor = 0, 0
            pattern = f"{self._keys.ns}:{{wf:*}}:run"
            while True:
                cursor, found = await self._redis.scan(cursor, match=pattern, count=batch)
                ends: dict[str, int] = {}
                if found:
                    for key, raw in zip(found, await self._redis.mget(found), strict=True):
                        if raw is None:
                            continue  # purged meanwhile
                        try:
                            run = _decode_run(str(raw), str(key))
                        except LedgerUnavailableError as exc:  # one bad record stops no other
                            _log.error("ledger.run_unreadable", key=str(key), detail=exc.detail)
                            continue
                        ends[run.id] = epoch_micros(run_over_at(run, ()))
                if ends:
                    added += int(await self._redis.zadd(self._keys.run_ends, ends, nx=True) or 0)
                if int(cursor) == 0:
                    break
            await self._redis.hset(meta, "runs_indexed", "1")
        if added:
            _log.info("ledger.runs_indexed", runs=added)
        return added

    async def plan_purge(self, workflow_id: str, *, cutoff: datetime) -> PurgePlan:
        """Read the run, then its leases in pages (``HSCAN``: a large run is never read at
        once). Ready when everything of the run is over by ``cutoff`` and no credential of it
        is live (:func:`~broker.core.model.purge_recheck_at`); otherwise its index entry moves
        to the time to look again; gone (its index entry dropped) when there is no run.
        The version is a digest of the run's text and of its leases' (order-free)."""
        check_id(workflow_id, "workflow id")
        keys = self._keys
        run_key = keys.run(workflow_id)
        with _translated("plan_purge"):
            raw_run = await self._redis.get(run_key)
        if raw_run is None:
            await self._script(
                "plan_purge", _FORGET_RUN_END, [run_key, keys.run_ends], [workflow_id]
            )
            return PurgePlan(workflow_id, None, None, ready=False)
        run = _decode_run(str(raw_run), run_key)
        survey = await self._survey(run)
        later = purge_recheck_at(survey.over, cutoff, unsettled=survey.live)
        if later is not None:
            with _translated("plan_purge"):
                await self._redis.zadd(keys.run_ends, {workflow_id: epoch_micros(later)}, xx=True)
            return PurgePlan(workflow_id, run, survey.over, ready=False, lease_states=survey.states)
        return PurgePlan(
            workflow_id,
            run,
            survey.over,
            ready=True,
            lease_states=survey.states,
            version=f"{_digest(str(raw_run))}:{survey.digest}",
        )

    async def purge(self, plan: PurgePlan, *, retire_until: datetime | None = None) -> bool:
        """Delete the run of a ready ``plan`` with its leases, tombstones and every index and
        due entry of them, if neither the run nor its leases changed since the plan (read
        again and compared with its version); False, and nothing deleted, when they did. With
        ``retire_until``, the run's id is retired until then in the same transaction as the
        run's deletion (a key that expires then: ``create_run`` refuses the id meanwhile).

        Up to ``PURGE_PAGE`` leases this is one MULTI/EXEC under WATCH of the run and its
        leases. A larger run is deleted a page of leases per MULTI/EXEC (so neither the broker
        nor Redis holds or blocks on all of it at once), then the run under WATCH once no lease
        is left: a run that is over takes no new lease (its write-ahead is refused), so what
        the comparison saw is what goes. Then each holder leaves the holders index if it holds
        nothing else."""
        run = check_purge_plan(plan)
        keys = self._keys
        workflow_id = plan.workflow_id
        run_key, leases_key = keys.run(workflow_id), keys.leases(workflow_id)
        planned_run, planned_leases = plan.version.split(":")
        holders: set[str] = set()
        paged = plan.leases > PURGE_PAGE
        with _translated("purge"):
            if paged:
                raw_run = await self._redis.get(run_key)
                if raw_run is None or _digest(str(raw_run)) != planned_run:
                    return False
                if (await self._survey(run)).digest != planned_leases:
                    return False
                async for page in self._lease_pages(workflow_id):
                    leases = [_decode_lease(raw, cid, workflow_id, leases_key) for cid, raw in page]
                    async with self._redis.pipeline(transaction=True) as pipe:
                        pipe.hdel(leases_key, *(lease.credential_id for lease in leases))
                        for lease in leases:
                            _unindex(pipe, keys, lease)
                        await pipe.execute()
                    holders.update(lease.holder for lease in leases)
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(run_key, leases_key)
                raw_run = await pipe.get(run_key)
                raw_leases = {
                    str(cid): str(raw) for cid, raw in (await pipe.hgetall(leases_key)).items()
                }
                # What is left: after the pages, nothing; otherwise exactly what was planned.
                expected = _LeasesDigest().value if paged else planned_leases
                if (
                    raw_run is None
                    or _digest(str(raw_run)) != planned_run
                    or _LeasesDigest(raw_leases.items()).value != expected
                ):
                    await pipe.unwatch()  # type: ignore[no-untyped-call]  # redis-py
                    return False
                leases = [
                    _decode_lease(raw, cid, workflow_id, leases_key)
                    for cid, raw in raw_leases.items()
                ]
                pipe.multi()  # type: ignore[no-untyped-call]  # redis-py
                pipe.delete(run_key, leases_key, keys.tombstones(workflow_id))
                pipe.zrem(keys.run_ends, workflow_id)
                if retire_until is not None:
                    # The value is what create_run compares with its caller's clock; the expiry
                    # (Redis's clock) only collects the key afterwards.
                    pipe.set(
                        keys.retired(workflow_id),
                        epoch_micros(retire_until),
                        pxat=max(epoch_micros(retire_until) // 1000, 1),
                    )
                for lease in leases:
                    _unindex(pipe, keys, lease)
                try:
                    await pipe.execute()
                except redis.exceptions.WatchError:
                    return False
            holders.update(lease.holder for lease in leases)
        for holder in sorted(holders):
            await self._script(
                "purge", _FORGET_HOLDER, [keys.holder(holder), keys.holders], [holder]
            )
        return True

    async def _lease_pages(self, workflow_id: str) -> AsyncIterator[list[tuple[str, str]]]:
        """The run's lease records, ``(id, text)``, a page (about ``PURGE_PAGE``) at a time,
        each once (``HSCAN`` may repeat one)."""
        key = self._keys.leases(workflow_id)
        seen: set[str] = set()
        cursor = 0
        while True:
            with _translated("purge"):
                cursor, found = await self._redis.hscan(key, cursor, count=PURGE_PAGE)
            page = [
                (str(cid), str(raw))
                for cid, raw in dict(found).items()  # type: ignore[arg-type]  # redis-py
                if str(cid) not in seen
            ]
            seen.update(cid for cid, _ in page)
            if page:
                yield page
            if int(cursor) == 0:
                return

    async def _survey(self, run: WorkflowRun) -> _Survey:
        """When everything of ``run`` is over, its leases by state, how many are live, and
        their digest."""
        over = run_over_at(run, ())
        states: Counter[str] = Counter()
        live = 0
        digest = _LeasesDigest()
        key = self._keys.leases(run.id)
        async for page in self._lease_pages(run.id):
            leases = [_decode_lease(raw, cid, run.id, key) for cid, raw in page]
            over = max(over, run_over_at(run, leases))
            states.update(lease.state.value for lease in leases)
            live += sum(lease.is_live for lease in leases)
            digest.add(page)
        return _Survey(over, dict(states), live, digest.value)

    # ---- locks

    async def try_lock(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        """Take ``name`` for ``owner`` for ``ttl`` (SET NX PX) unless someone else holds it.

        The lock's expiry uses the Redis server's clock: a holder that dies releases it.
        """
        with _translated("try_lock"):
            taken = await self._redis.set(
                self._keys.lock(name), owner, nx=True, px=max(int(ttl / _MILLISECOND), 1)
            )
        return bool(taken)

    async def extend(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        """Keep ``name`` for ``owner`` for ``ttl`` from now (compare and PEXPIRE, atomically);
        False if it lapsed or another owner holds it."""
        with _translated("extend_lock"):
            kept = await self._redis.eval(
                _EXTEND, 1, self._keys.lock(name), owner, max(int(ttl / _MILLISECOND), 1)
            )
        return bool(kept == 1)

    async def unlock(self, name: str, owner: str) -> None:
        """Release ``name`` if ``owner`` still holds it (compare and delete, atomically)."""
        with _translated("unlock"):
            await self._redis.eval(_UNLOCK, 1, self._keys.lock(name), owner)

    # ---- quarantines

    async def set_quarantine(self, quarantine: Quarantine) -> None:
        """Add or replace the quarantine for ``(kind, value)``."""
        doc = {
            "kind": quarantine.kind.value,
            "value": quarantine.value,
            "reason": quarantine.reason,
            "by": quarantine.created_by,
            "at": epoch_micros(quarantine.created_at),
            "until": epoch_micros(quarantine.expires_at),
        }
        field = f"{quarantine.kind.value}|{quarantine.value}"
        with _translated("set_quarantine"):
            await self._redis.hset(
                self._keys.quarantines, field, json.dumps(doc, separators=(",", ":"))
            )

    async def lift_quarantine(self, kind: QuarantineKind, value: str) -> bool:
        """Remove it; False if there was none."""
        with _translated("lift_quarantine"):
            removed = await self._redis.hdel(self._keys.quarantines, f"{kind.value}|{value}")
        return bool(removed)

    async def quarantines(self, now: datetime) -> list[Quarantine]:
        """Every quarantine still active at ``now``; expired ones are dropped."""
        with _translated("quarantines"):
            reply = await self._redis.hgetall(self._keys.quarantines)
        raw = {str(k): str(v) for k, v in reply.items()}
        active: list[Quarantine] = []
        expired: list[str] = []
        for field, text in raw.items():
            quarantine = _decode_quarantine(text)
            if quarantine.is_active(now):
                active.append(quarantine)
            else:
                expired.append(field)
        if expired:
            with _translated("quarantines"):
                await self._redis.hdel(self._keys.quarantines, *expired)
        return sorted(active, key=lambda q: (q.kind, q.value))

    # ---- plumbing

    async def _pipeline(
        self, operation: str, build: Callable[[Pipeline], object], *, transaction: bool = False
    ) -> list[Any]:
        """Run the commands ``build`` queues in one round trip; replies (errors included,
        not raised) in order. If Redis lost its script cache (restart, failover, SCRIPT
        FLUSH), load the scripts and run the pipeline once more: a script that answered
        NOSCRIPT did nothing."""
        with _translated(operation):
            for attempt in range(2):
                async with self._redis.pipeline(transaction=transaction) as pipe:
                    build(pipe)
                    results: list[Any] = await pipe.execute(raise_on_error=False)
                missing = any(isinstance(r, redis.exceptions.NoScriptError) for r in results)
                if not missing or attempt == 1:
                    return results
                for script in _SCRIPTS:
                    await self._redis.script_load(script.text)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _script(
        self, operation: str, script: RedisScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """Run one script as a single command (no pipeline around it) and return its reply;
        an error reply raises :class:`LedgerUnavailableError`. If Redis lost its script
        cache, load the scripts and run it once more (a script that answered NOSCRIPT did
        nothing)."""
        with _translated(operation):
            try:
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                for each in _SCRIPTS:
                    await self._redis.script_load(each.text)
                return await self._redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _checked(
        self, operation: str, build: Callable[[Pipeline], object], *, transaction: bool = False
    ) -> list[Any]:
        """:meth:`_pipeline`, raising the first error reply as :class:`LedgerUnavailableError`."""
        results = await self._pipeline(operation, build, transaction=transaction)
        with _translated(operation):
            _raise_first_error(results)
        return results

    async def _ensure_layout(self) -> None:
        """Record the layout (version, bucket count) on first use, and refuse to run on a
        Redis whose ledger was laid out differently: due items in buckets this replica does
        not know would never be swept."""
        if self._layout_checked:
            return
        meta = self._keys.meta

        def build(pipe: Pipeline) -> None:
            pipe.hsetnx(meta, "layout", LAYOUT_VERSION)
            pipe.hsetnx(meta, "due_buckets", str(self._keys.due_buckets))
            pipe.hmget(meta, ["layout", "due_buckets"])

        stored = (await self._checked("layout check", build))[2]
        expected = [LAYOUT_VERSION, str(self._keys.due_buckets)]
        if stored != expected:
            raise LedgerUnavailableError(
                f"the ledger in Redis uses layout {stored[0]} with {stored[1]} due buckets; "
                f"this broker uses layout {expected[0]} with {expected[1]} "
                "(redis.due_buckets must be the same on every replica)",
                reason="ledger.layout_mismatch",
            )
        self._layout_checked = True

    # ---- runs

    async def create_run(self, run: WorkflowRun, *, per_minute: int = 0) -> bool:
        """Store a new run with its retention index entry, in one script; False if the id is
        taken; :class:`LimitExceededError` when its orchestrator's run-start bucket is empty
        (nothing written)."""
        check_id(run.id, "workflow id")
        keys = [
            self._keys.run(run.id),
            self._keys.run_ends,
            self._keys.run_rate(run.started_by),
            self._keys.retired(run.id),
        ]
        args: list[str | int] = [
            _encode_run(run),
            epoch_micros(run.deadline),
            run.id,
            epoch_micros(run.created_at),
            per_minute,
        ]
        answer = await self._script("create_run", _CREATE_RUN, keys, args)
        if isinstance(answer, list) and answer[0] == "retired":
            raise retired_run_id_error(run.id, _moment(int(answer[1])))
        if isinstance(answer, list):
            raise run_rate_limit_error(run, per_minute, wait=int(answer[1]) / 1_000_000)
        return bool(answer)

    async def get_run(self, workflow_id: str) -> WorkflowRun | None:
        """The run, or None."""
        check_id(workflow_id, "workflow id")
        key = self._keys.run(workflow_id)
        with _translated("get_run"):
            raw = await self._redis.get(key)
        return None if raw is None else _decode_run(str(raw), key)

    async def save_run(self, run: WorkflowRun) -> None:
        """Overwrite an existing run (:class:`NotFoundError` if there is none)."""
        check_id(run.id, "workflow id")
        keys = [self._keys.run(run.id), self._keys.run_ends]
        ended = "" if run.ended_at is None else epoch_micros(run.ended_at)
        saved = await self._script("save_run", _SAVE_RUN, keys, [_encode_run(run), ended, run.id])
        if not saved:
            raise NotFoundError(
                f"no workflow run {run.id!r} to update", reason="workflow.not_found"
            )

    # ---- leases

    async def write_ahead(
        self,
        lease: Lease,
        *,
        idempotency: IdempotencyBinding | None = None,
        limits: IssuanceLimits | None = None,
    ) -> str | None:
        """Record an issuing lease, indexed and due at its expiry, atomically in one command
        (the ``write_ahead`` script). Writing the same lease again is a no-op (a retried call
        whose reply was lost); another lease with the same id is a ``lease.exists`` conflict,
        and the record of the first one is left as it was (its index sets may gain harmless
        extra members, and its due time can only move earlier: ZADD LT).

        With ``idempotency``, the same command first looks the key up: bound already, it
        writes nothing and the bound credential id is returned (``idempotency.key_reused``
        when bound with another fingerprint); else the key is bound (expiring after the
        binding's TTL) with the record. A key bound to this very lease is a retried call:
        None, as written.

        The lease is counted in its holder's live counts (and, when ``limits.per_target`` is
        set, in the holder's counts for the target), whatever the limits; a count at its limit
        refuses the lease with LimitExceededError before anything is written.
        """
        check_write_ahead(lease)
        await self._ensure_layout()
        keys = self._keys
        limits = limits or _NO_LIMITS
        cid, wid = lease.credential_id, lease.workflow_id
        bucket = keys.bucket(cid)
        raw = _encode_lease(lease)
        live = [keys.live(lease.holder)]
        caps = [limits.per_identity]
        if limits.per_target:
            live.append(keys.live(lease.holder, lease.target))
            caps.append(limits.per_target)
        names = [
            keys.creds(bucket),
            keys.leases(wid),
            keys.holder(lease.holder),
            keys.owner(lease.owner),
            keys.target(lease.target),
            keys.holders,
            *keys.due(bucket),
            *live,
            keys.rate(lease.holder),
            keys.quarantines,
            keys.run(wid),
        ]
        binding = ""
        binding_ms = 0
        if idempotency is not None:
            names.append(keys.idempotency(idempotency.key))
            stored_fingerprint = idempotency.fingerprint[:_STORED_FINGERPRINT]
            binding = json.dumps([stored_fingerprint, cid], separators=(",", ":"))
            binding_ms = max(1, idempotency.ttl // _MILLISECOND)
        expires_us = epoch_micros(lease.expires_at)
        args: list[str | int] = [
            cid,
            wid,
            raw,
            lease.holder,
            expires_us,
            binding,
            binding_ms,
            epoch_micros(lease.issued_at),
            len(live),
            _live_minute(lease),
            # The live counts are garbage-collected by Redis a day after their newest expiry
            # (the server clock only forgets; counting uses ``issued_at``).
            expires_us // 1000 + _LIVE_SET_GRACE_MS,
            *caps,
            limits.per_minute,
            lease.target,
        ]
        outcome = await self._script("write_ahead", _WRITE_AHEAD, names, args)
        if outcome == "ok":
            return None
        if isinstance(outcome, list) and outcome and outcome[0] == "bound" and idempotency:
            bound = self._bound_credential(names[-1], outcome[1], idempotency.fingerprint)
            return None if bound == cid else bound
        if isinstance(outcome, list) and len(outcome) == 3 and outcome[0] == "limit":
            per_target = outcome[1] == "2"
            try:
                earliest = _moment(int(outcome[2]) * _MINUTE_US)
            except (TypeError, ValueError) as exc:
                raise _corrupt(live[-1 if per_target else 0], exc) from exc
            raise live_limit_error(
                lease,
                per_target=per_target,
                limit=limits.per_target if per_target else limits.per_identity,
                earliest_expiry=earliest,
            )
        if isinstance(outcome, list) and len(outcome) == 2 and outcome[0] == "run":
            raise _decode_run(str(outcome[1]), keys.run(wid)).inactive_error()
        if isinstance(outcome, list) and len(outcome) == 2 and outcome[0] == "quarantined":
            raise _decode_quarantine(str(outcome[1])).refusal()
        if isinstance(outcome, list) and len(outcome) == 2 and outcome[0] == "rate":
            try:
                wait = int(outcome[1]) / 1_000_000
            except (TypeError, ValueError) as exc:
                raise _corrupt(keys.rate(lease.holder), exc) from exc
            raise rate_limit_error(lease, limits.per_minute, wait=wait)
        # Taken: a record that is unreadable is reported as such (ledger.corrupt), not as
        # a conflict.
        await self._read_lease(cid)
        raise ConflictError(f"credential id {cid} is taken by another lease", reason="lease.exists")

    @staticmethod
    def _bound_credential(name: str, binding: object, fingerprint: str) -> str:
        """The credential id an idempotency binding names; ``idempotency.key_reused`` when it
        was bound with another fingerprint, ``ledger.corrupt`` when it is unreadable."""
        try:
            bound_fingerprint, bound_id = json.loads(str(binding))
        except (TypeError, ValueError) as exc:
            raise _corrupt(name, exc) from exc
        # Stored shortened (a binding written before that holds the whole digest).
        if bound_fingerprint not in (fingerprint[:_STORED_FINGERPRINT], fingerprint):
            raise key_reused_error()
        return str(bound_id)

    async def _read_lease(self, credential_id: str) -> tuple[Lease, str] | None:
        """The lease and its stored text: its run from the credential hash, then the record."""
        keys = self._keys
        with _translated("get_lease"):
            cid = credential_id
            workflow_id = await self._redis.hget(keys.creds(keys.bucket(cid)), cid)
            if workflow_id is None:
                return None
            key = keys.leases(str(workflow_id))
            raw = await self._redis.hget(key, cid)
        if raw is None:
            return None
        return _decode_lease(str(raw), cid, str(workflow_id), f"{key} {cid}"), str(raw)

    async def get_lease(self, credential_id: str) -> Lease | None:
        """The lease, or None."""
        check_id(credential_id, "credential id")
        found = await self._read_lease(credential_id)
        return None if found is None else found[0]

    async def discard(self, lease: Lease) -> bool:
        """Remove a lease exactly as it was written ahead (issuing, no Vault references): the
        mint was definitely refused, so there is nothing to revoke and no record to keep
        (SECURITY 24). False, and nothing removed, when the record is any different (it was
        activated, tombstoned with references, or never written)."""
        check_write_ahead(lease)
        keys = self._keys
        cid, wid = lease.credential_id, lease.workflow_id
        expected = _encode_lease(lease)
        live = [keys.live(lease.holder), keys.live(lease.holder, lease.target)]
        args: list[str | int] = [cid, expected, "", _live_minute(lease)]
        if await self._script("discard", _DISCARD, [keys.leases(wid), *live], args) != 1:
            return False
        await self._checked("discard", lambda pipe: _unindex(pipe, keys, lease), transaction=True)
        return True

    async def activate(
        self,
        credential_id: str,
        *,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        written: Lease | None = None,
    ) -> Lease:
        """issuing → active with its Vault references, then the durability barrier.

        ``written`` (optional) is the lease as the caller wrote it ahead: the first attempt
        then compares-and-sets against its encoding without reading it back, so activation
        is one round trip; if the record changed meanwhile the script answers ``stale`` and
        the lease is read as usual.

        Raises :class:`NotFoundError` (``lease.not_found``); :class:`ConflictError`
        ``lease.tombstoned`` when the task was tombstoned — the lease stays issuing, records
        the references and is due at once, so the next sweep revokes the credential — or
        ``lease.not_issuing``; :class:`LedgerUnavailableError` ``ledger.not_acknowledged``
        when the write is not durably acknowledged. Activating again with the same
        references returns the active lease (a retry).
        """
        check_id(credential_id, "credential id")
        if self._settings.durability == "fsync":
            await self._supports_waitaof()
        hint = (
            (written, _encode_lease(written))
            if written is not None and written.credential_id == credential_id
            else None
        )
        for _ in range(_CAS_ATTEMPTS):
            found = hint or await self._read_lease(credential_id)
            hint = None
            if found is None:
                raise NotFoundError(f"no lease {credential_id}", reason="lease.not_found")
            lease, raw = found
            conflict: ConflictError | None = None
            try:
                active = activated(
                    lease, token_accessor=token_accessor, vault_lease_ids=vault_lease_ids
                )
            except ConflictError as exc:
                active, conflict = lease, exc
            refused = refused_by_tombstone(
                lease, token_accessor=token_accessor, vault_lease_ids=vault_lease_ids
            )
            # Written even when unchanged (a retry): the barrier below then covers this
            # connection's write, which follows the first attempt's in the replication stream.
            active_raw = "" if conflict else _encode_lease(active)
            refused_raw = "" if refused == lease else _encode_lease(refused)
            build = self._activation(
                [self._keys.leases(lease.workflow_id), self._keys.tombstones(lease.workflow_id)],
                [
                    credential_id,
                    raw,
                    lease.task_id,
                    epoch_micros(lease.issued_at),
                    active_raw,
                    refused_raw,
                ],
            )
            replies = await self._activate_once_more_if_cut(build)
            with _translated("activate"):
                _raise_first_error(replies[:1])
            outcome = replies[0]
            if outcome == "stale":
                continue
            if outcome == "tombstoned":
                await self.schedule(credential_id, lease.issued_at)
                _log.warning(
                    "ledger.activation_refused",
                    credential_id=credential_id,
                    workflow_id=lease.workflow_id,
                    task_id=lease.task_id,
                    reason="lease.tombstoned",
                )
                raise tombstoned_error(lease)
            if conflict is not None:
                raise conflict
            self._check_barrier(replies[1:], credential_id)
            return active
        raise ConflictError(
            f"lease {credential_id} kept changing while it was being activated",
            reason="lease.contended",
        )

    async def _activate_once_more_if_cut(self, build: Callable[[Pipeline], object]) -> list[Any]:
        """Run the activation; if the connection was cut (Redis restarted or failed over since
        the write-ahead, and the pool still held a dead connection, or the server is not
        answering yet) run it again on a fresh one, a few times over about a second
        (``ACTIVATION_RETRY_DELAYS``): a credential minted already is revoked if it cannot be
        recorded, so a short outage is worth waiting out. Safe: the script is a
        compare-and-set, so a run after one that did land answers ``stale`` and the lease is
        read back; the barrier then covers the new connection's write."""
        for delay in ACTIVATION_RETRY_DELAYS:
            try:
                return await self._pipeline("activate", build)
            except LedgerUnavailableError as exc:
                if exc.reason != "ledger.unreachable":
                    raise
                _log.warning(
                    "ledger.activation_retried",
                    reason=exc.reason,
                    detail=exc.detail,
                    in_seconds=delay,
                )
            await _pause(delay)
        return await self._pipeline("activate", build)

    def _activation(self, keys: list[str], args: list[str | int]) -> Callable[[Pipeline], None]:
        """The activate script and, on the same connection, the durability barrier."""

        def build(pipe: Pipeline) -> None:
            _ACTIVATE.queue(pipe, keys, args)
            self._queue_barrier(pipe)

        return build

    async def save_lease(self, lease: Lease) -> None:
        """Overwrite an existing lease by compare-and-set; see
        :func:`~broker.adapters.memory_ledger.check_rewrite` for the rewrites refused."""
        cid = lease.credential_id
        check_id(cid, "credential id")
        check_id(lease.workflow_id, "workflow id")
        key = self._keys.leases(lease.workflow_id)
        new_raw = _encode_lease(lease)
        for _ in range(_CAS_ATTEMPTS):
            with _translated("save_lease"):
                raw = await self._redis.hget(key, cid)
            if raw is None:
                # Not in this run: absent, or a rewrite that would move it to another run.
                stored = await self.get_lease(cid)
                if stored is None:
                    raise NotFoundError(f"no lease {cid}", reason="lease.not_found")
                check_rewrite(stored, lease)
                continue  # it was written meanwhile: read it again
            stored = _decode_lease(str(raw), cid, lease.workflow_id, f"{key} {cid}")
            check_rewrite(stored, lease)
            names = [key]
            if lease.state is LeaseState.REVOKED and stored.state is not LeaseState.REVOKED:
                # Revoked (by this write, a compare-and-set: once): no longer counted against
                # its holder's live limits.
                names += [
                    self._keys.live(lease.holder),
                    self._keys.live(lease.holder, lease.target),
                ]
            args: list[str | int] = [cid, str(raw), new_raw, _live_minute(lease)]
            if await self._script("save_lease", _CAS, names, args) == 1:
                return
        raise ConflictError(
            f"lease {cid} kept changing while it was being saved", reason="lease.contended"
        )

    async def find_leases(self, selector: LeaseSelector, *, limit: int = 1000) -> list[Lease]:
        """Up to ``limit`` matching leases, oldest issued first, read from the narrowest
        index: the smallest of the run hash, holder, owner and target sets named by the
        selector; else the holders matching ``holder_prefix``; else (task id alone,
        sensitivity, everything) the credential hashes, i.e. every lease. Indexes are read in
        SCAN batches and reading stops once ``limit`` leases matched, so memory stays
        bounded; when more than ``limit`` match, which of them come back is unspecified."""
        check_selector(selector, limit)
        found: dict[str, Lease] = {}
        async with contextlib.aclosing(self._candidates(selector)) as batches:
            async for batch in batches:
                for lease in batch:
                    if selector.matches(lease):
                        found[lease.credential_id] = lease
                if len(found) >= limit:
                    break
        return sorted(found.values(), key=lease_order)[:limit]

    async def iter_leases(
        self, selector: LeaseSelector, *, batch: int
    ) -> AsyncGenerator[list[Lease]]:
        """Every matching lease, in batches of at most ``batch``, from the same index
        :meth:`find_leases` reads, in SCAN order (unspecified). Each lease is read when the
        SCAN batch that names it is, and comes at most once: a lease lives in exactly one
        member of each index (its run hash, its holder's set, its id's credential hash) and
        repeats within one key's SCAN are dropped. Memory: one batch, one SCAN batch, and
        the ids already returned from the one index key being scanned (SCAN may repeat a
        member while the key is resized)."""
        check_selector(selector, batch)
        ready: list[Lease] = []
        async with contextlib.aclosing(self._candidates(selector)) as candidates:
            async for leases in candidates:
                ready.extend(lease for lease in leases if selector.matches(lease))
                while len(ready) >= batch:
                    yield ready[:batch]
                    ready = ready[batch:]
        if ready:
            yield ready

    async def _candidates(self, selector: LeaseSelector) -> AsyncGenerator[list[Lease]]:
        """Batches of leases that may match, from the narrowest index the selector names;
        each lease at most once."""
        keys = self._keys
        indexes: list[tuple[str, str]] = []  # (kind, key)
        if selector.workflow_id is not None:
            check_id(selector.workflow_id, "workflow id")
            indexes.append(("run", keys.leases(selector.workflow_id)))
        if selector.holder is not None:
            indexes.append(("set", keys.holder(selector.holder)))
        if selector.owner is not None:
            indexes.append(("set", keys.owner(selector.owner)))
        if selector.target is not None:
            indexes.append(("set", keys.target(selector.target)))
        if indexes:

            def sizes(pipe: Pipeline) -> None:
                for kind, key in indexes:
                    if kind == "run":
                        pipe.hlen(key)
                    else:
                        pipe.scard(key)

            cards = await self._checked("find_leases", sizes)
            size, (kind, key) = min(zip(cards, indexes, strict=True))
            if not size:
                return
            if kind == "run" and selector.workflow_id is not None:
                async for records in self._scan_hash(key):
                    yield [
                        _decode_lease(raw, cid, selector.workflow_id, f"{key} {cid}")
                        for cid, raw in records
                    ]
                return
            async for ids in self._scan_set(key):
                yield await self._load_leases(ids)
            return
        if selector.holder_prefix is not None:
            async for holder in self._holders_with_prefix(selector.holder_prefix):
                async for ids in self._scan_set(keys.holder(holder)):
                    # Only the leases of this holder: a stray member (left by a write-ahead
                    # whose id was taken) must not bring another holder's lease twice.
                    leases = await self._load_leases(ids)
                    yield [lease for lease in leases if lease.holder == holder]
            return
        for bucket in range(keys.due_buckets):
            async for located in self._scan_hash(keys.creds(bucket)):
                yield await self._load_located(located)

    # SCAN returns every member present for the whole scan, and may return one more than once
    # (when the key is resized between calls): the members already returned are remembered
    # for the one key being scanned, and dropped when they come again.

    async def _scan_set(self, key: str) -> AsyncIterator[list[str]]:
        cursor = 0
        seen: set[str] = set()
        while True:
            with _translated("find_leases"):
                cursor, members = await self._redis.sscan(key, cursor, count=_SCAN_BATCH)
            new = [str(m) for m in members if str(m) not in seen]
            if new:
                seen.update(new)
                yield new
            if cursor == 0:
                return

    async def _scan_hash(self, key: str) -> AsyncIterator[list[tuple[str, str]]]:
        cursor = 0
        seen: set[str] = set()
        while True:
            with _translated("find_leases"):
                cursor, fields = await self._redis.hscan(key, cursor, count=_SCAN_BATCH)
            if isinstance(fields, dict):
                new = [(str(k), str(v)) for k, v in fields.items() if str(k) not in seen]
                if new:
                    seen.update(k for k, _ in new)
                    yield new
            if cursor == 0:
                return

    async def _holders_with_prefix(self, prefix: str) -> AsyncIterator[str]:
        # Bytewise range [prefix, prefix + 0xff): UTF-8 never contains the byte 0xff. Each
        # page starts just after the last holder returned (not at an offset, which a holder
        # added meanwhile would shift, returning one holder twice), so each comes once.
        low, high = b"[" + prefix.encode(), b"(" + prefix.encode() + b"\xff"
        while True:
            with _translated("find_leases"):
                holders = await self._redis.zrangebylex(
                    self._keys.holders, low, high, start=0, num=_SCAN_BATCH
                )
            for holder in holders:
                yield str(holder)
            if len(holders) < _SCAN_BATCH:
                return
            low = b"(" + str(holders[-1]).encode()

    async def _load_leases(self, credential_ids: Sequence[str]) -> list[Lease]:
        """Two round trips for any number of leases: their runs, then the records; one HMGET
        per id bucket, then one per run (not a command per lease: redis-py's cost is per
        command)."""
        keys = self._keys
        by_bucket = _grouped((keys.creds(keys.bucket(cid)), cid) for cid in credential_ids)

        def runs(pipe: Pipeline) -> None:
            for key, cids in by_bucket.items():
                pipe.hmget(key, cids)

        replies = await self._checked("find_leases", runs)
        return await self._load_located(
            [
                (cid, str(wid))
                for cids, wids in zip(by_bucket.values(), replies, strict=True)
                for cid, wid in zip(cids, wids, strict=True)
                if wid is not None
            ]
        )

    async def _load_located(self, located: Sequence[tuple[str, str]]) -> list[Lease]:
        """The records of (credential id, run id) pairs, in one round trip (one HMGET per
        run)."""
        keys = self._keys
        if not located:
            return []
        by_run = _grouped((wid, cid) for cid, wid in located)

        def records(pipe: Pipeline) -> None:
            for wid, cids in by_run.items():
                pipe.hmget(keys.leases(wid), cids)

        replies = await self._checked("find_leases", records)
        return [
            _decode_lease(str(raw), cid, wid, f"{keys.leases(wid)} {cid}")
            for (wid, cids), raws in zip(by_run.items(), replies, strict=True)
            for cid, raw in zip(cids, raws, strict=True)
            if raw is not None
        ]

    # ---- idempotency and tombstones

    async def forget_idempotency(self, key: str, credential_id: str) -> None:
        """Unbind ``key`` if it is still bound to ``credential_id`` (its mint was refused, so
        a retry may mint)."""
        name = self._keys.idempotency(key)
        await self._script("forget_idempotency", _FORGET_IDEMPOTENCY, [name], [credential_id])

    async def tombstone_task(self, workflow_id: str, task_id: str, *, until: datetime) -> None:
        """Block activation of leases of this task written ahead before ``until`` (the latest
        ``until`` given wins)."""
        check_id(workflow_id, "workflow id")
        check_id(task_id, "task id")
        await self._script(
            "tombstone_task",
            _TOMBSTONE,
            [self._keys.tombstones(workflow_id)],
            [task_id, epoch_micros(until)],
        )

    # ---- due index

    async def schedule(self, credential_id: str, due_at: datetime) -> None:
        """Place the lease in the due index at ``due_at``, ending any claim on it."""
        check_id(credential_id, "credential id")
        await self._ensure_layout()
        due, in_flight, claimed = self._keys.due(self._keys.bucket(credential_id))

        def build(pipe: Pipeline) -> None:
            pipe.zrem(in_flight, credential_id)
            pipe.hdel(claimed, credential_id)
            pipe.zadd(due, {credential_id: epoch_micros(due_at)})

        await self._checked("schedule", build, transaction=True)

    async def claim_due(self, now: datetime, *, limit: int, visibility: timedelta) -> list[str]:
        """Claim up to ``limit`` of the oldest leases due at ``now`` until
        ``now + visibility``, after returning expired claims (see the module docstring).

        When another claimer took some of the chosen items first, the shortfall is peeked and
        claimed again (a few rounds), so contention does not make a backlog look empty.
        """
        check_claim(limit, visibility)
        await self._ensure_layout()
        keys = self._keys
        now_us = epoch_micros(now)
        deadline_us = now_us + visibility // _MICROSECOND
        claimed: list[tuple[int, str]] = []
        for _ in range(_CLAIM_ROUNDS):
            plan = await self._plan_claims(now_us, limit - len(claimed))
            if not plan:
                break

            def claim(pipe: Pipeline, plan: dict[int, tuple[int, int]] = plan) -> None:
                for bucket, (count, cutoff) in plan.items():
                    _CLAIM.queue(pipe, keys.due(bucket), [cutoff, count, deadline_us])

            got = [
                pair for reply in await self._checked("claim_due", claim) for pair in _pairs(reply)
            ]
            claimed.extend(got)
            if len(got) == sum(count for count, _ in plan.values()) or len(claimed) >= limit:
                break
        return [member for _, member in sorted(claimed)]

    async def _plan_claims(self, now_us: int, wanted: int) -> dict[int, tuple[int, int]]:
        """Peek every bucket (returning expired claims) and choose the ``wanted`` globally
        oldest due items: bucket → (how many to claim there, newest due time chosen there)."""
        keys = self._keys

        def peek(pipe: Pipeline) -> None:
            for bucket in range(keys.due_buckets):
                _PEEK.queue(pipe, keys.due(bucket), [now_us, wanted, _RETURN_CAP])

        peeked = await self._checked("claim_due", peek)
        candidates = [
            (score, member, bucket)
            for bucket, reply in enumerate(peeked)
            for score, member in _pairs(reply)
        ]
        plan: dict[int, tuple[int, int]] = {}
        for score, _member, bucket in heapq.nsmallest(wanted, candidates):
            count, cutoff = plan.get(bucket, (0, score))
            plan[bucket] = (count + 1, max(cutoff, score))
        return plan

    async def ack(self, credential_id: str) -> None:
        """Drop the claim on a lease (no-op when it holds none). Call it only once the lease
        is revoked or rescheduled: the claim is what keeps a live lease findable."""
        check_id(credential_id, "credential id")
        await self._ensure_layout()
        _due, in_flight, claimed = self._keys.due(self._keys.bucket(credential_id))

        def build(pipe: Pipeline) -> None:
            pipe.zrem(in_flight, credential_id)
            pipe.hdel(claimed, credential_id)

        await self._checked("ack", build, transaction=True)

    async def unschedule(self, credential_id: str) -> None:
        """Remove a revoked lease's due entry and any claim on it, in one MULTI/EXEC."""
        check_id(credential_id, "credential id")
        await self._ensure_layout()
        due, in_flight, claimed = self._keys.due(self._keys.bucket(credential_id))

        def build(pipe: Pipeline) -> None:
            pipe.zrem(due, credential_id)
            pipe.zrem(in_flight, credential_id)
            pipe.hdel(claimed, credential_id)

        await self._checked("unschedule", build, transaction=True)

    async def due_backlog(self, now: datetime) -> DueBacklog:
        """What is due at ``now`` and not settled (for metrics): four O(log n) reads per
        bucket in one round trip, whatever the number of active leases."""
        await self._ensure_layout()
        keys, now_us = self._keys, epoch_micros(now)

        def build(pipe: Pipeline) -> None:
            for bucket in range(keys.due_buckets):
                due, in_flight, _claimed = keys.due(bucket)
                pipe.zcount(due, "-inf", now_us)
                pipe.zrange(due, 0, 0, withscores=True)
                pipe.zcard(in_flight)
                pipe.zcount(in_flight, "-inf", now_us)

        replies = await self._checked("due_backlog", build)
        quads = [replies[i : i + 4] for i in range(0, len(replies), 4)]
        oldest = [int(first[0][1]) for _, first, _, _ in quads if first]
        oldest_us = min((score for score in oldest if score <= now_us), default=None)
        return DueBacklog(
            due=sum(int(q[0]) for q in quads),
            claimed=sum(int(q[2]) for q in quads),
            claim_expired=sum(int(q[3]) for q in quads),
            oldest_due_at=None if oldest_us is None else _moment(oldest_us),
        )


class RedisReadiness:  # satisfies core.ports.ReadinessCheck
    """Ready when Redis answers and keeps the ledger durable (or degraded on purpose: alarm)."""

    name = "redis"

    def __init__(self, ledger: RedisLedger) -> None:
        self._ledger = ledger

    async def check(self, now: datetime) -> CheckResult:
        """Ping, then read the durability settings and the memory in use (an alarm from
        ``MEMORY_ALARM_SHARE`` of ``maxmemory``: at all of it every write is refused)."""
        await self._ledger.ping()
        durability = await self._ledger.durability()
        memory = await self._ledger.memory()
        problems = durability.problems
        if not problems:
            detail = (
                f"reachable; appendonly yes, appendfsync {durability.appendfsync}, "
                f"noeviction; acknowledged by {durability.acknowledgement}"
            )
            share = memory.share
            if share is not None and share >= MEMORY_ALARM_SHARE:
                return CheckResult(
                    self.name,
                    ok=True,
                    alarm=True,
                    detail=f"Redis uses {share:.0%} of its maxmemory ({memory.used} of "
                    f"{memory.maximum} bytes): when it is full every ledger write is refused "
                    "and issuance fails closed (add memory, or shorten "
                    f"ledger.retention_days); {detail}",
                )
            return CheckResult(self.name, ok=True, detail=detail)
        if self._ledger.allows_degraded:
            return CheckResult(
                self.name,
                ok=True,
                alarm=True,
                detail="DEGRADED (allowed by configuration): " + "; ".join(problems),
            )
        return CheckResult(self.name, ok=False, detail="; ".join(problems))
