"""Audit sinks that write chained records: structlog JSON on stdout and an append-only JSONL
file. (The Redis stream sink is ``broker.adapters.audit_redis``.)

A sink takes a batch of sealed records (one group commit of the chain writer) and returns once
it holds them by its own standard of "holds", or raises :class:`AuditUnavailableError`. Whether
a sink's failure fails issuance is the trail's business (``durable``), not the sink's.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from broker.errors import AuditUnavailableError

FsyncPolicy = Literal["always", "batch", "never"]
# Below this much free space the file sink reports itself not ready (a full disk fails writes).
_MIN_FREE_BYTES = 1 << 20


def _sync(fd: int) -> None:
    """Data and the size that reaches it on disk (fdatasync; skips timestamps), else fsync."""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


@dataclass(frozen=True, slots=True)
class SealedRecord:
    """A chained record and its canonical JSON line (what is hashed, stored and shipped)."""

    record: Mapping[str, Any]
    line: str


class AuditSink(Protocol):
    """Where chained records go."""

    name: str
    durable: bool

    async def write(self, records: Sequence[SealedRecord]) -> None:
        """Hold ``records`` (in order) or raise :class:`AuditUnavailableError`."""
        ...

    async def probe(self) -> str:
        """Raise :class:`AuditUnavailableError` unless the sink can take records now; a short
        description of its state otherwise."""
        ...

    async def close(self) -> None:
        """Release what the sink holds."""
        ...


def _with_records(_logger: object, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """Render one log line per record around the record's JSON, already serialised by the
    chain writer (a second serialisation of a 2 KB record was most of this sink's cost). The
    lines of a group commit share their head (event, level, timestamp), rendered once, and
    leave in one message: one write to the output instead of one per record."""
    lines: Sequence[str] = event_dict.pop("audit_lines")
    head = json.dumps(event_dict, sort_keys=True)
    prefix = f'{head[:-1]}, "audit": '
    return "\n".join(f"{prefix}{line}}}" for line in lines)


class StructlogAuditSink:
    """Each record as one structlog JSON line (``"event": "audit.record"``, a level and a
    timestamp, the record under ``"audit"``) to the broker's configured log output (stdout in
    production), whatever the log level: the trail is not a debug log that ``log_level`` may
    switch off. The records of one group commit are logged in one call (one write; they carry
    the same timestamp)."""

    name = "stdout"

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        # The configured output (logger factory), with processors of its own.
        self._log = structlog.wrap_logger(
            None,
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _with_records,
            ],
            wrapper_class=structlog.BoundLogger,
            logger_factory_args=("broker.audit",),
        )

    async def write(self, records: Sequence[SealedRecord]) -> None:
        """Log the records, one line each, in one call."""
        if not records:
            return
        try:
            self._log.info("audit.record", audit_lines=[sealed.line for sealed in records])
        except (OSError, ValueError) as exc:  # a closed or broken stdout
            raise AuditUnavailableError(
                f"the stdout audit sink cannot write ({type(exc).__name__})",
                reason="audit.stdout_failed",
            ) from exc

    async def probe(self) -> str:
        """Always able: a broken stdout only shows when written to."""
        return "structlog JSON lines"

    async def close(self) -> None:
        """Nothing to release."""


class JsonlFileAuditSink:
    """Append-only JSONL: one canonical record per line, the file opened ``O_APPEND`` with
    mode 0600. ``fsync``: ``always`` writes and fsyncs record by record, ``batch`` writes a
    group commit at once and fsyncs it, ``never`` leaves it to the OS.

    A file renamed away (log rotation) is noticed at the next write, which reopens the path:
    verify rotated files together, in order. A failed write may leave a partial last line;
    the next write starts on a new line, and verification reports the fragment as malformed.
    """

    name = "file"

    def __init__(self, *, path: Path, fsync: FsyncPolicy = "batch", durable: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self.durable = durable
        self._fd: int | None = None
        self._partial_line = False

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_size > 0:
            # Appending to an existing file whose last write may have been cut short.
            with self.path.open("rb") as existing:
                existing.seek(-1, os.SEEK_END)
                self._partial_line = existing.read(1) != b"\n"
        return fd

    def _current_fd(self) -> int:
        if self._fd is not None:
            try:
                same = self.path.stat()
                held = os.fstat(self._fd)
                if (same.st_dev, same.st_ino) == (held.st_dev, held.st_ino):
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)  # moved or deleted: continue in a new file at the path
            self._fd = None
        self._fd = self._open()
        return self._fd

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def _write_sync(self, lines: Sequence[str]) -> None:
        fd = self._current_fd()
        prefix = b"\n" if self._partial_line else b""
        self._partial_line = True  # until a write completes
        if self.fsync == "always":
            for index, line in enumerate(lines):
                self._write_all(fd, (prefix if index == 0 else b"") + line.encode() + b"\n")
                _sync(fd)
        else:
            self._write_all(fd, prefix + "".join(f"{line}\n" for line in lines).encode())
            if self.fsync == "batch":
                _sync(fd)
        self._partial_line = False

    async def write(self, records: Sequence[SealedRecord]) -> None:
        """Append ``records`` (and fsync them per the policy) in a worker thread."""
        try:
            await asyncio.to_thread(self._write_sync, [r.line for r in records])
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise AuditUnavailableError(
                f"the audit file {str(self.path)!r} cannot be written ({code})",
                reason="audit.file_failed",
            ) from exc

    def _probe_sync(self) -> str:
        fd = self._current_fd()
        _sync(fd)
        if not os.access(self.path, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
        space = os.statvfs(self.path)
        free = space.f_bavail * space.f_frsize
        if free < _MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, f"only {free} bytes free")
        return f"{self.path} (fsync {self.fsync}, {free // (1 << 20)} MiB free)"

    async def probe(self) -> str:
        """The file is open (or can be), writable, fsyncable, and its disk is not full."""
        try:
            return await asyncio.to_thread(self._probe_sync)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise AuditUnavailableError(
                f"the audit file {str(self.path)!r} is not writable ({code})",
                reason="audit.file_failed",
            ) from exc

    async def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await asyncio.to_thread(os.close, fd)


def records_from_lines(lines: Iterator[str]) -> Iterator[object]:
    """Chained records from JSONL text: the audit file's lines, or structlog lines of the
    stdout sink (the record under ``"audit"``); other log lines are skipped. A line that is
    not JSON yields the text itself (verification reports it as malformed)."""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            yield line
            continue
        if isinstance(value, dict) and "event" in value:
            # A structlog line: the stdout sink's records, and the rest of the log skipped.
            if value.get("event") == "audit.record":
                yield value.get("audit")
            continue
        yield value


def read_jsonl_records(path: Path) -> list[object]:
    """Every chained record in a JSONL file (see :func:`records_from_lines`)."""
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        return list(records_from_lines(line for line in handle.read().split("\n")))
