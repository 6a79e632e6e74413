"""Credential decisions with Cedar: parsed and validated once, decided per request, fail closed.

The policy set (``config/policies/*.cedar``) and its schema (``schema.cedarschema`` in the
same directory, which documents the request shape) are parsed and validated when the engine is
built; any problem raises a :class:`ConfigurationError` naming the file (at start-up it stops
the broker; on a hot reload the old set stays in force). Each :meth:`CedarPolicyEngine.decide`
builds the Cedar request from a :class:`PolicyRequest` and calls cedarpy once. cedarpy
computes and does no I/O, so the engine lives in core and takes texts; reading (and watching)
the files is ``broker.adapters.config_files`` and ``broker.policy_reload``.

Cedar has no configuration of its own: values a deployment tunes reach the policies as context
the engine fills from :class:`WorkingHours` (``context.working_hours``).

Outcomes (see the schema file for the annotations):

* **allow** only for an explicit Cedar Allow with no evaluation error. ``max_ttl`` is the
  smallest ``@max_ttl`` among the satisfied permits.
* **needs_approval** when Cedar denies and every determining policy is an approval gate
  (a ``forbid`` annotated ``@approval("required")``). ``approval_quorum`` is the largest
  ``@quorum("<n>")`` among those gates (1 when none sets one): how many distinct approvers
  the approval needs (``broker.core.approvals``).
* **deny** otherwise: a hard forbid applied, no permit applied, a policy failed to evaluate
  (Cedar skips such a policy, which could turn a forbid into an allow), the request did not
  fit the schema, or the engine itself failed.

Every policy must carry a unique ``@id``; decisions name policies by it.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import cedarpy

from broker.core.model import Decision, DecisionOutcome, Target
from broker.core.ports import PolicyRequest
from broker.core.roles import SpiffeIdPattern
from broker.core.spiffe_id import SpiffeId
from broker.core.untrusted import printable
from broker.errors import ConfigurationError, SpiffeIdError

SCHEMA_FILE = "schema.cedarschema"

# The annotations the broker reads. Anything else stops start-up: a misspelt `@max_tll`
# would otherwise silently lift a cap.
_KNOWN_ANNOTATIONS = frozenset({"id", "reason", "approval", "max_ttl", "quorum"})
_POLICY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SECONDS = re.compile(r"[1-9][0-9]{0,5}")
# @quorum: 1..10 distinct approvers (core.approvals.MAX_QUORUM).
_QUORUM = re.compile(r"[1-9]|10")
# A cap longer than a day would be meaningless: a credential request is at most one day.
_MAX_CAP = timedelta(days=1)
# Jira-style ticket keys: PROJECT-123.
TICKET_SHAPE = re.compile(r"[A-Z][A-Z0-9]{1,9}-[0-9]{1,9}")
# cedarpy names policies by their positional id (`policy3`) in evaluation errors.
_CEDAR_ID_IN_ERROR = re.compile(r"`(policy[0-9]+)`")
_ERROR_TEXT_LIMIT = 300
# Parsed entity sets kept for reuse, keyed by their exact JSON: one per distinct
# (caller, roles, target, run). Parsing and validating one costs about 0.2 ms; a hit costs a
# dict lookup. Bounded (least recently used goes first).
ENTITY_CACHE_SIZE = 2048


@dataclass(frozen=True, slots=True)
class WorkingHours:
    """The deployment's working window, which policies see as ``context.working_hours``.

    ``[start_hour_utc, end_hour_utc)`` in UTC on the ISO weekdays in ``days`` (1 Monday ..
    7 Sunday). A window with ``start > end`` wraps midnight (22-6: a night shift); its day is
    the day of the hour being checked. ``0``-``24`` on every day is "always".
    """

    start_hour_utc: int = 6
    end_hour_utc: int = 20
    days: frozenset[int] = frozenset(range(1, 8))

    def __post_init__(self) -> None:
        if not 0 <= self.start_hour_utc <= 23:
            raise ValueError(f"start_hour_utc must be 0..23, got {self.start_hour_utc}")
        if not 1 <= self.end_hour_utc <= 24:
            raise ValueError(f"end_hour_utc must be 1..24, got {self.end_hour_utc}")
        if self.start_hour_utc == self.end_hour_utc:
            raise ValueError(
                f"start_hour_utc and end_hour_utc are both {self.start_hour_utc}: an empty "
                "window; use 0 and 24 for the whole day"
            )
        if not self.days or not self.days <= frozenset(range(1, 8)):
            raise ValueError(f"days must be ISO weekdays 1..7 (at least one), got {self.days}")

    def contains(self, utc: datetime) -> bool:
        """True when ``utc`` (a UTC time) falls inside the window."""
        if utc.isoweekday() not in self.days:
            return False
        hour = utc.hour
        if self.start_hour_utc < self.end_hour_utc:
            return self.start_hour_utc <= hour < self.end_hour_utc
        return hour >= self.start_hour_utc or hour < self.end_hour_utc

    def context(self, utc: datetime) -> dict[str, Any]:
        """``context.working_hours`` at ``utc`` (shape: ``WorkingHours`` in the schema)."""
        return {
            "within": self.contains(utc),
            "start_hour_utc": self.start_hour_utc,
            "end_hour_utc": self.end_hour_utc,
        }


_DEFAULT_HOURS = WorkingHours()


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One policy of the set, as the broker reads it."""

    id: str
    source: str
    effect: str
    reason: str
    # A forbid annotated @approval("required"): an approval can lift it.
    approval_gate: bool = False
    # An approval gate's @quorum("<n>"): how many distinct approvers it asks for.
    approval_quorum: int = 1
    # A permit annotated @max_ttl("<seconds>"): the credential lives at most this long.
    max_ttl: timedelta | None = None


