"""Declarative policy test cases: ``config/policies/tests/*.toml``, request → expected decision.

``tasklease policy test`` runs them against a policy directory, and so does
``tests/unit/test_policy_cases.py`` (part of ``make test``). A file looks like::

    # Optional: values every case of this file starts from (built-in defaults below).
    [defaults]
    now = 2030-01-02T12:00:00Z          # a TOML date-time with an offset
    principal = "spiffe://tasklease.test/agent/demo"
    roles = ["agent"]
    ttl = "5m"                          # the TTL the policy sees ("1h", "15m", "90s", "1h30m")
    task_id = "task-1"
    tool = "psql"
    justification = "read yesterday's orders"
    target = { sensitivity = "internal", environment = "dev" }   # merged into each case's
    run = { owner = "alice@example.test" }                       # merged into each case's

    # Optional: the working window policies see as context.working_hours (broker setting
    # [policy] working_hours_*); the built-in default is the broker's: 06-20 UTC, every day.
    [working_hours]
    start_hour_utc = 6
    end_hour_utc = 20
    days = [1, 2, 3, 4, 5, 6, 7]

    [[case]]
    name = "production without a ticket is denied"
    target = { environment = "production" }
    run = { labels = { ticket = "OPS-1234" }, participants = ["spiffe://tasklease.test/agent/*"] }
    chain = [{ role = "sub-agent", principal = "spiffe://tasklease.test/x", verified = false }]
    approval = { approvers = ["bob@example.test"], approved = true, expires_in = "1h" }
    expect = { outcome = "deny", policy_ids = ["production-needs-ticket"] }

``target`` keys: name, kind, environment, sensitivity, system, legacy, revocable, max_ttl.
``run`` keys: id, owner, purpose, started_by, labels, participants, deadline_in. ``chain``
lists the hops after owner → orchestrator (verified) → the principal as agent (verified).
``expect``: ``outcome`` (allow | deny | needs_approval, required); optionally ``policy_ids``
(the determining policies, exactly, in policy order), ``max_ttl`` (a duration or ``"none"``)
and ``reason_contains`` (a substring of one of the decision's reasons).

Unknown keys are errors (a typo must not turn a case into one that always passes).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.adapters.config_files import read_policy_dir
from broker.core.model import (
    ActionName,
    Decision,
    DecisionOutcome,
    DelegationHop,
    Sensitivity,
    Target,
    TargetKind,
    WorkflowRun,
)
from broker.core.policy import CedarPolicyEngine, WorkingHours
from broker.core.ports import ApprovalState, PolicyRequest
from broker.errors import BadRequestError, ConfigurationError

CASES_DIR = "tests"
CASES_GLOB = "*.toml"

_DEFAULT_NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)  # a Wednesday, midday UTC
_DEFAULTS: Mapping[str, Any] = {
    "now": _DEFAULT_NOW,
    "principal": "spiffe://tasklease.test/agent/demo",
    "roles": ["agent"],
    "ttl": "5m",
    "task_id": "task-1",
    "tool": "",
    "justification": "",
}
_TARGET_DEFAULTS: Mapping[str, Any] = {
    "name": "test-target",
    "kind": "database",
    "environment": "dev",
    "sensitivity": "internal",
    "system": "test-system",
    "legacy": False,
    "revocable": True,
    "max_ttl": "1h",
}
_RUN_DEFAULTS: Mapping[str, Any] = {
    "id": "wf-policy-test",
    "owner": "alice@example.test",
    "purpose": "policy test",
    "started_by": "spiffe://tasklease.test/orchestrator/demo",
    "labels": {},
    "participants": [],
    "deadline_in": "2h",
}
_CASE_KEYS = frozenset({*_DEFAULTS, "name", "target", "run", "chain", "approval", "expect"})
_FILE_KEYS = frozenset({"defaults", "working_hours", "case"})
_DEFAULT_KEYS = frozenset({*_DEFAULTS, "target", "run"})
_HOP_KEYS = frozenset({"role", "principal", "verified"})
_APPROVAL_KEYS = frozenset({"approvers", "approved", "expires_in", "id"})
_EXPECT_KEYS = frozenset({"outcome", "policy_ids", "max_ttl", "reason_contains"})
_HOURS_KEYS = frozenset({"start_hour_utc", "end_hour_utc", "days"})
_DURATION = re.compile(r"(?:(\d{1,3})h)?(?:(\d{1,5})m)?(?:(\d{1,6})s)?")


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a case expects of the decision."""

    outcome: DecisionOutcome
    policy_ids: tuple[str, ...] | None = None
    # None: not checked; the inner None: "no cap".
    max_ttl: tuple[timedelta | None] | None = None
    reason_contains: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyCase:
    """One declarative case: a request and what its decision must be."""

    source: str
    name: str
    request: PolicyRequest
    expect: Expectation
    hours: WorkingHours

    @property
    def label(self) -> str:
        """``<file>::<name>``."""
        return f"{Path(self.source).name}::{self.name}"


