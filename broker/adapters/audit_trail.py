"""The audit trail: one writer task chains events in order and delivers them to the sinks.

``record``/``record_all`` put events on a queue and wait. A single writer task takes whatever
is queued (up to ``batch_max`` events: a group commit), redacts secret-shaped text
(:mod:`broker.core.audit_redact`), chains each event (:mod:`broker.core.audit_chain`) and hands
the batch to every sink at once: one file write and fsync, one Redis pipeline, for many
concurrent requests. A caller returns when every *durable* sink holds its events, and gets
:class:`AuditUnavailableError` if one failed, the queue is full or the time budget ran out.
A non-durable sink's failure is logged and counted; it fails nobody.

After any sink failure the writer starts a new chain (``<writer>.<n>``): the sink that missed
the batch holds a chain that simply ends, the others continue in a new one, and every sink
verifies clean — the outage itself is in the broker log (``audit.sink_failed``) with the
``seq`` range it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.adapters.audit_sinks import AuditSink, SealedRecord
from broker.core.audit import AuditEvent
from broker.core.audit_chain import ChainHead, seal_line
from broker.core.audit_redact import redact_event
from broker.core.ports import CheckResult
from broker.errors import AuditUnavailableError

_log = structlog.get_logger("broker.audit")

# A write failure this recent makes readiness report the sink even if its probe passes now.
_RECENT_FAILURE_SECONDS: Final = 30.0


def default_writer_id() -> str:
    """``<host>-<pid>-<random>``: unique per process start, readable in a trace."""
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())[:40]
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(4)}"


class AuditMetrics:
    """Prometheus instruments of the audit trail (on ``registry``, a new one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.records = Counter(
            "tasklease_audit_records",
            "Audit records delivered, by sink",
            ["sink"],
            registry=self.registry,
        )
        self.failures = Counter(
            "tasklease_audit_sink_failures",
            "Batches a sink failed to take, by sink and durability",
            ["sink", "durable"],
            registry=self.registry,
        )
        self.redacted = Counter(
            "tasklease_audit_redactions",
            "Secret-shaped values redacted from audit events before chaining",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tasklease_audit_batch_records",
            "Records per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tasklease_audit_queue_depth",
            "Events waiting for the audit writer",
            registry=self.registry,
        )

    def register(self, registry: CollectorRegistry) -> None:
        """Expose the instruments on ``registry`` too (once; e.g. the process's /metrics)."""
        for collector in (
            self.records,
            self.failures,
            self.redacted,
            self.batch_size,
            self.queue_depth,
        ):
            registry.register(collector)


@dataclass
class _Pending:
    events: Sequence[AuditEvent]
    done: asyncio.Future[None]


@dataclass
class _SinkHealth:
    last_error: str = ""
    failed_at: float = 0.0
    failures: int = 0


class ChainingAuditTrail:  # satisfies core.audit.AuditTrail
    """Chains audit events per writer and delivers them to the sinks (see module docstring)."""

    def __init__(
        self,
        *,
        sinks: Sequence[AuditSink],
        writer_id: str | None = None,
        batch_max: int = 256,
        queue_size: int = 10_000,
        record_timeout_seconds: float = 5.0,
        metrics: AuditMetrics | None = None,
    ) -> None:
        if batch_max < 1 or queue_size < 1 or record_timeout_seconds <= 0:
            raise ValueError("batch_max, queue_size and record_timeout_seconds must be positive")
        self._sinks = tuple(sinks)
        self._base = writer_id or default_writer_id()
        self._epoch = 0
        self._head = ChainHead.start(self._base)
        self._batch_max = batch_max
        self._queue_size = queue_size
        self._timeout = record_timeout_seconds
        self.metrics = metrics or AuditMetrics()
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._health = {sink.name: _SinkHealth() for sink in self._sinks}
        self._delivered: dict[str, Counter] = {}

    @property
    def writer(self) -> str:
        """The writer id of the chain new records go to."""
        return self._head.writer

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        """The sinks, in delivery order."""
        return self._sinks

    # ---- the port

    async def record(self, event: AuditEvent) -> None:
        """Chain and deliver ``event``; return when every durable sink holds it."""
        await self.record_all((event,))

    async def record_all(self, events: Sequence[AuditEvent]) -> None:
        """Chain and deliver ``events`` in order, in one group commit."""
        if not events:
            return
        if self._closed:
            raise AuditUnavailableError("the audit trail is closed", reason="audit.closed")
        queue = self._ensure_writer()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            queue.put_nowait(_Pending(tuple(events), done))
        except asyncio.QueueFull:
            raise AuditUnavailableError(
                f"the audit queue is full ({self._queue_size} events waiting): the sinks do "
                "not keep up",
                reason="audit.queue_full",
            ) from None
        self.metrics.queue_depth.set(queue.qsize())
        try:
            async with asyncio.timeout(self._timeout):
                # A caller that gives up (timeout, cancellation) cancels only its own future:
                # its events stay queued or in the batch being written, and the writer skips a
                # future that is already done. No shield needed (it cost a future and a loop
                # turn per record).
                await done
        except TimeoutError:
            raise AuditUnavailableError(
                f"the audit sinks did not acknowledge within {self._timeout} s",
                reason="audit.timeout",
            ) from None

    # ---- the writer

    def _ensure_writer(self) -> asyncio.Queue[_Pending | None]:
        if self._queue is None or self._task is None or self._task.done():
            if self._queue is None:
                self._queue = asyncio.Queue(self._queue_size)
            # A fresh context: the writer must not inherit the request context (bound log
            # fields, request id) of whichever request happened to start it.
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._queue), name="audit-writer", context=contextvars.Context()
            )
        return self._queue

    async def _run(self, queue: asyncio.Queue[_Pending | None]) -> None:
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                return
            batch = [first]
            count = len(first.events)
            while count < self._batch_max:
                try:
                    more = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
                count += len(more.events)
            self.metrics.queue_depth.set(queue.qsize())
            try:
                error = await self._commit(batch)
            except Exception as exc:  # noqa: BLE001 - the writer must survive a bad batch
                _log.error("audit.writer_failed", error_type=type(exc).__name__)
                error = AuditUnavailableError(
                    f"the audit writer failed ({type(exc).__name__})", reason="audit.writer_failed"
                )
                self._new_chain()
            for pending in batch:
                if pending.done.done():
                    continue
                if error is None:
                    pending.done.set_result(None)
                else:
                    pending.done.set_exception(error)
                    pending.done.exception()  # retrieved: a caller that timed out is not "lost"

    def _vet(self, event: Mapping[str, Any], text: str) -> Mapping[str, Any] | None:
        clean, redactions = redact_event(event, text)
        if not redactions:
            return None
        self.metrics.redacted.inc(redactions)
        _log.warning(
            "audit.redacted",
            event_id=event.get("event_id"),
            type=event.get("type"),
            redactions=redactions,
        )
        return clean

    def _seal(self, batch: Sequence[_Pending]) -> list[SealedRecord]:
        sealed: list[SealedRecord] = []
        for pending in batch:
            for event in pending.events:
                record, line, self._head = seal_line(event.as_dict(), self._head, vet=self._vet)
                sealed.append(SealedRecord(record, line))
        return sealed

    async def _commit(self, batch: Sequence[_Pending]) -> AuditUnavailableError | None:
        records = self._seal(batch)
        self.metrics.batch_size.observe(len(records))
        results = await asyncio.gather(
            *(sink.write(records) for sink in self._sinks), return_exceptions=True
        )
        durable_failure: AuditUnavailableError | None = None
        failed = False
        for sink, result in zip(self._sinks, results, strict=True):
            health = self._health[sink.name]
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                failed = True
                detail = (
                    result.detail
                    if isinstance(result, AuditUnavailableError)
                    else type(result).__name__
                )
                health.last_error, health.failed_at = detail, time.monotonic()
                health.failures += 1
                self.metrics.failures.labels(sink=sink.name, durable=str(sink.durable)).inc()
                _log.error(
                    "audit.sink_failed",
                    sink=sink.name,
                    durable=sink.durable,
                    error=detail,
                    writer=records[0].record["writer"],
                    first_seq=records[0].record["seq"],
                    last_seq=records[-1].record["seq"],
                    event_ids=[r.record["event_id"] for r in records[:50]],
                )
                if sink.durable and durable_failure is None:
                    durable_failure = AuditUnavailableError(
                        f"the durable audit sink {sink.name!r} failed: {detail}",
                        reason=f"audit.{sink.name}_failed",
                    )
            else:
                health.last_error = ""
                delivered = self._delivered.get(sink.name)
                if delivered is None:  # the labelled child, looked up once per sink
                    delivered = self._delivered[sink.name] = self.metrics.records.labels(
                        sink=sink.name
                    )
                delivered.inc(len(records))
        if failed:
            self._new_chain()
        return durable_failure

    def _new_chain(self) -> None:
        self._epoch += 1
        self._head = ChainHead.start(f"{self._base}.{self._epoch}")
        _log.warning("audit.chain_restarted", writer=self._head.writer)

    # ---- readiness and shutdown

    async def check(self, now: datetime) -> CheckResult:
        """Ready when every durable sink can take records (probe) and has not failed a write
        in the last 30 s; a failing non-durable sink raises an alarm only."""
        del now  # probes are about now; the port passes it for checks that need it
        problems: list[str] = []
        alarms: list[str] = []
        states: list[str] = []
        probes = await asyncio.gather(
            *(sink.probe() for sink in self._sinks), return_exceptions=True
        )
        for sink, probe in zip(self._sinks, probes, strict=True):
            health = self._health[sink.name]
            if isinstance(probe, BaseException):
                reason = (
                    probe.detail if isinstance(probe, AuditUnavailableError) else repr(probe)[:200]
                )
            elif health.last_error and time.monotonic() - health.failed_at < (
                _RECENT_FAILURE_SECONDS
            ):
                reason = f"last write failed: {health.last_error}"
            else:
                states.append(f"{sink.name}: {probe}")
                continue
            (problems if sink.durable else alarms).append(f"{sink.name}: {reason}")
        if not self._sinks:
            alarms.append("no audit sink is enabled")
        detail = "; ".join(problems + alarms) or (f"writer {self.writer}; " + "; ".join(states))
        return CheckResult("audit", ok=not problems, detail=detail, alarm=bool(alarms))

    async def close(self) -> None:
        """Deliver what is queued, stop the writer and close the sinks."""
        self._closed = True
        if self._task is not None and self._queue is not None and not self._task.done():
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)
            try:
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                _log.error("audit.close_timeout", waiting=self._queue.qsize())
        for sink in self._sinks:
            try:
                await sink.close()
            except Exception as exc:  # noqa: BLE001 - close every sink whatever one does
                _log.warning("audit.sink_close_failed", sink=sink.name, error=type(exc).__name__)


class AuditReadiness:  # satisfies core.ports.ReadinessCheck
    """/readyz asks the trail whether its durable sinks can take records."""

    name = "audit"

    def __init__(self, trail: ChainingAuditTrail) -> None:
        self._trail = trail

    async def check(self, now: datetime) -> CheckResult:
        """The trail's own check."""
        return await self._trail.check(now)
