"""``GET /metrics`` (Prometheus text format) and the middleware that times credential requests.

``/metrics`` needs no authentication (it is in ``broker.http.auth.PUBLIC_PATHS``) and is served
on the broker's TLS listener like every path; see :mod:`broker.metrics` for why that is safe
and what it exposes.

Issuance is measured here, around the handler, rather than inside the use case: the
middleware times every ``POST /v1/credentials`` that passed authentication and counts it by
the target's kind (looked up in the catalog from the body's ``target``; ``unknown`` when the
body names no known target) and by outcome: ``issued`` (201), ``pending_approval`` (202), or
the refusal's stable reason code (``policy.denied``, ``workflow.not_active``, …).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from broker.core.model import Target
from broker.http.wire import PARSED_BODY_KEY, CredentialRequestBody
from broker.metrics import UNKNOWN_KIND, BrokerMetrics, error_outcome

METRICS_KEY = web.AppKey("metrics", BrokerMetrics)
ISSUANCE_PATH = "/v1/credentials"
# A body larger than the app accepts is refused before any work; its kind stays unknown.
_MAX_PEEK = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: every instrument of this broker process, scrape-time sources refreshed."""
    body = await request.app[METRICS_KEY].exposition()
    return web.Response(
        body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
    )


def _success_outcome(status: int) -> str:
    if status == 201:
        return "issued"
    if status == 202:
        return "pending_approval"
    return f"http_{status}"


async def _target(request: web.Request, targets: Mapping[str, Target]) -> Target | None:
    """The catalog's target the request body names: from the body the handler validated,
    else (a body it refused) from one JSON parse of the body it read and cached already;
    None for anything else (its kind counts as ``unknown``)."""
    parsed = request.get(PARSED_BODY_KEY)
    if isinstance(parsed, CredentialRequestBody):
        name: object = parsed.target
    elif request.content_length is not None and request.content_length > _MAX_PEEK:
        return None
    else:
        try:
            name = json.loads(await request.read()).get("target")
        except (ValueError, AttributeError, web.HTTPException):
            return None
    return targets.get(name) if isinstance(name, str) else None


def issuance_metrics_middleware(
    metrics: BrokerMetrics, targets: Callable[[], Mapping[str, Target]]
) -> Middleware:
    """Time and count ``POST /v1/credentials`` by kind and outcome; other paths pass."""

    async def record(request: web.Request, outcome: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        target = await _target(request, targets())
        kind = target.kind.value if target is not None else UNKNOWN_KIND
        metrics.issuance.labels(kind=kind, outcome=outcome).inc()
        metrics.issuance_seconds.labels(kind=kind, outcome=outcome).observe(elapsed)
        if target is not None and target.legacy:
            metrics.legacy_requests.labels(target=target.name, outcome=outcome).inc()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path != ISSUANCE_PATH:
            return await handler(request)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            raise  # the client went away: not an answered request
        except Exception as exc:
            await record(request, error_outcome(exc), started)
            raise
        await record(request, _success_outcome(response.status), started)
        return response

    return middleware


def register_metrics_routes(
    app: web.Application,
    metrics: BrokerMetrics,
    *,
    targets: Callable[[], Mapping[str, Target]],
) -> None:
    """Serve ``/metrics`` and time issuance on ``app`` (before it starts serving).

    ``targets`` returns the current catalog (it may be reloaded while the broker runs).
    """
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_endpoint)
    # Innermost: after authentication and the problem+json translation of errors' outside.
    app.middlewares.append(issuance_metrics_middleware(metrics, targets))
