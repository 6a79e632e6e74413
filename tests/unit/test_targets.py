"""The targets catalog: config/targets.toml parses into Targets; each bad key is named."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.config_files import load_target_catalog
from broker.core.model import Sensitivity, Target, TargetKind
from broker.core.targets import parse_target_catalog
from broker.errors import ConfigurationError


def entry(**changes: Any) -> dict[str, Any]:
    """A valid database target with ``changes`` applied (``None`` removes a key)."""
    base: dict[str, Any] = {
        "name": "db",
        "kind": "database",
        "mount": "database",
        "role": "readonly",
        "policies": ["target-db"],
        "system": "pg",
        "environment": "dev",
        "sensitivity": "internal",
        "max_ttl": "15m",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def test_the_shipped_catalog_loads() -> None:
    catalog = load_target_catalog(Path("config/targets.toml"))
    assert list(catalog) == ["demo-db", "demo-cert", "demo-ssh", "demo-kv", "legacy-crm", "prod-db"]
    assert catalog["demo-db"] == Target(
        name="demo-db",
        kind=TargetKind.DATABASE,
        policies=("target-demo-db",),
        system="demo-postgres",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=15),
        mount="database",
        role="demo-readonly",
        description="read-only role on the demo PostgreSQL database",
    )
    summary = {
        name: (t.kind, t.sensitivity, t.max_ttl, t.revocable, dict(t.params))
        for name, t in catalog.items()
    }
    assert summary == {
        "demo-db": (TargetKind.DATABASE, Sensitivity.INTERNAL, timedelta(minutes=15), True, {}),
        "demo-cert": (
            TargetKind.PKI,
            Sensitivity.CONFIDENTIAL,
            timedelta(minutes=10),
            True,
            {"domain": "agents.tasklease.test"},
        ),
        "demo-ssh": (
            TargetKind.SSH,
            Sensitivity.INTERNAL,
            timedelta(minutes=5),
            False,
            {"valid_principals": "demo"},
        ),
        "demo-kv": (TargetKind.VAULT_TOKEN, Sensitivity.PUBLIC, timedelta(minutes=10), True, {}),
        "legacy-crm": (
            TargetKind.VAULT_TOKEN,
            Sensitivity.INTERNAL,
            timedelta(minutes=15),
            True,
            {},
        ),
        "prod-db": (TargetKind.DATABASE, Sensitivity.RESTRICTED, timedelta(minutes=15), True, {}),
    }
    assert (catalog["prod-db"].environment, catalog["prod-db"].role) == (
        "production",
        "demo-readonly",
    )
    assert [name for name, t in catalog.items() if t.legacy] == ["legacy-crm"]


@pytest.mark.parametrize(
    ("max_ttl", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(minutes=90)),
        ("1h0m5s", timedelta(hours=1, seconds=5)),
        ("24h", timedelta(hours=24)),
    ],
)
def test_durations(max_ttl: str, expected: timedelta) -> None:
    catalog = parse_target_catalog({"target": [entry(max_ttl=max_ttl)]})
    assert expected == catalog["db"].max_ttl


def test_optional_keys_and_kind_parameters() -> None:
    catalog = parse_target_catalog(
        {
            "target": [
                # A legacy target's policies are its own (the others share target-db).
                entry(legacy=True, description="old static secret", policies=["legacy-db"]),
                entry(name="capped", max_live_per_identity=2),
                entry(
                    name="kv",
                    kind="vault-token",
                    mount=None,
                    role=None,
                    sensitivity="public",
                ),
                entry(
                    name="ssh",
                    kind="ssh",
                    revocable=False,
                    params={"valid_principals": "deploy,demo"},
                ),
                entry(name="pki", kind="pki", params={"domain": "agents.example.org"}),
            ]
        }
    )
    assert (catalog["db"].legacy, catalog["db"].description) == (True, "old static secret")
    assert catalog["db"].max_live_per_identity == 0  # no per-target cap unless configured
    assert (catalog["kv"].mount, catalog["kv"].role) == ("", "")
    assert catalog["ssh"].params == {"valid_principals": "deploy,demo"}
    assert catalog["pki"].params == {"domain": "agents.example.org"}
    assert catalog["capped"].max_live_per_identity == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"no \[\[target\]\] tables"),
        ({"target": []}, r"no \[\[target\]\] tables"),
        ({"targets": [entry()]}, r"unknown top-level key\(s\) \['targets'\]"),
        ({"target": ["db"]}, r"target\[0\] must be a table"),
        ({"target": [entry(), entry()]}, r"target\[1\]\.name: 'db' is defined twice"),
        ({"target": [entry(name=None)]}, r"target\[0\]: missing key\(s\) \['name'\]"),
        ({"target": [entry(max_ttl=None)]}, r"\('db'\): missing key\(s\) \['max_ttl'\]"),
        ({"target": [entry(ttl="5m")]}, r"\('db'\): unknown key\(s\) \['ttl'\]"),
        ({"target": [entry(name="a b")]}, r"\.name must be 1-128 characters"),
        ({"target": [entry(kind="ldap")]}, r"\('db'\)\.kind must be one of .*'ldap'"),
        ({"target": [entry(sensitivity="secret")]}, r"\('db'\)\.sensitivity must be one of"),
        ({"target": [entry(environment="Production")]}, r"\('db'\)\.environment must be a lower"),
        ({"target": [entry(system="")]}, r"\('db'\)\.system must be a lowercase"),
        ({"target": [entry(policies=[])]}, r"\('db'\)\.policies must be a non-empty list"),
        ({"target": [entry(policies="target-db")]}, r"\('db'\)\.policies must be a non-empty"),
        ({"target": [entry(policies=["a/b"])]}, r"\('db'\)\.policies must be a non-empty"),
        ({"target": [entry(policies=["root"])]}, r"\('db'\)\.policies: .* never .* root"),
        ({"target": [entry(policies=["a", "a"])]}, r"\('db'\)\.policies lists a policy twice"),
        ({"target": [entry(max_ttl=900)]}, r"\('db'\)\.max_ttl must be a duration"),
        ({"target": [entry(max_ttl="15 min")]}, r"\('db'\)\.max_ttl must be a duration"),
        ({"target": [entry(max_ttl="")]}, r"\('db'\)\.max_ttl must be a duration"),
        ({"target": [entry(max_ttl="0s")]}, r"\('db'\)\.max_ttl must be more than 0"),
        ({"target": [entry(max_ttl="25h")]}, r"\('db'\)\.max_ttl must be .* at most 24h"),
        ({"target": [entry(revocable="no")]}, r"\('db'\)\.revocable must be true or false"),
        ({"target": [entry(legacy=1)]}, r"\('db'\)\.legacy must be true or false"),
        (
            {"target": [entry(legacy=True), entry(name="db2", policies=["x", "target-db"])]},
            r"legacy target 'db' shares Vault policies \['target-db'\] with target 'db2'",
        ),
        (
            {"target": [entry(), entry(name="old", legacy=True)]},
            r"legacy target 'old' shares Vault policies \['target-db'\] with target 'db'",
        ),
        ({"target": [entry(description="a\nb")]}, r"\('db'\)\.description must be printable"),
        ({"target": [entry(max_live_per_identity=-1)]}, r"\.max_live_per_identity must be an int"),
        ({"target": [entry(max_live_per_identity=True)]}, r"\.max_live_per_identity must be"),
        ({"target": [entry(max_live_per_identity="2")]}, r"\.max_live_per_identity must be"),
        ({"target": [entry(max_live_per_identity=10**7)]}, r"\.max_live_per_identity must be"),
        ({"target": [entry(mount=None)]}, r"\('db'\): missing key 'mount'"),
        ({"target": [entry(role="a/b")]}, r"\('db'\)\.role must be a Vault role name"),
        (
            {"target": [entry(kind="vault-token", role=None)]},
            r"\('db'\)\.mount: a vault-token target has no mount",
        ),
        (
            {"target": [entry(kind="ssh", params={"valid_principals": "demo"})]},
            r"\('db'\)\.revocable: an ssh certificate cannot be revoked",
        ),
        ({"target": [entry(params="x")]}, r"\('db'\)\.params must be a table"),
        (
            {"target": [entry(params={"domain": "x.test"})]},
            r"\('db'\)\.params\.domain: not a parameter of kind database",
        ),
        (
            {"target": [entry(kind="pki", params={"domain": "Agents..test"})]},
            r"\('db'\)\.params\.domain must be a lowercase DNS name",
        ),
        (
            {"target": [entry(kind="ssh", revocable=False, params={"valid_principals": "a b"})]},
            r"\('db'\)\.params\.valid_principals must be comma-separated",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_bad_catalog_names_the_entry_and_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_target_catalog(data)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "targets.toml"
    path.write_text("[[target]\n")
    with pytest.raises(ConfigurationError, match=r"targets\.toml.*cannot be read: TOMLDecodeError"):
        load_target_catalog(path)
