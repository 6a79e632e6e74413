"""The log scanner finds planted secrets and stays quiet on clean logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.secret_scan import scan_paths, scan_text

CLEAN = (
    '{"event": "vault.session", "accessor": "hkb0xrKu4ciE6GTfmAYBxf7A", "policies": ["default"]}\n'
    '{"event": "identity.rejected", "reason": "jwt.aud_mismatch", "kid": "abc\\\\n"}\n'
    "2026-11-29T18:30:53.177Z [INFO]  core: root token generated\n"
)


@pytest.mark.parametrize(
    ("planted", "kind"),
    [
        ("-----BEGIN PRIVATE KEY-----", "private key"),
        ("-----BEGIN EC PRIVATE KEY-----", "private key"),
        ("token=eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJlc2lnbmF0dXJl", "whole JWT"),
        ("X-Vault-Token: s.AbCdEfGhIjKlMnOpQrStUvWx12", "vault token"),
        ("hvs.CAESIJ1234567890abcdefghijklmnop", "vault token"),
        ("redis://:hunter2hunter2@127.0.0.1:6379/0", "password in URL"),
    ],
)
def test_planted_secret_shapes_are_found(planted: str, kind: str, tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    log.write_text(CLEAN + f'{{"event": "oops", "value": "{planted}"}}\n')
    findings = scan_paths([tmp_path])
    assert [(f.path, f.line, f.kind) for f in findings] == [(log, 4, kind)]


def test_a_known_secret_value_is_found_wherever_it_appears(tmp_path: Path) -> None:
    findings = scan_text(
        CLEAN + "password was Zq9-known-value\n", path=tmp_path, known=["Zq9-known-value"]
    )
    assert [(f.line, f.kind) for f in findings] == [(4, "known secret #0")]


def test_clean_logs_have_no_findings(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text(CLEAN)
    assert scan_paths([tmp_path], known=["not-in-the-log-123"]) == []