@dataclass(frozen=True, slots=True)
class CedarInput:
    """The Cedar request built for one :class:`PolicyRequest`.

    ``request`` and ``entities`` are what cedarpy evaluates; ``evaluated`` is the same data in
    plain JSON (entity references as strings), stamped into the decision and the audit event.
    """

    request: dict[str, Any]
    entities: list[dict[str, Any]]
    evaluated: dict[str, Any]


class CedarPolicyEngine:
    """Decides credential requests with a Cedar policy set. Satisfies ``core.ports.PolicyEngine``.

    ``policies`` maps a source name (a file name) to its Cedar text; ``schema`` is the Cedar
    schema text. Both are parsed and validated here: the engine cannot exist with a policy set
    that is empty, unparsable, or inconsistent with the schema. ``hours`` is the configured
    working window the policies see as ``context.working_hours``.
    """

    def __init__(
        self,
        *,
        policies: Mapping[str, str],
        schema: str,
        schema_source: str = SCHEMA_FILE,
        hours: WorkingHours | None = None,
    ) -> None:
        self._hours = hours if hours is not None else WorkingHours()
        try:
            self._schema = cedarpy.Schema.from_str(schema)
        except ValueError as exc:
            raise ConfigurationError(
                f"policy schema {schema_source}: cannot be parsed: {printable(str(exc))}"
            ) from None
        infos: list[PolicyInfo] = []
        for source, text in policies.items():
            infos.extend(_check_source(source, text, self._schema))
        if not infos:
            raise ConfigurationError(
                "the policy set is empty: with no policy every request would be denied, which "
                "is never what a deployment means; add config/policies/*.cedar"
            )
        seen: dict[str, str] = {}
        for info in infos:
            if info.id in seen:
                raise ConfigurationError(
                    f"policy id {info.id!r} is used twice: in {seen[info.id]} and {info.source}"
                )
            seen[info.id] = info.source
        # One set from all sources. Cedar numbers policies positionally (`policy0`, ...) per
        # parse; the map below ties those numbers back to the @id of each policy.
        self._policy_set = cedarpy.PolicySet.from_str("\n".join(policies.values()))
        by_id = {info.id: info for info in infos}
        self._by_cedar_id: dict[str, PolicyInfo] = {
            cedar_id: by_id[template.annotations["id"]]
            for cedar_id, template in self._policy_set.to_pst().static_policies.items()
        }
        self._order = {info.id: index for index, info in enumerate(infos)}
        self._infos = tuple(infos)
        self._entity_cache: OrderedDict[str, cedarpy.Entities] = OrderedDict()

    @property
    def policies(self) -> tuple[PolicyInfo, ...]:
        """Every policy of the set, in source order."""
        return self._infos

    def decide(self, request: PolicyRequest) -> Decision:
        """The decision for ``request``. Anything but an explicit, error-free allow is not one."""
        try:
            cedar_input = cedar_input_for(request, hours=self._hours)
        except Exception as exc:  # noqa: BLE001 - fail closed: a request we cannot express is denied
            return _failed(f"the request cannot be expressed for the policy engine: {exc!r}", {})
        try:
            result = cedarpy.is_authorized(
                cedar_input.request,
                self._policy_set,
                self._entities(cedar_input.entities),
                schema=self._schema,
            )
            outcome = result.decision
            determining = list(result.diagnostics.reasons)
            errors = list(result.diagnostics.errors)
        except Exception as exc:  # noqa: BLE001 - fail closed: an engine failure is a deny
            return _failed(f"the policy engine failed: {exc!r}", cedar_input.evaluated)
        return self._interpret(outcome, determining, errors, cedar_input.evaluated)

    def _entities(self, entities: list[dict[str, Any]]) -> cedarpy.Entities | list[dict[str, Any]]:
        """The parsed, schema-validated entity set for ``entities``, parsed once per distinct
        content (the key is the exact JSON, so any change of an attribute is a new entry).
        A set that does not fit the schema is not cached: it is handed to the engine as it is,
        which denies it with Cedar's full explanation."""
        key = json.dumps(entities, separators=(",", ":"))
        cache = self._entity_cache
        parsed = cache.get(key)
        if parsed is not None:
            cache.move_to_end(key)
            return parsed
        try:
            parsed = cedarpy.Entities.from_json_str(key, self._schema)
        except ValueError:
            return entities
        cache[key] = parsed
        if len(cache) > ENTITY_CACHE_SIZE:
            cache.popitem(last=False)
        return parsed

    def _interpret(
        self,
        outcome: cedarpy.Decision,
        determining: list[str],
        errors: list[str],
        evaluated: dict[str, Any],
    ) -> Decision:
        if errors:
            # Cedar skips a policy that errors and decides without it: a failing forbid would
            # quietly become an allow. Any error is a deny.
            named = {
                self._by_cedar_id[cedar_id].id
                for error in errors
                for cedar_id in _CEDAR_ID_IN_ERROR.findall(error)
                if cedar_id in self._by_cedar_id
            }
            return Decision(
                outcome=DecisionOutcome.DENY,
                policy_ids=self._sorted(named),
                reasons=tuple(
                    "the policy engine reported an error, so the request is denied: "
                    + printable(self._with_policy_ids(error), _ERROR_TEXT_LIMIT)
                    for error in errors
                ),
                context=evaluated,
            )
        unknown = [cedar_id for cedar_id in determining if cedar_id not in self._by_cedar_id]
        if unknown:
            return _failed(f"the engine named policies it was not given: {unknown}", evaluated)
        infos = sorted(
            (self._by_cedar_id[cedar_id] for cedar_id in determining),
            key=lambda info: self._order[info.id],
        )
        ids = tuple(info.id for info in infos)
        reasons = tuple(f"{info.id}: {info.reason}" for info in infos)
        if outcome is cedarpy.Decision.Allow:
            if not infos or any(info.effect != "permit" for info in infos):
                return _failed(f"an allow determined by {list(ids)} is not credible", evaluated)
            caps = [info.max_ttl for info in infos if info.max_ttl is not None]
            return Decision(
                outcome=DecisionOutcome.ALLOW,
                policy_ids=ids,
                reasons=reasons,
                context=evaluated,
                max_ttl=min(caps, default=None),
            )
        if outcome is cedarpy.Decision.Deny:
            if not infos:
                return Decision(
                    outcome=DecisionOutcome.DENY,
                    policy_ids=(),
                    reasons=("no policy permits this request",),
                    context=evaluated,
                )
            if any(info.effect != "forbid" for info in infos):
                return _failed(f"a deny determined by {list(ids)} is not credible", evaluated)
            gated = all(info.approval_gate for info in infos)
            return Decision(
                outcome=DecisionOutcome.NEEDS_APPROVAL if gated else DecisionOutcome.DENY,
                policy_ids=ids,
                reasons=reasons,
                context=evaluated,
                approval_quorum=max((info.approval_quorum for info in infos), default=1),
            )
        return _failed(f"the engine answered {outcome!r}, neither allow nor deny", evaluated)

    def _sorted(self, ids: set[str]) -> tuple[str, ...]:
        return tuple(sorted(ids, key=self._order.__getitem__))

    def _with_policy_ids(self, error: str) -> str:
        def named(match: re.Match[str]) -> str:
            info = self._by_cedar_id.get(match.group(1))
            return f"`{info.id}`" if info else match.group(0)

        return _CEDAR_ID_IN_ERROR.sub(named, error)


