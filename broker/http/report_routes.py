"""Reports for the security team.

``GET /v1/reports/legacy`` (admin), ``since`` optional (RFC 3339): the burn-down of the
targets the catalog marks ``legacy`` (standing static secrets), from the ledger
(:mod:`broker.legacy`)::

    → 200 {"generated_at", "since", "ledger_retention_days",
           "targets": [{"target": {...}, "unused", "credentials", "live", "runs",
                        "first_issued_at", "last_issued_at", "holders": [{"who",
                        "credentials", "last_issued_at"}], "holder_count", "owners": [...],
                        "owner_count", "complete"}]}
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from broker.core.legacy import LegacyTargetUsage, Usage
from broker.core.roles import Role
from broker.errors import BadRequestError
from broker.http.auth import require_roles
from broker.http.query_routes import target_json
from broker.http.wire import query_time, refuse_unknown_params
from broker.legacy import LegacyReport, LegacyReporter

LEGACY_REPORTER_KEY = web.AppKey("legacy_reporter", LegacyReporter)
_LEGACY_PARAMS = frozenset({"since"})


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "who": usage.who,
        "credentials": usage.credentials,
        "last_issued_at": usage.last_issued_at.isoformat(),
    }


def legacy_target_json(usage: LegacyTargetUsage) -> dict[str, Any]:
    """One legacy target's usage as the API shows it."""
    return {
        "target": target_json(usage.target),
        "unused": usage.unused,
        "credentials": usage.credentials,
        "live": usage.live,
        "runs": usage.runs,
        "first_issued_at": _time(usage.first_issued_at),
        "last_issued_at": _time(usage.last_issued_at),
        "holders": [_usage_json(u) for u in usage.holders],
        "holder_count": usage.holder_count,
        "owners": [_usage_json(u) for u in usage.owners],
        "owner_count": usage.owner_count,
        "complete": usage.complete,
    }


def legacy_report_json(report: LegacyReport) -> dict[str, Any]:
    """The burn-down report as the API shows it."""
    return {
        "generated_at": report.generated_at.isoformat(),
        "since": _time(report.since),
        "ledger_retention_days": report.ledger_retention.days,
        "targets": [legacy_target_json(u) for u in report.targets],
    }


async def legacy_report(request: web.Request) -> web.Response:
    """GET /v1/reports/legacy"""
    caller = require_roles(request, Role.ADMIN)
    refuse_unknown_params(request.query, _LEGACY_PARAMS)
    if len(request.query.getall("since", [])) > 1:
        raise BadRequestError("since given more than once", reason="query.invalid")
    report = await request.app[LEGACY_REPORTER_KEY].report(
        caller, since=query_time(request, "since")
    )
    return web.json_response(legacy_report_json(report))


def register_report_routes(app: web.Application, reporter: LegacyReporter) -> None:
    """Add the report endpoints to ``app`` (before it starts serving)."""
    app[LEGACY_REPORTER_KEY] = reporter
    app.router.add_get("/v1/reports/legacy", legacy_report)
