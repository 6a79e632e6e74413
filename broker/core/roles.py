"""Roles: which identities may act as agent, orchestrator, approver or admin.

``config/identities.toml`` maps SPIFFE ID patterns (workloads) and OIDC claims (people) to
roles. An identity that matches no rule has no role, and every endpoint refuses it (403 with
the reason). Patterns are exact SPIFFE IDs, or ``<id>/*`` for every ID strictly below ``<id>``
(any depth): ``spiffe://acme.test/agents/*`` matches ``spiffe://acme.test/agents/a/b`` but not
``spiffe://acme.test/agents`` itself, nor ``spiffe://acme.test/agents-evil/x``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from broker.core.identity import HumanIdentity, WorkloadIdentity
from broker.core.spiffe_id import SpiffeId
from broker.errors import ConfigurationError, SpiffeIdError


class Role(StrEnum):
    """What a caller may do (see the API table in the README)."""

    AGENT = "agent"
    ORCHESTRATOR = "orchestrator"
    APPROVER = "approver"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class SpiffeIdPattern:
    """An exact SPIFFE ID, or a subtree ``<id>/*``."""

    base: SpiffeId
    subtree: bool

    @classmethod
    def parse(cls, text: str) -> SpiffeIdPattern:
        """Parse ``spiffe://td/path`` or ``spiffe://td/path/*`` (``spiffe://td/*``: all of td)."""
        subtree = text.endswith("/*")
        base_text = text[:-2] if subtree else text
        base = SpiffeId.parse(base_text)
        if base.is_root and not subtree:
            raise SpiffeIdError(
                f"pattern {text!r} names a trust domain, not a workload; "
                "use spiffe://<td>/* for every workload of it",
                reason="spiffe_id.root_pattern",
            )
        return cls(base, subtree)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        """True when ``spiffe_id`` is the pattern's ID (exact) or strictly below it (subtree)."""
        if spiffe_id.trust_domain != self.base.trust_domain:
            return False
        if not self.subtree:
            return spiffe_id.path == self.base.path
        return spiffe_id.path.startswith(self.base.path + "/")

    def __str__(self) -> str:
        return f"{self.base}/*" if self.subtree else str(self.base)


@dataclass(frozen=True, slots=True)
class WorkloadRule:
    """Workloads matching ``pattern`` get ``roles``."""

    pattern: SpiffeIdPattern
    roles: frozenset[Role]


@dataclass(frozen=True, slots=True)
class HumanRule:
    """People from ``issuer`` whose claim ``claim`` equals (or, for a list, contains) ``value``."""

    issuer: str
    claim: str
    value: str
    roles: frozenset[Role]

    def matches(self, human: HumanIdentity, claims: Mapping[str, Any]) -> bool:
        """True when the token came from this rule's issuer and carries the claim value."""
        if human.issuer != self.issuer:
            return False
        found = claims.get(self.claim)
        if isinstance(found, str):
            return found == self.value
        if isinstance(found, list):
            return self.value in [v for v in found if isinstance(v, str)]
        return False


@dataclass(frozen=True, slots=True)
class RoleMap:
    """All role rules, parsed once at start-up."""

    workload_rules: tuple[WorkloadRule, ...]
    human_rules: tuple[HumanRule, ...]

    def roles_for_workload(self, identity: WorkloadIdentity) -> frozenset[Role]:
        """The union of the roles of every rule the workload's SPIFFE ID matches."""
        return _union(r.roles for r in self.workload_rules if r.pattern.matches(identity.spiffe_id))

    def roles_for_human(self, human: HumanIdentity, claims: Mapping[str, Any]) -> frozenset[Role]:
        """The union of the roles of every rule the person's verified claims match."""
        return _union(r.roles for r in self.human_rules if r.matches(human, claims))


def _union(sets: Iterable[frozenset[Role]]) -> frozenset[Role]:
    result: frozenset[Role] = frozenset()
    for roles in sets:
        result |= roles
    return result


def parse_role_map(data: Mapping[str, Any]) -> RoleMap:
    """Build a :class:`RoleMap` from the parsed ``identities.toml``; errors name the entry."""
    unknown = set(data) - {"workload", "human", "oidc_issuer"}
    if unknown:
        raise ConfigurationError(f"identities: unknown section(s) {sorted(unknown)}")
    workload_rules = []
    for index, entry in enumerate(data.get("workload", [])):
        where = f"identities: workload[{index}]"
        _only_keys(entry, {"pattern", "roles"}, where)
        try:
            pattern = SpiffeIdPattern.parse(str(entry.get("pattern", "")))
        except SpiffeIdError as exc:
            raise ConfigurationError(f"{where}.pattern: {exc.detail}") from None
        workload_rules.append(WorkloadRule(pattern, _roles(entry, where)))
    human_rules = []
    for index, entry in enumerate(data.get("human", [])):
        where = f"identities: human[{index}]"
        _only_keys(entry, {"issuer", "claim", "value", "roles"}, where)
        for key in ("issuer", "claim", "value"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigurationError(f"{where}.{key} must be a non-empty string")
        human_rules.append(
            HumanRule(entry["issuer"], entry["claim"], entry["value"], _roles(entry, where))
        )
    return RoleMap(tuple(workload_rules), tuple(human_rules))


def _only_keys(entry: Any, allowed: set[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where} must be a table")
    extra = set(entry) - allowed
    if extra:
        raise ConfigurationError(
            f"{where}: unknown key(s) {sorted(extra)}; allowed {sorted(allowed)}"
        )


def _roles(entry: Mapping[str, Any], where: str) -> frozenset[Role]:
    raw = entry.get("roles")
    if not isinstance(raw, list) or not raw:
        raise ConfigurationError(f"{where}.roles must be a non-empty list")
    try:
        return frozenset(Role(r) for r in raw)
    except ValueError:
        raise ConfigurationError(
            f"{where}.roles: {raw!r} has an unknown role; known: {[r.value for r in Role]}"
        ) from None