@dataclass(frozen=True, slots=True)
class CaseResult:
    """A case run: passed, or the ways the decision differed from the expectation."""

    case: PolicyCase
    decision: Decision
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when the decision met every expectation."""
        return not self.problems


@dataclass(frozen=True, slots=True)
class CaseRun:
    """Every case of a directory, run."""

    results: tuple[CaseResult, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        """The cases that did not pass."""
        return tuple(r for r in self.results if not r.passed)


# --------------------------------------------------------------------------- loading


def case_files(cases_dir: Path) -> list[Path]:
    """The case files of ``cases_dir``, sorted."""
    return sorted(cases_dir.glob(CASES_GLOB))


def load_cases(cases_dir: Path) -> list[PolicyCase]:
    """Parse every case file of ``cases_dir``; a bad file is a ConfigurationError naming it."""
    files = case_files(cases_dir)
    if not files:
        raise ConfigurationError(f"no policy test cases: {str(cases_dir)!r} has no {CASES_GLOB}")
    cases: list[PolicyCase] = []
    for path in files:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(
                f"policy test file {str(path)!r} cannot be read: {type(exc).__name__}: {exc}"
            ) from None
        cases.extend(parse_case_file(str(path), data))
    return cases


def parse_case_file(source: str, data: Mapping[str, Any]) -> list[PolicyCase]:
    """The cases of one parsed TOML document."""
    _only(data, _FILE_KEYS, source)
    defaults = _table(data.get("defaults", {}), f"{source}: [defaults]")
    _only(defaults, _DEFAULT_KEYS, f"{source}: [defaults]")
    hours = _hours(data.get("working_hours"), source)
    entries = data.get("case", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigurationError(f"{source}: no [[case]] tables")
    cases: list[PolicyCase] = []
    names: set[str] = set()
    for index, item in enumerate(entries):
        where = f"{source}: case[{index}]"
        entry = _table(item, where)
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"{where}: needs a name")
        where = f"{source}: case {name!r}"
        if name in names:
            raise ConfigurationError(f"{where}: the name is used twice in the file")
        names.add(name)
        _only(entry, _CASE_KEYS, where)
        try:
            request = _request(entry, defaults, where)
        except (ValueError, TypeError, BadRequestError) as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        cases.append(
            PolicyCase(
                source=source,
                name=name,
                request=request,
                expect=_expectation(entry.get("expect"), where),
                hours=hours,
            )
        )
    return cases


def _request(entry: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> PolicyRequest:
    def value(key: str) -> Any:
        return entry.get(key, defaults.get(key, _DEFAULTS.get(key)))

    now = value("now")
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise ValueError(f"now must be a TOML date-time with an offset, got {now!r}")
    principal = _text(value("principal"), "principal")
    roles = value("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise ValueError(f"roles must be a list of strings, got {roles!r}")
    target = _target(_merged(entry, defaults, "target", _TARGET_DEFAULTS, where))
    run = _run(_merged(entry, defaults, "run", _RUN_DEFAULTS, where), now)
    chain = run.chain.extended(DelegationHop("agent", principal, verified=True))
    hops = entry.get("chain", [])
    if not isinstance(hops, list):
        raise TypeError("chain must be a list of hops")
    for item in hops:
        hop = _table(item, f"{where}: chain hop")
        _only(hop, _HOP_KEYS, f"{where}: chain hop")
        chain = chain.extended(
            DelegationHop(
                _text(hop.get("role"), "hop role"),
                _text(hop.get("principal"), "hop principal"),
                verified=_flag(hop.get("verified", False), "hop verified"),
            )
        )
    return PolicyRequest(
        principal=principal,
        principal_roles=frozenset(roles),
        trust_domain=_trust_domain(principal),
        action=ActionName.REQUEST_CREDENTIAL.value,
        target=target,
        run=run,
        chain=chain,
        task_id=_text(value("task_id"), "task_id"),
        tool=_text(value("tool"), "tool", empty=True),
        justification=_text(value("justification"), "justification", empty=True),
        ttl=_duration(value("ttl"), "ttl"),
        now=now,
        approval=_approval(entry.get("approval"), now, where),
    )


def _merged(
    entry: Mapping[str, Any],
    defaults: Mapping[str, Any],
    key: str,
    builtin: Mapping[str, Any],
    where: str,
) -> dict[str, Any]:
    merged = dict(builtin)
    for raw, name in ((defaults.get(key, {}), "[defaults]"), (entry.get(key, {}), "case")):
        layer = _table(raw, f"{where}: {name} {key}")
        _only(layer, frozenset(builtin), f"{where}: {key}")
        merged.update(layer)
    return merged


def _target(fields: Mapping[str, Any]) -> Target:
    kind = TargetKind(fields["kind"])
    vault_path = "" if kind is TargetKind.VAULT_TOKEN else "test"
    return Target(
        name=_text(fields["name"], "target name"),
        kind=kind,
        policies=("tasklease-test",),
        system=_text(fields["system"], "target system"),
        environment=_text(fields["environment"], "target environment"),
        sensitivity=Sensitivity(fields["sensitivity"]),
        max_ttl=_duration(fields["max_ttl"], "target max_ttl"),
        mount=vault_path,
        role=vault_path,
        revocable=_flag(fields["revocable"], "target revocable"),
        legacy=_flag(fields["legacy"], "target legacy"),
    )


def _run(fields: Mapping[str, Any], now: datetime) -> WorkflowRun:
    labels = fields["labels"]
    participants = fields["participants"]
    if not isinstance(labels, Mapping):
        raise TypeError(f"run labels must be a table, got {labels!r}")
    if not isinstance(participants, list):
        raise TypeError(f"run participants must be a list, got {participants!r}")
    return WorkflowRun(
        id=_text(fields["id"], "run id"),
        owner=_text(fields["owner"], "run owner"),
        purpose=_text(fields["purpose"], "run purpose"),
        started_by=_text(fields["started_by"], "run started_by"),
        created_at=now - timedelta(minutes=5),
        deadline=now + _duration(fields["deadline_in"], "run deadline_in"),
        labels={str(k): str(v) for k, v in labels.items()},
        participants=tuple(str(p) for p in participants),
    )


def _approval(value: object, now: datetime, where: str) -> ApprovalState | None:
    if value is None:
        return None
    value = _table(value, f"{where}: approval")
    _only(value, _APPROVAL_KEYS, f"{where}: approval")
    approvers = value.get("approvers", [])
    if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
        raise ValueError(f"approval approvers must be a list of strings, got {approvers!r}")
    return ApprovalState(
        approval_id=_text(value.get("id", "apr-test"), "approval id"),
        approved=_flag(value.get("approved", True), "approval approved"),
        approvers=tuple(approvers),
        expires_at=now + _duration(value.get("expires_in", "1h"), "approval expires_in"),
    )


def _expectation(value: object, where: str) -> Expectation:
    if value is None:
        raise ConfigurationError(f"{where}: needs expect = {{ outcome = ... }}")
    value = _table(value, f"{where}: expect")
    _only(value, _EXPECT_KEYS, f"{where}: expect")
    try:
        outcome = DecisionOutcome(str(value.get("outcome")))
    except ValueError:
        raise ConfigurationError(
            f"{where}: expect.outcome must be one of "
            f"{[o.value for o in DecisionOutcome]}, got {value.get('outcome')!r}"
        ) from None
    policy_ids = value.get("policy_ids")
    if policy_ids is not None and (
        not isinstance(policy_ids, list) or not all(isinstance(p, str) for p in policy_ids)
    ):
        raise ConfigurationError(f"{where}: expect.policy_ids must be a list of policy ids")
    raw_cap = value.get("max_ttl")
    cap: tuple[timedelta | None] | None = None
    if raw_cap is not None:
        try:
            cap = (None if raw_cap == "none" else _duration(raw_cap, "expect.max_ttl"),)
        except ValueError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
    contains = value.get("reason_contains")
    if contains is not None and not isinstance(contains, str):
        raise ConfigurationError(f"{where}: expect.reason_contains must be a string")
    return Expectation(
        outcome=outcome,
        policy_ids=None if policy_ids is None else tuple(policy_ids),
        max_ttl=cap,
        reason_contains=contains,
    )


def _hours(value: object, source: str) -> WorkingHours:
    if value is None:
        return WorkingHours()
    value = _table(value, f"{source}: [working_hours]")
    _only(value, _HOURS_KEYS, f"{source}: [working_hours]")
    defaults = WorkingHours()
    try:
        return WorkingHours(
            start_hour_utc=int(value.get("start_hour_utc", defaults.start_hour_utc)),
            end_hour_utc=int(value.get("end_hour_utc", defaults.end_hour_utc)),
            days=frozenset(int(d) for d in value.get("days", defaults.days)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{source}: [working_hours]: {exc}") from None


# --------------------------------------------------------------------------- running


def run_cases(policy_dir: Path, cases: Sequence[PolicyCase]) -> CaseRun:
    """Decide every case with the policy set of ``policy_dir`` (one engine per working
    window); raises ConfigurationError when the set is invalid."""
    files = read_policy_dir(policy_dir)
    engines: dict[WorkingHours, CedarPolicyEngine] = {}
    results: list[CaseResult] = []
    for case in cases:
        engine = engines.get(case.hours)
        if engine is None:
            engine = engines[case.hours] = files.engine(case.hours)
        results.append(check_case(engine, case))
    return CaseRun(results=tuple(results))


def check_case(engine: CedarPolicyEngine, case: PolicyCase) -> CaseResult:
    """Decide one case and compare the decision with its expectation."""
    decision = engine.decide(case.request)
    expect = case.expect
    problems: list[str] = []
    if decision.outcome is not expect.outcome:
        problems.append(f"outcome: expected {expect.outcome.value}, got {decision.outcome.value}")
    if expect.policy_ids is not None and decision.policy_ids != expect.policy_ids:
        problems.append(
            f"policy_ids: expected {list(expect.policy_ids)}, got {list(decision.policy_ids)}"
        )
    if expect.max_ttl is not None and decision.max_ttl != expect.max_ttl[0]:
        problems.append(
            f"max_ttl: expected {_show(expect.max_ttl[0])}, got {_show(decision.max_ttl)}"
        )
    if expect.reason_contains is not None and not any(
        expect.reason_contains in reason for reason in decision.reasons
    ):
        problems.append(f"reasons: none contains {expect.reason_contains!r}")
    if problems and decision.reasons:
        problems.append("the decision's reasons: " + " | ".join(decision.reasons))
    return CaseResult(case=case, decision=decision, problems=tuple(problems))


# --------------------------------------------------------------------------- helpers


def _show(cap: timedelta | None) -> str:
    return "none" if cap is None else f"{int(cap.total_seconds())}s"


def _only(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigurationError(f"{where}: unknown key(s) {unknown}; allowed {sorted(allowed)}")


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{where} must be a table")
    return value


def _text(value: object, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise ValueError(f"{what} must be a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be true or false, got {value!r}")
    return value


def _duration(value: object, what: str) -> timedelta:
    match = _DURATION.fullmatch(value) if isinstance(value, str) and value else None
    if match is None:
        raise ValueError(
            f'{what} must be a duration such as "15m", "90s" or "1h30m", got {value!r}'
        )
    hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    return timedelta(hours=hours, minutes=minutes, seconds=seconds)


def _trust_domain(principal: str) -> str:
    prefix = "spiffe://"
    if not principal.startswith(prefix):
        return ""
    return principal[len(prefix) :].split("/", 1)[0]