def _failed(why: str, evaluated: dict[str, Any]) -> Decision:
    return Decision(
        outcome=DecisionOutcome.DENY,
        policy_ids=(),
        reasons=(f"{printable(why, _ERROR_TEXT_LIMIT)}; denied (fail closed)",),
        context=evaluated,
    )


# --------------------------------------------------------------------------- loading


def _check_source(source: str, text: str, schema: cedarpy.Schema) -> list[PolicyInfo]:
    """Parse and validate one source; its policies' annotations, in order."""
    try:
        parsed = cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"policy file {source}: cannot be parsed: {printable(str(exc))}"
        ) from None
    tree = parsed.to_pst()
    if tree.templates:
        raise ConfigurationError(
            f"policy file {source}: templates (policies with ?principal or ?resource slots) "
            f"are not supported: {sorted(_id_of(t) for t in tree.templates.values())}"
        )
    if not tree.static_policies:
        raise ConfigurationError(
            f"policy file {source}: contains no policy; delete the file to disable it"
        )
    result = cedarpy.validate_policies(text, schema)
    if not result.validation_passed:
        names = result.id_annotations_by_policy_id

        def named(match: re.Match[str]) -> str:
            return f"`{names.get(match.group(1), match.group(1))}`"

        problems = "; ".join(
            f"[{names.get(error.policy_id, error.policy_id)}] "
            f"{_CEDAR_ID_IN_ERROR.sub(named, error.error)}"
            if error.policy_id
            else error.error
            for error in result.errors
        )
        raise ConfigurationError(
            f"policy file {source}: does not match the schema: {printable(problems, 1000)}"
        )
    return [
        _policy_info(source, template.effect, dict(template.annotations))
        for template in tree.static_policies.values()
    ]


