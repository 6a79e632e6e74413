"""Audit records as OCSF-style JSON for SIEMs (OCSF 1.3 classes; pure mapping).

Which OCSF class each event becomes:

============================  ==========================================  ====================
event                         class (uid)                                 activity
============================  ==========================================  ====================
policy.decision               Authorize Session (3003)                    99 Other: Decide
credential.issued             Authorize Session (3003)                    1 Assign Privileges
credential.denied             Authorize Session (3003), status Failure    1 Assign Privileges
credential.revoked            Authorize Session (3003)                    99 Other: Revoke
credential.revoke_failed      Authorize Session (3003), status Failure    99 Other: Revoke
revocation.forced             Authorize Session (3003)                    99 Other: Revoke
approval.requested/decided    Authorize Session (3003)                    99 Other: Approve
quarantine.changed            Authorize Session (3003)                    99 Other: Quarantine
identity.rejected             Authentication (3002), status Failure       1 Logon
workflow.started              API Activity (6003)                         1 Create
workflow.completed            API Activity (6003)                         3 Update
agent.tool_call               API Activity (6003)                         99 Other: Tool Call
agent.side_effect             API Activity (6003)                         99 Other: Side Effect
============================  ==========================================  ====================

``type_uid`` is ``class_uid * 100 + activity_id``. The tasklease record itself (chain fields
included, so a SIEM copy can be verified) is kept under ``unmapped.tasklease``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from broker.core.audit import EventType

OCSF_VERSION: Final = "1.3.0"
PRODUCT: Final = {"name": "tasklease", "vendor_name": "tasklease", "version": "0.1.0"}

_AUTHORIZE_SESSION = (3003, "Authorize Session", 3, "Identity & Access Management")
_AUTHENTICATION = (3002, "Authentication", 3, "Identity & Access Management")
_API_ACTIVITY = (6003, "API Activity", 6, "Application Activity")

# event type -> (class, activity_id, activity_name)
_MAPPING: Final[dict[str, tuple[tuple[int, str, int, str], int, str]]] = {
    EventType.POLICY_DECISION: (_AUTHORIZE_SESSION, 99, "Decide"),
    EventType.CREDENTIAL_ISSUED: (_AUTHORIZE_SESSION, 1, "Assign Privileges"),
    EventType.CREDENTIAL_DENIED: (_AUTHORIZE_SESSION, 1, "Assign Privileges"),
    EventType.CREDENTIAL_REVOKED: (_AUTHORIZE_SESSION, 99, "Revoke"),
    EventType.CREDENTIAL_REVOKE_FAILED: (_AUTHORIZE_SESSION, 99, "Revoke"),
    EventType.REVOCATION_FORCED: (_AUTHORIZE_SESSION, 99, "Revoke"),
    EventType.APPROVAL_REQUESTED: (_AUTHORIZE_SESSION, 99, "Approve"),
    EventType.APPROVAL_DECIDED: (_AUTHORIZE_SESSION, 99, "Approve"),
    EventType.QUARANTINE_CHANGED: (_AUTHORIZE_SESSION, 99, "Quarantine"),
    EventType.IDENTITY_REJECTED: (_AUTHENTICATION, 1, "Logon"),
    EventType.WORKFLOW_STARTED: (_API_ACTIVITY, 1, "Create"),
    EventType.WORKFLOW_COMPLETED: (_API_ACTIVITY, 3, "Update"),
    EventType.WORKFLOW_PURGED: (_API_ACTIVITY, 4, "Delete"),
    EventType.AGENT_TOOL_CALL: (_API_ACTIVITY, 99, "Tool Call"),
    EventType.AGENT_SIDE_EFFECT: (_API_ACTIVITY, 99, "Side Effect"),
}

_SUCCESS, _FAILURE, _OTHER = (1, "Success"), (2, "Failure"), (99, "Other")
_INFORMATIONAL, _MEDIUM, _HIGH = (1, "Informational"), (3, "Medium"), (4, "High")


def _status(kind: str, payload: Mapping[str, Any]) -> tuple[int, str]:
    if kind in (EventType.CREDENTIAL_DENIED, EventType.IDENTITY_REJECTED):
        return _FAILURE
    if kind == EventType.CREDENTIAL_REVOKE_FAILED:
        return _FAILURE
    if kind == EventType.POLICY_DECISION:
        outcome = payload.get("outcome")
        return _SUCCESS if outcome == "allow" else _FAILURE if outcome == "deny" else _OTHER
    if kind == EventType.REVOCATION_FORCED:
        return _SUCCESS if not payload.get("still_live") else _FAILURE
    if kind == EventType.APPROVAL_DECIDED:
        return _FAILURE if payload.get("decision") in ("deny", "denied") else _SUCCESS
    return _SUCCESS


def _severity(kind: str, status_id: int) -> tuple[int, str]:
    if kind == EventType.CREDENTIAL_REVOKE_FAILED:
        return _HIGH
    if kind in (EventType.REVOCATION_FORCED, EventType.QUARANTINE_CHANGED):
        return _MEDIUM
    if status_id == _FAILURE[0]:
        return _MEDIUM
    return _INFORMATIONAL


def _epoch_ms(value: object) -> int | None:
    try:
        return int(datetime.fromisoformat(str(value)).timestamp() * 1000)
    except ValueError:
        return None


def to_ocsf(record: Mapping[str, Any]) -> dict[str, Any]:
    """One chained tasklease audit record as an OCSF-style event."""
    kind = str(record.get("type", ""))
    payload_raw = record.get("payload")
    payload: Mapping[str, Any] = payload_raw if isinstance(payload_raw, Mapping) else {}
    (class_uid, class_name, category_uid, category_name), activity_id, activity_name = _MAPPING.get(
        kind, (_API_ACTIVITY, 99, "Other")
    )
    status_id, status = _status(kind, payload)
    severity_id, severity = _severity(kind, status_id)
    actor = str(record.get("actor", ""))
    event: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "category_name": category_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}",
        "time": _epoch_ms(record.get("time")),
        "severity_id": severity_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "message": kind,
        "metadata": {
            "version": OCSF_VERSION,
            "product": dict(PRODUCT),
            "uid": record.get("event_id", ""),
            "correlation_uid": record.get("workflow_id", ""),
            "original_time": record.get("time", ""),
            "log_name": "tasklease-audit",
            "sequence": record.get("seq"),
        },
        "actor": {
            "user": {
                "uid": actor,
                "name": actor,
                "type": "Service" if actor.startswith("spiffe://") else "User",
            },
        },
        "api": {
            "operation": kind,
            "service": {"name": "tasklease"},
            "request": {"uid": record.get("request_id", "")},
        },
        "unmapped": {"tasklease": dict(record)},
    }
    if class_uid == _AUTHORIZE_SESSION[0]:
        policies = payload.get("policy_ids")
        if isinstance(policies, list) and policies:
            decision = payload.get("outcome") or ("allow" if status_id == 1 else "deny")
            event["actor"]["authorizations"] = [
                {"decision": decision, "policy": {"uid": str(p), "name": str(p)}} for p in policies
            ]
        target = payload.get("target")
        if target:
            event["privileges"] = [str(target)]
        if record.get("credential_id"):
            event["session"] = {"uid": record["credential_id"]}
    if class_uid == _AUTHENTICATION[0]:
        event["status_detail"] = payload.get("reason", "")
        event["auth_protocol"] = payload.get("method", "")
    if class_uid == _API_ACTIVITY[0] and kind in (
        EventType.AGENT_TOOL_CALL,
        EventType.AGENT_SIDE_EFFECT,
    ):
        event["api"]["operation"] = str(payload.get("tool") or payload.get("effect") or kind)
    resources = []
    for uid, kind_name in (
        (record.get("workflow_id"), "workflow_run"),
        (record.get("credential_id"), "credential"),
        (payload.get("target"), "target"),
    ):
        if uid:
            resources.append({"uid": str(uid), "type": kind_name})
    if resources:
        event["resources"] = resources
    return event
