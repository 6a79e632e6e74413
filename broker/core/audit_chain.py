"""Tamper evidence for the audit trail: canonical JSON, a SHA-256 hash chain per writer, and a
verifier that says what was changed and where. Pure: no I/O, no clock.

**Chains.** Several broker replicas write audit events at the same time, so there is no single
global order to chain. Each process is one *writer* with an id chosen at start
(``<host>-<pid>-<random>``); its records carry ``writer``, ``seq`` (0, 1, 2, … in the order the
writer chained them), ``prev_hash`` (the previous record's ``hash``; for ``seq`` 0 the writer's
genesis hash, derived from the writer id) and ``hash``::

    hash = SHA-256( canonical_json( record without "hash" ) )        # hex

The record without ``hash`` includes ``prev_hash``, ``writer`` and ``seq``, so the hash covers
the event, its place in the chain and the link to the one before. Canonical JSON is
``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)``: one
ASCII line, whatever sink stored the record and however it re-serialised it.

**What verification detects** (:func:`verify_records`, per writer):

* ``edited``: a record's content no longer matches its ``hash``;
* ``link_broken``: a record does not link to its predecessor — the predecessor was edited and
  re-hashed, or replaced;
* ``deleted``: sequence numbers missing between the first and the last record of a writer;
* ``inserted``: a second record with a sequence number already taken (the one the chain does
  not link through is reported);
* ``reordered``: records out of sequence order (the fewest records whose moving explains the
  order are reported);
* ``bad_genesis``: a writer's ``seq`` 0 does not start from its genesis hash;
* ``head_missing``: a writer's first record is not ``seq`` 0 (its head was deleted, or a
  bounded stream trimmed it: pass ``allow_trimmed_head``);
* ``malformed``: a record that is not an object with the chain fields;
* with anchors (``writer``, ``seq``, ``hash`` noted elsewhere, e.g. by a log collector that
  received the stdout sink): ``anchor_mismatch`` and ``truncated``.

**What it cannot detect on its own:** the chain has no secret, so whoever can rewrite the
store can recompute every hash from the point of tampering to the end; deleting the *tail* of
a writer's chain (truncation) leaves a valid shorter chain; a whole forged writer is a valid
chain. All three need an external anchor: a second, independently held copy (the stdout sink
shipped to a log collector, the file, the Redis stream) or noted chain heads.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

RECORD_VERSION: Final = 1
CHAIN_FIELDS: Final = ("writer", "seq", "prev_hash", "hash")
_GENESIS_LABEL: Final = b"tasklease-audit-genesis\x00"
_HEX64 = frozenset("0123456789abcdef")


# ``json.dumps`` with any option but the defaults builds a ``JSONEncoder`` with those options
# and returns its ``encode(value)`` (CPython's json/__init__.py); an encoder keeps no state
# between calls, so this one, built once with the same options, gives the same text.
_CANONICAL_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no spaces, ASCII, no NaN
    (``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    allow_nan=False)``)."""
    return _CANONICAL_ENCODER.encode(value)