def _id_of(template: Any) -> str:
    return str(template.annotations.get("id", template.id))


def _policy_info(source: str, effect: str, annotations: dict[str, str]) -> PolicyInfo:
    policy_id = annotations.get("id")
    if policy_id is None or _POLICY_ID.fullmatch(policy_id) is None:
        raise ConfigurationError(
            f'policy file {source}: every policy needs @id("<name>") of 1-128 characters of '
            f"[A-Za-z0-9._:-], got {policy_id!r} on a {effect} policy"
        )
    where = f"policy file {source}: policy {policy_id!r}"
    unknown = sorted(set(annotations) - _KNOWN_ANNOTATIONS)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown annotation(s) {unknown}; known: {sorted(_KNOWN_ANNOTATIONS)}"
        )
    approval = annotations.get("approval")
    if approval is not None and (approval != "required" or effect != "forbid"):
        raise ConfigurationError(
            f'{where}: @approval must be @approval("required") on a forbid policy, '
            f"got @approval({approval!r}) on a {effect} policy"
        )
    raw_cap = annotations.get("max_ttl")
    cap: timedelta | None = None
    if raw_cap is not None:
        if effect != "permit":
            raise ConfigurationError(f"{where}: @max_ttl only applies to permit policies")
        if _SECONDS.fullmatch(raw_cap) is None or timedelta(seconds=int(raw_cap)) > _MAX_CAP:
            raise ConfigurationError(
                f"{where}: @max_ttl must be whole seconds between 1 and 86400, got {raw_cap!r}"
            )
        cap = timedelta(seconds=int(raw_cap))
    raw_quorum = annotations.get("quorum")
    if raw_quorum is not None and (approval is None or _QUORUM.fullmatch(raw_quorum) is None):
        raise ConfigurationError(
            f'{where}: @quorum("<1-10>") only applies to approval gates '
            f'(with @approval("required")), got @quorum({raw_quorum!r}) on a {effect} policy'
        )
    reason = annotations.get("reason") or f"{effect} policy {policy_id} applies"
    return PolicyInfo(
        id=policy_id,
        source=source,
        effect=effect,
        reason=reason,
        approval_gate=approval is not None,
        approval_quorum=int(raw_quorum) if raw_quorum is not None else 1,
        max_ttl=cap,
    )


