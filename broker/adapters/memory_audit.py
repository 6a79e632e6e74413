"""An in-memory :class:`~broker.core.audit.AuditTrail` for unit tests: keeps events in order."""

from __future__ import annotations

from collections.abc import Sequence

from broker.core.audit import AuditEvent, EventType
from broker.errors import AuditUnavailableError


class MemoryAuditTrail:
    """Records events in a list; ``fail`` makes ``record`` raise like a failed durable sink."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail = False

    async def record(self, event: AuditEvent) -> None:
        """Append ``event`` (or raise :class:`AuditUnavailableError` when ``fail`` is set)."""
        if self.fail:
            raise AuditUnavailableError(
                "the audit sink is failing (test)", reason="audit.sink_failed"
            )
        self.events.append(event)

    async def record_all(self, events: Sequence[AuditEvent]) -> None:
        """Append ``events`` in order (all or none)."""
        if self.fail:
            raise AuditUnavailableError(
                "the audit sink is failing (test)", reason="audit.sink_failed"
            )
        self.events.extend(events)

    def types(self) -> list[EventType]:
        """The recorded event types, in order."""
        return [e.type for e in self.events]
