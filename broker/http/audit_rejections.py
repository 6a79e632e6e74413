"""``identity.rejected`` audit events from the authentication middleware, rate limited.

Anyone who can reach the port can be rejected, so rejections must not be a way to flood the
audit trail (or Redis): at most ``per_second`` events per process (a token bucket with a burst
of the same size); rejections beyond it are counted into the next recorded event's
``suppressed``. Recording a rejection never changes the answer (the 401/403 stands even if the
trail is down) and never waits long: it is best effort, and every rejection is in the log.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from datetime import datetime

import structlog
from aiohttp import web

from broker.core.audit import AuditEvent, AuditTrail, IdentityRejected, current_request_id
from broker.core.untrusted import printable
from broker.errors import TaskleaseError

_log = structlog.get_logger("broker.auth")


def _method(request: web.Request) -> str:
    authorization = request.headers.get("Authorization", "")
    if authorization[:7].lower() == "bearer ":
        return "bearer"
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if isinstance(ssl_object, ssl.SSLObject) and ssl_object.getpeercert(binary_form=True):
        return "x509-svid"
    return "none"


class RejectionAuditor:
    """Records ``identity.rejected``, at most ``per_second`` per second."""

    def __init__(
        self,
        *,
        audit: AuditTrail,
        now: Callable[[], datetime],
        per_second: float = 20.0,
        new_id: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._now = now
        self._rate = per_second
        self._tokens = per_second
        self._new_id = new_id
        self._monotonic = monotonic
        self._refilled = monotonic()
        self._suppressed = 0

    def _take(self) -> bool:
        if self._rate <= 0:
            return False
        current = self._monotonic()
        self._tokens = min(self._rate, self._tokens + (current - self._refilled) * self._rate)
        self._refilled = current
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def rejected(self, request: web.Request, error: TaskleaseError) -> None:
        """Record one rejection (or count it, past the rate)."""
        if not self._take():
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        event = AuditEvent(
            event_id=self._new_id(),
            time=self._now(),
            actor=printable(request.remote or "unknown", 64),
            payload=IdentityRejected(
                method=_method(request),
                reason=error.reason,
                detail=printable(error.detail, 500),
                path=printable(request.path, 200),
                remote=printable(request.remote or "", 64),
                suppressed=suppressed,
            ),
            request_id=current_request_id(),
        )
        try:
            await self._audit.record(event)
        except TaskleaseError as exc:
            _log.warning("audit.rejection_not_recorded", reason=exc.reason)