def genesis_hash(writer: str) -> str:
    """The ``prev_hash`` of a writer's first record (``seq`` 0)."""
    return hashlib.sha256(_GENESIS_LABEL + writer.encode("utf-8")).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` field."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where a writer's chain stands: the next ``seq`` and the hash to link it to."""

    writer: str
    seq: int
    prev_hash: str

    @classmethod
    def start(cls, writer: str) -> ChainHead:
        """A new chain for ``writer``."""
        if not writer or not writer.isascii() or not writer.isprintable():
            raise ValueError(f"a writer id is printable ASCII, got {writer!r}")
        return cls(writer=writer, seq=0, prev_hash=genesis_hash(writer))


def seal(event: Mapping[str, Any], head: ChainHead) -> tuple[dict[str, Any], ChainHead]:
    """Chain ``event`` (its ``as_dict`` form) at ``head``: the record, and the new head."""
    record, _, new_head = seal_line(event, head)
    return record, new_head


# Given an event and the canonical JSON of its record without ``hash``: None to keep it, or a
# replacement event (e.g. with secrets redacted) to seal instead.
Vetter = Callable[[Mapping[str, Any], str], Mapping[str, Any] | None]


def seal_line(
    event: Mapping[str, Any], head: ChainHead, *, vet: Vetter | None = None
) -> tuple[dict[str, Any], str, ChainHead]:
    """:func:`seal`, plus the record as one JSON line, from a single serialisation: the line
    is the canonical JSON of the record without ``hash`` with ``hash`` appended (key order
    does not matter to anyone: verification hashes the canonical form of what it parses).
    ``vet`` sees that serialisation first and may replace the event."""
    clash = [name for name in (*CHAIN_FIELDS, "v") if name in event]
    if clash:
        raise ValueError(f"an event must not carry the chain fields {clash}")
    # One dict, hashed without "hash" and then completed with it: the record.
    record = _chained(event, head)
    body = canonical_json(record)
    if vet is not None:
        replacement = vet(event, body)
        if replacement is not None:
            record = _chained(replacement, head)
            body = canonical_json(record)
    digest = hashlib.sha256(body.encode("ascii")).hexdigest()
    record["hash"] = digest
    line = f'{body[:-1]},"hash":"{digest}"}}'
    return record, line, ChainHead(head.writer, head.seq + 1, digest)


def _chained(event: Mapping[str, Any], head: ChainHead) -> dict[str, Any]:
    return {
        **event,
        "v": RECORD_VERSION,
        "writer": head.writer,
        "seq": head.seq,
        "prev_hash": head.prev_hash,
    }


# --------------------------------------------------------------------------- verification


class FindingKind(StrEnum):
    """What verification found wrong."""

    MALFORMED = "malformed"
    EDITED = "edited"
    LINK_BROKEN = "link_broken"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    BAD_GENESIS = "bad_genesis"
    HEAD_MISSING = "head_missing"
    ANCHOR_MISMATCH = "anchor_mismatch"
    TRUNCATED = "truncated"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem, and where: ``position`` is the index in the verified sequence (-1 when
    the record is absent, e.g. deleted), plus the writer, sequence number and event id."""

    kind: FindingKind
    position: int
    writer: str
    seq: int | None
    event_id: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind.value,
            "position": self.position,
            "writer": self.writer,
            "seq": self.seq,
            "event_id": self.event_id,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class WriterSummary:
    """One writer's chain as verified: how many records, and the last ``seq`` and hash."""

    writer: str
    records: int
    first_seq: int
    last_seq: int
    last_hash: str


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """Every finding (in order of position), and a summary per writer."""

    records: int
    findings: tuple[Finding, ...]
    writers: tuple[WriterSummary, ...]

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings


@dataclass(frozen=True, slots=True)
class _Entry:
    position: int
    record: Mapping[str, Any]
    seq: int
    stored_hash: str
    prev_hash: str
    event_id: str
    intact: bool  # content matches the stored hash


def _finding(
    kind: FindingKind, entry: _Entry | None, writer: str, detail: str, seq: int | None = None
) -> Finding:
    if entry is None:
        return Finding(kind, -1, writer, seq, "", detail)
    return Finding(kind, entry.position, writer, entry.seq, entry.event_id, detail)


def _parse(position: int, record: object) -> tuple[str, _Entry] | Finding:
    if not isinstance(record, Mapping):
        return Finding(FindingKind.MALFORMED, position, "", None, "", "not a JSON object")
    writer, seq = record.get("writer"), record.get("seq")
    stored, prev = record.get("hash"), record.get("prev_hash")
    event_id = record.get("event_id")
    event_id = event_id if isinstance(event_id, str) else ""
    if (
        isinstance(writer, str)
        and writer
        and isinstance(seq, int)
        and not isinstance(seq, bool)
        and seq >= 0
        and _is_hash(stored)
        and _is_hash(prev)
        and isinstance(stored, str)
        and isinstance(prev, str)
    ):
        try:
            intact = record_hash(record) == stored
        except (TypeError, ValueError):
            intact = False
        return writer, _Entry(position, record, seq, stored, prev, event_id, intact)
    problems = [
        name
        for name, bad in (
            ("writer", not isinstance(writer, str) or not writer),
            ("seq", not isinstance(seq, int) or isinstance(seq, bool) or seq < 0),
            ("hash", not _is_hash(stored)),
            ("prev_hash", not _is_hash(prev)),
        )
        if bad
    ]
    return Finding(
        FindingKind.MALFORMED,
        position,
        writer if isinstance(writer, str) else "",
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        event_id,
        f"missing or invalid chain fields: {', '.join(problems)}",
    )


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64


def verify_records(
    records: Iterable[object],
    *,
    anchors: Iterable[tuple[str, int, str]] = (),
    allow_trimmed_head: bool = False,
) -> VerificationReport:
    """Verify chained records in the order they were stored (a file's lines, a stream's
    entries). ``anchors`` are (writer, seq, hash) triples known from elsewhere."""
    findings: list[Finding] = []
    by_writer: dict[str, list[_Entry]] = defaultdict(list)
    count = 0
    for position, record in enumerate(records):
        count += 1
        parsed = _parse(position, record)
        if isinstance(parsed, Finding):
            findings.append(parsed)
            continue
        writer, entry = parsed
        by_writer[writer].append(entry)
    summaries = []
    for writer, entries in by_writer.items():
        findings.extend(_verify_writer(writer, entries, allow_trimmed_head=allow_trimmed_head))
        last = max(entries, key=lambda e: e.seq)
        summaries.append(
            WriterSummary(
                writer=writer,
                records=len(entries),
                first_seq=min(e.seq for e in entries),
                last_seq=last.seq,
                last_hash=last.stored_hash,
            )
        )
    findings.extend(_check_anchors(by_writer, anchors))
    findings.sort(key=lambda f: (f.position if f.position >= 0 else 1 << 62, f.kind.value))
    return VerificationReport(
        records=count,
        findings=tuple(findings),
        writers=tuple(sorted(summaries, key=lambda s: s.writer)),
    )


def _verify_writer(
    writer: str, entries: Sequence[_Entry], *, allow_trimmed_head: bool
) -> list[Finding]:
    findings = [
        _finding(
            FindingKind.EDITED,
            entry,
            writer,
            f"the content of seq {entry.seq} does not match its hash",
        )
        for entry in entries
        if not entry.intact
    ]
    # One record per sequence number; a second one is an insertion. The genuine one is the
    # one the chain links through (its successor's prev_hash names it), else the intact one
    # linked to its predecessor, else the first stored.
    by_seq: dict[int, list[_Entry]] = defaultdict(list)
    for entry in entries:
        by_seq[entry.seq].append(entry)
    genuine: dict[int, _Entry] = {}
    for seq in sorted(by_seq):
        candidates = by_seq[seq]
        if len(candidates) == 1:
            genuine[seq] = candidates[0]
            continue
        successors = {e.prev_hash for e in by_seq.get(seq + 1, [])}
        before = genuine.get(seq - 1)
        expected_prev = genesis_hash(writer) if seq == 0 else (before.stored_hash if before else "")

        def rank(
            entry: _Entry, successors: set[str] = successors, prev: str = expected_prev
        ) -> int:
            return (
                (4 if entry.stored_hash in successors else 0)
                + (2 if entry.intact and entry.prev_hash == prev else 0)
                + (1 if entry.intact else 0)
            )

        chosen = max(candidates, key=lambda e: (rank(e), -e.position))
        genuine[seq] = chosen
        findings.extend(
            _finding(
                FindingKind.INSERTED,
                extra,
                writer,
                f"a second record with seq {seq}; the chain runs through the one at position "
                f"{chosen.position}",
            )
            for extra in candidates
            if extra is not chosen
        )
    # Order: the records in stored order should have increasing seq. Those outside a longest
    # increasing run are the ones moved.
    in_order = sorted(genuine.values(), key=lambda e: e.position)
    for moved in _outside_longest_increasing(in_order):
        findings.append(
            _finding(
                FindingKind.REORDERED,
                moved,
                writer,
                f"seq {moved.seq} is stored out of order (between seq "
                f"{_neighbour(in_order, moved, -1)} and seq {_neighbour(in_order, moved, 1)})",
            )
        )
    seqs = sorted(genuine)
    first = seqs[0]
    if first > 0 and not allow_trimmed_head:
        findings.append(
            _finding(
                FindingKind.HEAD_MISSING,
                genuine[first],
                writer,
                f"the chain starts at seq {first}: seq 0..{first - 1} are missing (deleted, "
                "or trimmed from a bounded stream)",
            )
        )
    for low, high in _missing_ranges(seqs):
        before, after = genuine[low - 1], genuine[high + 1]
        span = f"seq {low}..{high} are" if high > low else f"seq {low} is"
        findings.append(
            Finding(
                FindingKind.DELETED,
                after.position,
                writer,
                low,
                after.event_id,
                f"{span} missing: between seq {low - 1} (event {before.event_id or '?'}) and "
                f"seq {high + 1} (event {after.event_id or '?'}, stored at position "
                f"{after.position})",
            )
        )
    # Links, in sequence order (a gap already says what is missing; no second report there).
    for seq in seqs:
        entry = genuine[seq]
        if seq == 0:
            if entry.prev_hash != genesis_hash(writer):
                findings.append(
                    _finding(
                        FindingKind.BAD_GENESIS,
                        entry,
                        writer,
                        "seq 0 does not start from the writer's genesis hash",
                    )
                )
            continue
        before = genuine.get(seq - 1)
        if before is None or seq == first:
            continue
        if entry.prev_hash != before.stored_hash:
            findings.append(
                _finding(
                    FindingKind.LINK_BROKEN,
                    entry,
                    writer,
                    f"seq {seq} does not link to seq {seq - 1} (event {before.event_id or '?'}): "
                    f"seq {seq - 1} was changed and re-hashed, or seq {seq} was replaced",
                )
            )
    return findings


def _neighbour(in_order: Sequence[_Entry], entry: _Entry, step: int) -> str:
    index = in_order.index(entry) + step
    if 0 <= index < len(in_order):
        return str(in_order[index].seq)
    return "-"


def _missing_ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    return [(low + 1, high - 1) for low, high in itertools.pairwise(seqs) if high > low + 1]


def _outside_longest_increasing(entries: Sequence[_Entry]) -> list[_Entry]:
    """The entries not in one longest strictly increasing subsequence of ``seq``
    (patience sorting, O(n log n))."""
    tails: list[int] = []  # seq value at the end of the best run of each length
    tail_index: list[int] = []  # index (into entries) of that tail
    parent: list[int] = [-1] * len(entries)
    for index, entry in enumerate(entries):
        length = bisect.bisect_left(tails, entry.seq)
        if length == len(tails):
            tails.append(entry.seq)
            tail_index.append(index)
        else:
            tails[length] = entry.seq
            tail_index[length] = index
        parent[index] = tail_index[length - 1] if length > 0 else -1
    keep: set[int] = set()
    index = tail_index[-1] if tail_index else -1
    while index >= 0:
        keep.add(index)
        index = parent[index]
    return [entry for index, entry in enumerate(entries) if index not in keep]


def _check_anchors(
    by_writer: Mapping[str, Sequence[_Entry]], anchors: Iterable[tuple[str, int, str]]
) -> list[Finding]:
    findings: list[Finding] = []
    for writer, seq, expected in anchors:
        entries = by_writer.get(writer, [])
        if not entries or max(e.seq for e in entries) < seq:
            last = max((e.seq for e in entries), default=-1)
            findings.append(
                Finding(
                    FindingKind.TRUNCATED,
                    -1,
                    writer,
                    seq,
                    "",
                    f"the anchor names seq {seq} but the chain ends at seq {last}: records "
                    "were removed from its end",
                )
            )
            continue
        at_seq = [e for e in entries if e.seq == seq]
        if at_seq and all(e.stored_hash != expected for e in at_seq):
            findings.append(
                _finding(
                    FindingKind.ANCHOR_MISMATCH,
                    at_seq[0],
                    writer,
                    f"seq {seq} has another hash than the anchor: the chain was rewritten up "
                    "to here",
                )
            )
    return findings


def parse_anchor(text: str) -> tuple[str, int, str]:
    """``writer:seq:hash`` (the writer id may itself contain ``:``)."""
    writer, _, rest = text.rpartition(":")
    writer, _, seq_text = writer.rpartition(":")
    if not writer or not seq_text.isdigit() or len(rest) != 64 or not set(rest) <= _HEX64:
        raise ValueError(f"an anchor is writer:seq:sha256-hex, got {text[:120]!r}")
    return writer, int(seq_text), rest
