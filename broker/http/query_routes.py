"""Read-only queries: the target catalog and the lease ledger.

* ``GET /v1/targets`` (any authenticated role): the catalog an agent may ask for, with the
  properties policy decides on (never a Vault path or policy name).
* ``GET /v1/leases`` (admin): lease metadata by ``workflow_id``, ``task_id``, ``holder``,
  ``holder_prefix``, ``owner``, ``target``, ``sensitivity``, ``state`` (comma-separated) and
  ``limit`` (1-1000, default 100); at least one filter, or ``all=true``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.core.model import LeaseState, Sensitivity, Target
from broker.core.ports import LeaseSelector
from broker.core.roles import Role
from broker.errors import BadRequestError
from broker.http.app import BROKER_KEY
from broker.http.auth import require_roles
from broker.http.wire import lease_json

_FILTERS = ("workflow_id", "task_id", "holder", "holder_prefix", "owner", "target")
_MAX_LIMIT = 1000


def target_json(target: Target) -> dict[str, Any]:
    """A target as callers see it."""
    return {
        "name": target.name,
        "kind": target.kind.value,
        "system": target.system,
        "environment": target.environment,
        "sensitivity": target.sensitivity.value,
        "max_ttl_seconds": int(target.max_ttl.total_seconds()),
        "revocable": target.revocable,
        "legacy": target.legacy,
        "description": target.description,
    }


async def list_targets(request: web.Request) -> web.Response:
    """GET /v1/targets"""
    require_roles(request, *Role)
    targets = request.app[BROKER_KEY].targets
    return web.json_response({"targets": [target_json(targets[n]) for n in sorted(targets)]})


def _selector(query: Any) -> tuple[LeaseSelector, int]:
    unknown = sorted(set(query) - {*_FILTERS, "sensitivity", "state", "limit", "all"})
    if unknown:
        raise BadRequestError(
            f"unknown query parameters {unknown}; use {[*_FILTERS, 'sensitivity', 'state']}",
            reason="query.invalid",
        )
    fields: dict[str, Any] = {}
    for name in _FILTERS:
        value = query.get(name)
        if value is not None:
            if not 0 < len(value) <= 2048:
                raise BadRequestError(f"{name} must be 1-2048 characters", reason="query.invalid")
            fields[name] = value
    try:
        if "sensitivity" in query:
            fields["sensitivity"] = Sensitivity(query["sensitivity"])
        if "state" in query:
            fields["states"] = frozenset(LeaseState(s) for s in query["state"].split(","))
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise BadRequestError(
            "sensitivity, state or limit is not a known value "
            f"(states: {[s.value for s in LeaseState]}, "
            f"sensitivities: {[s.value for s in Sensitivity]}, limit: an integer)",
            reason="query.invalid",
        ) from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise BadRequestError(f"limit must be 1-{_MAX_LIMIT}", reason="query.invalid")
    raw_all = query.get("all", "false").lower()
    if raw_all not in {"true", "false", "1", "0"}:
        raise BadRequestError("all must be true or false", reason="query.invalid")
    everything = raw_all in {"true", "1"}
    if not fields and not everything:
        raise BadRequestError(
            "name at least one filter, or all=true to list every lease", reason="query.invalid"
        )
    return LeaseSelector(**fields, everything=everything and not fields), limit


async def list_leases(request: web.Request) -> web.Response:
    """GET /v1/leases"""
    caller = require_roles(request, Role.ADMIN)
    selector, limit = _selector(request.query)
    leases = await request.app[BROKER_KEY].find_leases(caller, selector, limit=limit)
    return web.json_response(
        {"leases": [lease_json(lease) for lease in leases], "limit": limit, "count": len(leases)}
    )


def register_query_routes(app: web.Application) -> None:
    """Add the read-only query routes (needs the broker in the app)."""
    app.router.add_get("/v1/targets", list_targets)
    app.router.add_get("/v1/leases", list_leases)
