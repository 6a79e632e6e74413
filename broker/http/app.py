"""The aiohttp application: routes and wiring of the request-scoped pieces."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from broker.core.authn import CallerAuthenticator
from broker.core.identity import WorkloadIdentity
from broker.core.roles import Role
from broker.http.auth import make_auth_middleware, require_roles
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


async def whoami(request: web.Request) -> web.Response:
    """The caller's verified identity and roles, as the broker sees them."""
    caller = require_roles(request, *Role)
    identity = caller.identity
    body: dict[str, object] = {
        "principal": caller.principal_id,
        "roles": sorted(r.value for r in caller.roles),
        "expires_at": identity.expires_at.isoformat(),
    }
    if isinstance(identity, WorkloadIdentity):
        body["method"] = identity.method.value
        body["trust_domain"] = identity.spiffe_id.trust_domain.name
    else:
        body["method"] = "oidc"
        body["display"] = identity.display
    return web.json_response(body)


def create_app(
    *,
    readiness: Readiness,
    authenticator: CallerAuthenticator,
    now: Callable[[], datetime],
) -> web.Application:
    """The broker's HTTP application."""
    app = web.Application(
        middlewares=[
            problem_middleware,
            make_auth_middleware(authenticator=authenticator, now=now),
        ],
        client_max_size=64 * 1024,
    )
    app[READINESS_KEY] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/whoami", whoami)
    return app
