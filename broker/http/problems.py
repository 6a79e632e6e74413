"""RFC 9457 problem+json errors, and the middleware that turns every failure into one.

A :class:`TaskleaseError` becomes its status and stable ``code`` (plus the finer ``reason``);
aiohttp's own HTTP errors (404, 405, 413) keep their status; anything unexpected becomes a
generic 500 whose body says nothing about the failure (the log has it, escaped).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from broker.core.audit import REQUEST_ID
from broker.core.untrusted import printable
from broker.errors import LimitExceededError, TaskleaseError

PROBLEM_JSON = "application/problem+json"
_log = structlog.get_logger("broker.http")

REQUEST_ID_KEY = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_response(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    reason: str | None = None,
    request_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    """A problem+json response."""
    body: dict[str, Any] = {
        "type": f"https://tasklease.dev/problems/{code}",
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
    }
    if reason is not None and reason != code:
        body["reason"] = reason
    if request_id is not None:
        body["request_id"] = request_id
    if extra:
        body.update(extra)
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_JSON)


# Seconds a 503 answer asks a client to wait before trying again.
RETRY_AFTER_UNAVAILABLE = "1"


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every request an id and turn every error into problem+json."""
    request_id = request.headers.get("X-Request-Id", "")
    if not (0 < len(request_id) <= 64 and request_id.isascii() and request_id.isprintable()):
        request_id = str(uuid.uuid4())
    request[REQUEST_ID_KEY] = request_id
    # Audit events recorded while serving this request carry its id (broker.core.audit).
    bound = REQUEST_ID.set(request_id)
    try:
        response = await handler(request)
    except TaskleaseError as exc:
        _log.info(
            "request.failed",
            request_id=request_id,
            status=exc.status,
            code=exc.code,
            reason=exc.reason,
            detail=printable(exc.detail, 500),
        )
        response = problem_response(
            status=exc.status,
            code=exc.code,
            title=exc.title,
            detail=exc.detail,
            reason=exc.reason,
            request_id=request_id,
            extra=exc.extra(),
        )
        if exc.status == 503:
            # A dependency is unavailable and nothing was handed out: worth asking again
            # (clients back off from here; the SDK honours it).
            response.headers["Retry-After"] = RETRY_AFTER_UNAVAILABLE
        elif isinstance(exc, LimitExceededError):
            # A quota frees when the caller's earliest live credential expires (or earlier,
            # when it releases one).
            response.headers["Retry-After"] = str(exc.retry_after)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = problem_response(
            status=exc.status,
            code=f"http_{exc.status}",
            title=exc.reason,
            detail=exc.reason,
            request_id=request_id,
        )
        # RFC 9110 §15.5.6: a 405 MUST list the methods the resource supports.
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never leak a trace
        _log.error(
            "request.crashed",
            request_id=request_id,
            error_type=type(exc).__name__,
            error=printable(exc, 500),
        )
        response = problem_response(
            status=500,
            code="internal_error",
            title="Internal error",
            detail="the broker failed to handle this request; see the broker log",
            request_id=request_id,
        )
    finally:
        REQUEST_ID.reset(bound)
    response.headers["X-Request-Id"] = request_id
    return response
