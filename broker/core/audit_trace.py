"""The story of one workflow run, told from its audit records as people read it. Pure.

:func:`render_trace` answers, for one run: who owned it and who started it (and which hops of
the delegation chain the broker verified), which agent asked for which credential and under
which decision, who approved, which tool calls and side effects the agents reported, and when
and why each credential was revoked. Every value that came from a caller is escaped and
truncated (:func:`~broker.core.untrusted.printable`) so a hostile summary cannot drive the
terminal it is printed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.core.audit import EventType, record_runs
from broker.core.untrusted import printable


def _text(value: object, limit: int = 200) -> str:
    return printable(value if isinstance(value, str) else "" if value is None else value, limit)


def _when(value: object) -> str:
    try:
        moment = datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        return _text(value, 40)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _moment(record: Mapping[str, Any]) -> datetime:
    try:
        moment = datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.utcoffset() is not None else moment.replace(tzinfo=UTC)


def _payload(record: Mapping[str, Any]) -> Mapping[str, Any]:
    payload = record.get("payload")
    return payload if isinstance(payload, Mapping) else {}


def _ids(values: object) -> str:
    if not isinstance(values, list) or not values:
        return "no policy"
    return "[" + ", ".join(_text(v, 80) for v in values) + "]"


def _hop(hop: object) -> str:
    if not isinstance(hop, Mapping):
        return "?"
    proof = "verified" if hop.get("verified") else "asserted"
    return f"{_text(hop.get('principal'))} ({_text(hop.get('role'), 40)}, {proof})"


@dataclass
class _Credential:
    credential_id: str
    holder: str = ""
    target: str = ""
    kind: str = ""
    task_id: str = ""
    decision: str = ""
    issued_at: str = ""
    expires_at: str = ""
    approval_id: str = ""
    ended: list[str] = field(default_factory=list)


def _story_line(record: Mapping[str, Any]) -> str | None:
    kind = record.get("type")
    payload = _payload(record)
    actor = _text(record.get("actor"))
    cred = _text(record.get("credential_id"), 80)
    task = _text(record.get("task_id"), 80)
    if kind == EventType.WORKFLOW_STARTED:
        return f"run started by {actor} for owner {_text(payload.get('owner'))}"
    if kind == EventType.POLICY_DECISION:
        return (
            f"{actor} asked for {_text(payload.get('target'), 80)} (task {task}): "
            f"{_text(payload.get('outcome'), 20).upper()} by {_ids(payload.get('policy_ids'))}"
        )
    if kind == EventType.CREDENTIAL_ISSUED:
        accessor = _text(payload.get("token_accessor"), 80)
        return (
            f"credential {cred} issued to {actor}: {_text(payload.get('target'), 80)} "
            f"({_text(payload.get('kind'), 20)}), {payload.get('ttl_seconds')} s until "
            f"{_when(payload.get('expires_at'))}"
            + (f", token accessor {accessor}" if accessor else "")
            + ("" if payload.get("revocable", True) else ", NOT revocable early")
        )
    if kind == EventType.CREDENTIAL_DENIED:
        return (
            f"{actor} was refused {_text(payload.get('target'), 80)} (task {task}): "
            f"{_text(payload.get('reason'), 80)}"
            + (f" — {_text(payload.get('detail'))}" if payload.get("detail") else "")
        )
    if kind == EventType.APPROVAL_REQUESTED:
        return (
            f"approval {_text(record.get('approval_id'), 80)} requested by {actor} for "
            f"{_text(payload.get('target'), 80)} (task {task}, quorum {payload.get('quorum')}, "
            f"by {_ids(payload.get('policy_ids'))})"
        )
    if kind == EventType.APPROVAL_DECIDED:
        comment = payload.get("comment")
        return (
            f"approval {_text(record.get('approval_id'), 80)}: "
            f"{_text(payload.get('decision'), 40)} by {actor} "
            f"(now {_text(payload.get('state'), 40)})"
            + (f' — "{_text(comment)}"' if comment else "")
        )
    if kind == EventType.AGENT_TOOL_CALL:
        summary = payload.get("summary")
        return (
            f"tool call by {actor}" + (f" with {cred}" if cred else "") + f": "
            f"{_text(payload.get('tool'), 120)}" + (f' — "{_text(summary)}"' if summary else "")
        )
    if kind == EventType.AGENT_SIDE_EFFECT:
        summary = payload.get("summary")
        return (
            f"side effect reported by {actor}" + (f" with {cred}" if cred else "") + f": "
            f"{_text(payload.get('effect'), 120)}" + (f' — "{_text(summary)}"' if summary else "")
        )
    if kind == EventType.WORKFLOW_COMPLETED:
        return (
            f"run ended by {actor}: {_text(payload.get('state'), 40)} "
            f"(outcome {_text(payload.get('outcome'), 40)}; "
            f"{payload.get('leases_due', 0)} credential(s) to revoke)"
        )
    if kind == EventType.CREDENTIAL_REVOKED:
        by = payload.get("initiated_by")
        why = payload.get("reason")
        return (
            f"credential {cred} revoked ({_text(payload.get('cause'), 40)}"
            + (f", asked by {_text(by)}" if by else "")
            + (f': "{_text(why)}"' if why else "")
            + "), confirmed by OpenBao"
        )
    if kind == EventType.CREDENTIAL_REVOKE_FAILED:
        return (
            f"credential {cred} could NOT be revoked after {payload.get('attempts')} attempts "
            f"({_text(payload.get('error'))}); still retried"
        )
    if kind == EventType.REVOCATION_FORCED:
        return (
            f'forced revocation by {actor}: "{_text(payload.get("reason"))}" '
            f"({payload.get('confirmed', 0)} confirmed revoked, "
            f"{payload.get('still_live', 0)} still live)"
        )
    if kind == EventType.QUARANTINE_CHANGED:
        return (
            f"quarantine {_text(payload.get('action'), 20)} by {actor}: "
            f"{_text(payload.get('kind'), 40)} {_text(payload.get('value'))}"
        )
    if kind == EventType.IDENTITY_REJECTED:
        return f"identity rejected: {_text(payload.get('reason'), 80)}"
    if kind == EventType.WORKFLOW_PURGED:
        return (
            f"run purged from the ledger by {actor}: over since "
            f"{_text(payload.get('over_at'), 40)}, kept {payload.get('retention_days')} day(s); "
            f"{payload.get('leases', 0)} lease record(s) deleted (history stays here)"
        )
    return None


def _credentials(records: Sequence[Mapping[str, Any]]) -> dict[str, _Credential]:
    found: dict[str, _Credential] = {}
    # A decision names the credential it allowed; records written before it did are matched
    # by holder and task (the latest decision of that task).
    decision_by_credential: dict[str, str] = {}
    decision_by_task: dict[tuple[str, str], str] = {}
    for record in records:
        kind = record.get("type")
        payload = _payload(record)
        task = str(record.get("task_id") or "")
        cred_id = record.get("credential_id")
        if kind == EventType.POLICY_DECISION:
            said = f"{_text(payload.get('outcome'), 20).upper()} {_ids(payload.get('policy_ids'))}"
            if isinstance(cred_id, str) and cred_id:
                decision_by_credential[cred_id] = said
            else:
                decision_by_task[(str(record.get("actor")), task)] = said
            continue
        if not isinstance(cred_id, str) or not cred_id:
            continue
        cred = found.setdefault(cred_id, _Credential(cred_id))
        if kind == EventType.CREDENTIAL_ISSUED:
            cred.holder = _text(record.get("actor"))
            cred.target = _text(payload.get("target"), 80)
            cred.kind = _text(payload.get("kind"), 20)
            cred.task_id = _text(task, 80)
            cred.issued_at = _when(record.get("time"))
            cred.expires_at = _when(payload.get("expires_at"))
            cred.approval_id = _text(record.get("approval_id"), 80)
            cred.decision = decision_by_credential.get(cred_id) or decision_by_task.get(
                (str(record.get("actor")), task), ""
            )
        elif kind == EventType.CREDENTIAL_REVOKED:
            cred.ended.append(
                f"revoked {_when(record.get('time'))} ({_text(payload.get('cause'), 40)})"
            )
        elif kind == EventType.CREDENTIAL_REVOKE_FAILED:
            cred.ended.append(f"revoke FAILED {_when(record.get('time'))}")
    return found


def render_trace(records: Iterable[Mapping[str, Any]], workflow_id: str) -> str:
    """The story of run ``workflow_id`` from audit records (any order, any mix of runs)."""
    mine = [r for r in records if workflow_id in record_runs(r)]
    mine.sort(key=_moment)
    lines = [f"Run {_text(workflow_id, 128)}"]
    if not mine:
        lines.append("  no audit events for this run")
        return "\n".join(lines) + "\n"
    started = next((r for r in mine if r.get("type") == EventType.WORKFLOW_STARTED), None)
    if started is None:
        lines.append("  (no workflow.started event: the run's start is not in these records)")
    else:
        payload = _payload(started)
        chain = started.get("chain")
        hops = chain if isinstance(chain, list) else []
        owner_hop = next(
            (h for h in hops if isinstance(h, Mapping) and h.get("role") == "owner"), None
        )
        lines[0] += f': "{_text(payload.get("purpose"), 300)}"'
        proof = "asserted by the orchestrator"
        if isinstance(owner_hop, Mapping) and owner_hop.get("verified"):
            proof = "verified"
        lines.append(f"  owner         {_text(payload.get('owner'))} ({proof})")
        lines.append(
            f"  started by    {_text(started.get('actor'))} (verified) at "
            f"{_when(started.get('time'))}"
        )
        lines.append(f"  deadline      {_when(payload.get('deadline'))}")
        labels = payload.get("labels")
        if isinstance(labels, Mapping) and labels:
            lines.append(
                "  labels        "
                + ", ".join(f"{_text(k, 64)}={_text(v, 128)}" for k, v in sorted(labels.items()))
            )
        participants = payload.get("participants")
        if isinstance(participants, list) and participants:
            lines.append("  participants  " + ", ".join(_text(p) for p in participants))
    lines.append("")
    lines.append("Story")
    for record in mine:
        line = _story_line(record)
        if line is not None:
            lines.append(f"  {_when(record.get('time'))}  {line}")
    credentials = _credentials(mine)
    if credentials:
        lines.append("")
        lines.append("Credentials")
        for cred in credentials.values():
            status = "; ".join(cred.ended) if cred.ended else "not recorded as revoked"
            lines.append(
                f"  {_text(cred.credential_id, 80)}  {cred.target} ({cred.kind}) task "
                f"{cred.task_id or '?'} held by {cred.holder or '?'}"
            )
            lines.append(
                f"      decision {cred.decision or '?'}"
                + (f", approval {cred.approval_id}" if cred.approval_id else "")
                + f"; issued {cred.issued_at or '?'}, expires {cred.expires_at or '?'}; {status}"
            )
    chains: list[list[Any]] = [
        chain
        for r in mine
        if r.get("type") == EventType.CREDENTIAL_ISSUED
        and isinstance(chain := r.get("chain"), list)
    ]
    if chains:
        lines.append("")
        lines.append("Delegation")
        seen: set[str] = set()
        for chain in chains:
            rendered = " → ".join(_hop(hop) for hop in chain)
            if rendered not in seen:
                seen.add(rendered)
                lines.append(f"  {rendered}")
    return "\n".join(lines) + "\n"


def summary_line(record: Mapping[str, Any]) -> str:
    """One line per record for ``tasklease audit tail``: time, type, actor, ids, and what."""
    ids = " ".join(
        f"{label}={_text(record.get(key), 80)}"
        for label, key in (
            ("run", "workflow_id"),
            ("task", "task_id"),
            ("cred", "credential_id"),
            ("approval", "approval_id"),
        )
        if record.get(key)
    )
    what = _story_line(record) or ""
    return (
        f"{_when(record.get('time'))}  {_text(record.get('type'), 40):<24} "
        f"{_text(record.get('actor'))}  {ids}  {what}".rstrip()
    )
