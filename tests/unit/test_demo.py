"""The pieces of ``tasklease demo`` that need no stack: its local OIDC issuer produces ID tokens
the broker's strict verifier accepts and maps to the approver role, and the command is wired."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.core.oidc import OidcVerifier, parse_oidc_issuers, parse_oidc_jwks
from broker.core.roles import Role, RoleMap, parse_role_map
from broker.demo import APPROVER_GROUP, LocalOidcIssuer
from broker.errors import OidcTokenRejectedError

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _verifier_and_roles(identities: Path) -> tuple[OidcVerifier, RoleMap]:
    data = tomllib.loads(identities.read_text())
    issuers = parse_oidc_issuers(data["oidc_issuer"])
    verifier = OidcVerifier(issuers=issuers)
    for config in issuers:
        assert config.jwks_file is not None
        key_set = parse_oidc_jwks(config.issuer, Path(config.jwks_file).read_bytes())
        verifier.install_keys(config.issuer, key_set, fetched_at=NOW)
    return verifier, parse_role_map({k: v for k, v in data.items() if k != "oidc_issuer"})


def test_the_demo_issuer_signs_id_tokens_the_broker_verifies_as_approvers(
    tmp_path: Path,
) -> None:
    issuer = LocalOidcIssuer.generate()
    verifier, roles = _verifier_and_roles(issuer.write_identities(tmp_path))
    human, claims = verifier.verify(issuer.id_token("bob", now=NOW), now=NOW)
    assert (human.subject, human.display, human.groups) == (
        "bob",
        "bob@example.test",
        (APPROVER_GROUP,),
    )
    assert roles.roles_for_human(human, claims) == frozenset({Role.APPROVER})
    assert issuer.principal("bob") == f"oidc:{issuer.issuer}#bob"


def test_the_demo_issuer_keeps_the_repository_identities_and_adds_only_itself(
    tmp_path: Path,
) -> None:
    base = Path("config/identities.toml")
    written = LocalOidcIssuer.generate().write_identities(tmp_path, base=base)
    data = tomllib.loads(written.read_text())
    assert data["workload"] == tomllib.loads(base.read_text())["workload"]
    assert [h["roles"] for h in data["human"]] == [["approver"]]


def test_a_token_of_another_demo_issuer_key_is_rejected(tmp_path: Path) -> None:
    """Each demo run makes its own key: a token signed by another run's key does not verify."""
    issuer = LocalOidcIssuer.generate()
    verifier, _ = _verifier_and_roles(issuer.write_identities(tmp_path))
    stranger = LocalOidcIssuer(
        issuer=issuer.issuer, kid=issuer.kid, key=LocalOidcIssuer.generate().key
    )
    with pytest.raises(OidcTokenRejectedError):
        verifier.verify(stranger.id_token("bob", now=NOW), now=NOW)
    expired = issuer.id_token("bob", now=NOW - timedelta(hours=1))
    with pytest.raises(OidcTokenRejectedError):
        verifier.verify(expired, now=NOW)


def test_the_issuer_repr_shows_no_key() -> None:
    assert "key" not in repr(LocalOidcIssuer.generate()).replace("kid", "")


def test_tasklease_demo_is_a_command_with_help() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    assert "Narrate one workflow run" in result.output
    assert "--logs" in result.output
