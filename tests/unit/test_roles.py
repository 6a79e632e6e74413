"""Role mapping from identities.toml: SPIFFE ID patterns and OIDC claims."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.core.identity import AuthMethod, HumanIdentity, WorkloadIdentity
from broker.core.roles import Role, SpiffeIdPattern, parse_role_map
from broker.core.spiffe_id import SpiffeId
from broker.errors import ConfigurationError, SpiffeIdError

EXPIRY = datetime(2030, 1, 1, tzinfo=UTC)


def workload(text: str) -> WorkloadIdentity:
    return WorkloadIdentity(SpiffeId.parse(text), EXPIRY, AuthMethod.X509_SVID)


@pytest.mark.parametrize(
    ("pattern", "candidate", "expected"),
    [
        ("spiffe://a.test/agents/*", "spiffe://a.test/agents/x", True),
        ("spiffe://a.test/agents/*", "spiffe://a.test/agents/x/y", True),
        ("spiffe://a.test/agents/*", "spiffe://a.test/agents", False),
        ("spiffe://a.test/agents/*", "spiffe://a.test/agents-evil/x", False),
        ("spiffe://a.test/agents/*", "spiffe://b.test/agents/x", False),
        ("spiffe://a.test/agents/x", "spiffe://a.test/agents/x", True),
        ("spiffe://a.test/agents/x", "spiffe://a.test/agents/x/y", False),
        ("spiffe://a.test/*", "spiffe://a.test/anything", True),
    ],
)
def test_pattern_matching(pattern: str, candidate: str, expected: bool) -> None:
    assert SpiffeIdPattern.parse(pattern).matches(SpiffeId.parse(candidate)) is expected


@pytest.mark.parametrize(
    "pattern", ["spiffe://a.test", "spiffe://a.test/x/**", "spiffe://a.test/x*", "a.test/x"]
)
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeIdPattern.parse(pattern)


def test_shipped_identities_file_maps_the_demo_workloads() -> None:
    data = tomllib.loads(Path("config/identities.toml").read_text())
    roles = parse_role_map(data)
    assert roles.roles_for_workload(workload("spiffe://tasklease.test/agent/demo")) == {Role.AGENT}
    assert roles.roles_for_workload(workload("spiffe://tasklease.test/admin/demo")) == {Role.ADMIN}
    assert roles.roles_for_workload(workload("spiffe://tasklease.test/unknown/x")) == frozenset()
    assert roles.roles_for_workload(workload("spiffe://other.test/agent/demo")) == frozenset()


def test_human_rules_match_issuer_and_claim_value_or_list_member() -> None:
    roles = parse_role_map(
        {
            "human": [
                {
                    "issuer": "https://idp.test",
                    "claim": "groups",
                    "value": "sec",
                    "roles": ["admin", "approver"],
                },
                {
                    "issuer": "https://idp.test",
                    "claim": "email",
                    "value": "bob@x.test",
                    "roles": ["approver"],
                },
            ]
        }
    )
    alice = HumanIdentity("https://idp.test", "u1", "alice", EXPIRY)
    assert roles.roles_for_human(alice, {"groups": ["dev", "sec"]}) == {Role.ADMIN, Role.APPROVER}
    assert roles.roles_for_human(alice, {"groups": "sec"}) == {Role.ADMIN, Role.APPROVER}
    assert roles.roles_for_human(alice, {"email": "bob@x.test"}) == {Role.APPROVER}
    assert roles.roles_for_human(alice, {"groups": [{"sec": 1}]}) == frozenset()
    other_issuer = HumanIdentity("https://evil.test", "u1", "alice", EXPIRY)
    assert roles.roles_for_human(other_issuer, {"groups": ["sec"]}) == frozenset()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workloads": []}, "unknown section"),
        ({"workload": [{"pattern": "spiffe://a.test/x", "roles": []}]}, r"workload\[0\]\.roles"),
        ({"workload": [{"pattern": "spiffe://a.test/x", "roles": ["root"]}]}, "unknown role"),
        ({"workload": [{"pattern": "spiffe://A.test/x", "roles": ["agent"]}]}, "pattern"),
        (
            {"workload": [{"pattern": "spiffe://a.test/x", "roles": ["agent"], "x": 1}]},
            "unknown key",
        ),
        ({"human": [{"issuer": "", "claim": "g", "value": "v", "roles": ["admin"]}]}, "issuer"),
    ],
)
def test_bad_identities_file_names_the_entry(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_role_map(data)
