"""Wire models: what the API accepts and returns (pydantic; the OpenAPI schema comes from these).

Parsing is strict: unknown fields are refused, sizes are bounded, and a validation failure is a
400 problem that names the fields without echoing their values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.core.model import Lease, Quarantine, QuarantineKind, WorkflowRun, aware_time
from broker.core.untrusted import printable
from broker.errors import BadRequestError

_M = TypeVar("_M", bound=BaseModel)
MAX_BODY = 64 * 1024
# The body parse_body validated, for middleware that needs a field of it after the handler
# (the issuance metrics' target kind) without parsing the JSON again.
PARSED_BODY_KEY = web.RequestKey("parsed_body", BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


# The shape of identifiers (broker.core.model.check_id). The domain refuses any other with a 400
# naming the field; the schema says so to clients (json_schema_extra: the check stays there).
ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ID: dict[str, Any] = {"pattern": ID_PATTERN}


class StartWorkflowBody(_Strict):
    """POST /v1/workflows"""

    # Exactly one of deadline and ttl_seconds (checked by the route).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["deadline"], "properties": {"deadline": {"type": "string"}}},
                {"required": ["ttl_seconds"], "properties": {"ttl_seconds": {"type": "integer"}}},
            ]
        }
    )

    id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID)
    owner: str = Field(min_length=1, max_length=256, description="the accountable human")
    purpose: str = Field(min_length=1, max_length=1024, description="why; a ticket reference")
    deadline: datetime | None = Field(default=None, description="RFC 3339, with a timezone")
    ttl_seconds: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    participants: list[str] = Field(default_factory=list, max_length=32)

    @field_validator("deadline", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> object:
        """An RFC 3339 date-time text with its offset, as documented; pydantic alone would
        also take a Unix time (a number, or digits in a string) or a naive time."""
        if value is None:
            return value
        if not isinstance(value, str) or _RFC3339.fullmatch(value) is None:
            raise ValueError("must be an RFC 3339 date-time with a timezone offset")
        return value


# YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM); pydantic does the calendar checks.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class CredentialRequestBody(_Strict):
    """POST /v1/credentials"""

    workflow_id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID)
    task_id: str = Field(min_length=1, max_length=128, json_schema_extra=_ID)
    target: str = Field(min_length=1, max_length=128, json_schema_extra=_ID)
    ttl_seconds: int = Field(default=300, ge=1, le=24 * 3600)
    justification: str = Field(default="", max_length=1024)
    tool: str = Field(default="", max_length=256)
    approval_id: str | None = Field(default=None, max_length=128, json_schema_extra=_ID)
    params: dict[str, str] = Field(default_factory=dict, max_length=8)


async def parse_body(request: web.Request, model: type[_M]) -> _M:
    """Read and validate a JSON body; a typed 400 naming the bad fields on failure."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequestError(f"body is larger than {MAX_BODY} bytes", reason="body.too_large")
    raw = await request.read()
    try:
        parsed = model.model_validate_json(raw)
    except ValidationError as exc:
        problems = sorted(
            {f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()}
        )
        raise BadRequestError(
            "invalid request body: " + "; ".join(problems[:10]), reason="body.invalid"
        ) from None
    stored: BaseModel = parsed
    request[PARSED_BODY_KEY] = stored
    return parsed


def run_json(run: WorkflowRun) -> dict[str, Any]:
    """A run as the API shows it."""
    return {
        "id": run.id,
        "owner": run.owner,
        "purpose": run.purpose,
        "started_by": run.started_by,
        "created_at": run.created_at.isoformat(),
        "deadline": run.deadline.isoformat(),
        "labels": dict(run.labels),
        "participants": list(run.participants),
        "state": run.state.value,
        "ended_at": run.ended_at.isoformat() if run.ended_at else None,
        "outcome": run.outcome,
        "delegation_chain": run.chain.as_list(),
    }


def lease_json(lease: Lease) -> dict[str, Any]:
    """A lease's metadata (never a secret)."""
    return {
        "credential_id": lease.credential_id,
        "workflow_id": lease.workflow_id,
        "task_id": lease.task_id,
        "target": lease.target,
        "kind": lease.kind.value,
        "sensitivity": lease.sensitivity.value,
        "holder": lease.holder,
        "owner": lease.owner,
        "state": lease.state.value,
        "issued_at": lease.issued_at.isoformat(),
        "expires_at": lease.expires_at.isoformat(),
        "revocable": lease.revocable,
        "approval_id": lease.approval_id,
        "token_accessor": lease.token_accessor,
        "delegation_chain": lease.chain.as_list(),
        "revoke_reason": lease.revoke_reason,
    }


class QuarantineBody(_Strict):
    """POST /v1/quarantines"""

    kind: QuarantineKind
    value: str = Field(min_length=1, max_length=2048)
    reason: str = Field(min_length=1, max_length=1024)
    ttl_seconds: int = Field(default=3600, ge=1, le=30 * 24 * 3600)


class LiftQuarantineBody(_Strict):
    """DELETE /v1/quarantines"""

    kind: QuarantineKind
    value: str = Field(min_length=1, max_length=2048)


def quarantine_json(quarantine: Quarantine) -> dict[str, Any]:
    """A quarantine as the API shows it."""
    return {
        "kind": quarantine.kind.value,
        "value": quarantine.value,
        "reason": quarantine.reason,
        "created_by": quarantine.created_by,
        "created_at": quarantine.created_at.isoformat(),
        "expires_at": quarantine.expires_at.isoformat(),
    }


def one_query_value(query: Any, name: str, limit: int) -> str | None:
    """The value of query parameter ``name`` (None when absent): given at most once, 1 to
    ``limit`` characters, else a 400 ``query.invalid``."""
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequestError(f"{name} given more than once", reason="query.invalid")
    if values and not 0 < len(values[0]) <= limit:
        raise BadRequestError(f"{name} must be 1-{limit} characters", reason="query.invalid")
    return values[0] if values else None


def query_time(request: web.Request, name: str) -> datetime | None:
    """Query parameter ``name`` as an RFC 3339 time with a timezone (None when absent), else
    a 400 ``query.invalid``."""
    raw = request.query.get(name)
    if raw is None:
        return None
    moment = aware_time(raw)
    if moment is None:
        raise BadRequestError(
            f"{name} must be an RFC 3339 time with a timezone, got {printable(raw, 40)!r}",
            reason="query.invalid",
        )
    return moment


def refuse_unknown_params(query: Any, known: Iterable[str]) -> None:
    """A 400 ``query.invalid`` naming (printably, the first five) the query parameters not
    in ``known``."""
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise BadRequestError(
            f"unknown query parameters {[printable(u, 40) for u in unknown[:5]]} (known: "
            f"{sorted(known)})",
            reason="query.invalid",
        )
