"""Read-only queries: the target catalog and the lease ledger.

* ``GET /v1/targets`` (any authenticated role): the catalog an agent may ask for, with the
  properties policy decides on (never a Vault path or policy name).
* ``GET /v1/leases`` (admin): lease metadata by ``workflow_id``, ``task_id``, ``holder``,
  ``holder_prefix``, ``owner``, ``target``, ``sensitivity``, ``state`` (comma-separated) and
  ``limit`` (1-1000, default 100); at least one filter, or ``all=true``.
* ``GET /v1/workflows`` (admin; an orchestrator: its own runs): runs by ``owner``,
  ``started_by``, ``state`` (comma-separated), ``label`` (``key=value``, repeatable: all must
  match), latest over first, ``limit`` (1-500, default
  100) a page, ``cursor`` (the previous page's ``next_cursor``) →
  ``{"runs": [...], "next_cursor": "…" | null}``. A page reads a bounded stretch of the index,
  so a selective filter may answer fewer runs, even none, with a cursor to go on from.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from broker.core.model import LeaseState, RunState, Sensitivity, Target
from broker.core.ports import RUN_PAGE_LIMIT, LeaseSelector, RunCursor, RunQuery
from broker.core.roles import Role
from broker.errors import BadRequestError
from broker.http.app import BROKER_KEY
from broker.http.auth import require_roles
from broker.http.wire import lease_json, one_query_value, refuse_unknown_params, run_json

_FILTERS = ("workflow_id", "task_id", "holder", "holder_prefix", "owner", "target")
_MAX_LIMIT = 1000
_RUN_PARAMS = frozenset({"owner", "started_by", "state", "label", "limit", "cursor"})
# A run cursor: when the last run examined is over (µs since the epoch) and its id.
RUN_CURSOR_PATTERN = r"(\d{1,17})\.([A-Za-z0-9][A-Za-z0-9._:-]{0,127})"
_RUN_CURSOR = re.compile(RUN_CURSOR_PATTERN)


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


def run_cursor_text(cursor: RunCursor) -> str:
    """A run cursor as ``next_cursor`` carries it."""
    return f"{cursor.over_us}.{cursor.workflow_id}"


def _run_query(query: Any) -> RunQuery:
    refuse_unknown_params(query, _RUN_PARAMS)
    states = None
    raw_states = one_query_value(query, "state", 200)
    raw_limit = one_query_value(query, "limit", 4) or "100"
    try:
        if raw_states is not None:
            states = frozenset(RunState(s) for s in raw_states.split(","))
        limit = int(raw_limit)
    except ValueError:
        raise BadRequestError(
            f"state or limit is not a known value (states: {[s.value for s in RunState]}, "
            f"limit: an integer 1-{RUN_PAGE_LIMIT})",
            reason="query.invalid",
        ) from None
    after = None
    raw_cursor = one_query_value(query, "cursor", 160)
    if raw_cursor is not None:
        match = _RUN_CURSOR.fullmatch(raw_cursor)
        if match is None:
            raise BadRequestError(
                "cursor is not a next_cursor this endpoint gave", reason="query.invalid"
            )
        after = RunCursor(int(match[1]), match[2])
    labels = []
    for pair in query.getall("label", []):
        key, equals, value = pair.partition("=")
        if not equals or len(value) > 256:
            raise BadRequestError(
                "label must be key=value (a value of at most 256 characters)",
                reason="query.invalid",
            )
        labels.append((key, value))
    return RunQuery(
        owner=one_query_value(query, "owner", 256),
        started_by=one_query_value(query, "started_by", 2048),
        states=states,
        labels=tuple(labels),
        limit=limit,
        after=after,
    )


async def list_workflows(request: web.Request) -> web.Response:
    """GET /v1/workflows"""
    caller = require_roles(request, Role.ADMIN, Role.ORCHESTRATOR)
    page = await request.app[BROKER_KEY].list_workflows(caller, _run_query(request.query))
    return web.json_response(
        {
            "runs": [run_json(run) for run in page.runs],
            "next_cursor": None if page.next is None else run_cursor_text(page.next),
        }
    )


def register_query_routes(app: web.Application) -> None:
    """Add the read-only query routes (needs the broker in the app)."""
    app.router.add_get("/v1/targets", list_targets)
    app.router.add_get("/v1/leases", list_leases)
    app.router.add_get("/v1/workflows", list_workflows)