# --------------------------------------------------------------------------- request shape


def cedar_input_for(request: PolicyRequest, *, hours: WorkingHours | None = None) -> CedarInput:
    """Build the Cedar request, entities and evaluated context (shape: the schema file);
    ``context.working_hours`` comes from ``hours`` (default :class:`WorkingHours`)."""
    now = request.now
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    utc = now.astimezone(UTC)
    run = request.run
    target = request.target
    principal = _spiffe_id(request.principal)
    run_home = _spiffe_id(run.started_by)
    is_participant = principal is not None and any(
        pattern is not None and pattern.matches(principal)
        for pattern in map(_participant_pattern, run.participants)
    )
    hops = request.chain.hops
    asserted = sum(
        1
        for position, hop in enumerate(hops)
        if not hop.verified and not (position == 0 and hop.role == "owner")
    )
    # The run and the chain are entities, not context records: a Cedar context is parsed on
    # every call (about 150 us for these two records), while the entities are parsed once per
    # distinct (caller, target, run) and reused (see CedarPolicyEngine._entities). Policies
    # read them the same way: `context.run.owner`, `context.chain.depth`.
    run_attrs: dict[str, Any] = {
        "id": run.id,
        "owner": run.owner,
        "purpose": run.purpose,
        "started_by": run.started_by,
        "trust_domain": run_home.trust_domain.name if run_home else "",
        "labels": sorted(f"{key}={value}" for key, value in run.labels.items()),
        "ticket": ticket_reference(run.labels),
        "deadline_epoch": int(run.deadline.timestamp()),
        "participants_declared": bool(run.participants),
        "is_participant": is_participant,
    }
    chain_attrs: dict[str, Any] = {
        "hops": [
            {
                "position": position,
                "role": hop.role,
                "principal": hop.principal,
                "verified": hop.verified,
            }
            for position, hop in enumerate(hops)
        ],
        "depth": len(hops),
        "fully_verified": request.chain.fully_verified,
        "asserted_beyond_owner": asserted,
    }
    approval = request.approval
    context: dict[str, Any] = {
        "now": {"epoch": int(utc.timestamp()), "hour_utc": utc.hour, "weekday": utc.isoweekday()},
        "working_hours": (hours or _DEFAULT_HOURS).context(utc),
        "ttl_seconds": int(request.ttl.total_seconds()),
        "run": _ref("Run", run.id),
        "chain": _ref("Chain", run.id),
        "task_id": request.task_id,
        "tool": request.tool,
        "justification": request.justification,
        "approval": (
            {
                "present": True,
                "id": approval.approval_id,
                "approved": approval.approved and now < approval.expires_at,
                "approvers": sorted(set(approval.approvers)),
                "approver_count": len(set(approval.approvers)),
                "expires_epoch": int(approval.expires_at.timestamp()),
            }
            if approval is not None
            else {
                "present": False,
                "id": "",
                "approved": False,
                "approvers": [],
                "approver_count": 0,
                "expires_epoch": 0,
            }
        ),
    }
    roles = sorted(request.principal_roles)
    agent_attrs: dict[str, Any] = {
        "spiffe_id": request.principal,
        "roles": roles,
        "trust_domain": request.trust_domain,
    }
    target_attrs = _target_attrs(target)
    principal_uid = {"type": "Agent", "id": request.principal}
    resource_uid = {"type": "Target", "id": target.name}
    entities: list[dict[str, Any]] = [
        {
            "uid": principal_uid,
            "attrs": {**agent_attrs, "roles": [_ref("Role", role) for role in roles]},
            "parents": [],
        },
        {
            "uid": resource_uid,
            "attrs": {
                **target_attrs,
                "kind": _ref("TargetKind", target.kind.value),
                "sensitivity": _ref("Sensitivity", target.sensitivity.value),
            },
            "parents": [],
        },
        {"uid": {"type": "Run", "id": run.id}, "attrs": run_attrs, "parents": []},
        {"uid": {"type": "Chain", "id": run.id}, "attrs": chain_attrs, "parents": []},
    ]
    action_uid = {"type": "Action", "id": request.action}
    return CedarInput(
        request={
            "principal": principal_uid,
            "action": action_uid,
            "resource": resource_uid,
            "context": context,
        },
        entities=entities,
        evaluated={
            "principal": {**principal_uid, **agent_attrs},
            "action": action_uid,
            "resource": {**resource_uid, **target_attrs},
            "context": {**context, "run": run_attrs, "chain": chain_attrs},
        },
    )


