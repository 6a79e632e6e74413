"""The aiohttp application: routes and wiring of the request-scoped pieces."""

from __future__ import annotations

import json

from aiohttp import web

from broker.http.problems import problem_middleware
from broker.service import Readiness

READINESS_KEY = web.AppKey("readiness", Readiness)


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the process serves requests. Never touches a dependency."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis durable and reachable, OpenBao unsealed with a valid broker session,
    trust bundles fresh. 200 when all are, 503 with each failing check's reason otherwise."""
    report = await request.app[READINESS_KEY].report()
    body = {
        "status": "ready" if report.ready else "not_ready",
        "checks": {
            r.name: {"ok": r.ok, "detail": r.detail, **({"alarm": True} if r.alarm else {})}
            for r in report.results
        },
    }
    return web.Response(
        status=200 if report.ready else 503,
        text=json.dumps(body),
        content_type="application/json",
    )


def create_app(*, readiness: Readiness) -> web.Application:
    """The broker's HTTP application."""
    app = web.Application(middlewares=[problem_middleware], client_max_size=64 * 1024)
    app[READINESS_KEY] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