def ticket_reference(labels: Mapping[str, str]) -> str:
    """The run's ``ticket`` label when it looks like ``ABC-123``, else ``""``.

    Only the explicit label counts: searching free text such as the purpose would take
    ``SHA-256`` or ``UTF-8`` for a ticket.
    """
    label = labels.get("ticket", "")
    return label if TICKET_SHAPE.fullmatch(label) else ""


def _target_attrs(target: Target) -> dict[str, Any]:
    return {
        "name": target.name,
        "kind": target.kind.value,
        "system": target.system,
        "environment": target.environment,
        "sensitivity": target.sensitivity.value,
        "sensitivity_rank": target.sensitivity.rank,
        "legacy": target.legacy,
        "revocable": target.revocable,
        "max_ttl_seconds": int(target.max_ttl.total_seconds()),
    }


def _ref(entity_type: str, entity_id: str) -> dict[str, Any]:
    return {"__entity": {"type": entity_type, "id": entity_id}}


# Runs and callers repeat; parsing each pattern and ID once keeps the per-request cost flat.
@lru_cache(maxsize=4096)
def _participant_pattern(text: str) -> SpiffeIdPattern | None:
    # A pattern that does not parse matches nobody (fail closed); runs are validated when
    # they are created, so this is defence in depth.
    try:
        return SpiffeIdPattern.parse(text)
    except SpiffeIdError:
        return None


@lru_cache(maxsize=4096)
def _spiffe_id(text: str) -> SpiffeId | None:
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError:
        return None
