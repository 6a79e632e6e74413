"""The [audit] settings: sensible defaults, the shipped file, and no trail without a durable
sink unless that is asked for by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.config import load_settings
from broker.errors import ConfigurationError


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("TASKLEASE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_the_shipped_file_and_the_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TASKLEASE_CONFIG", str(Path("config/broker.toml").resolve()))
    audit = load_settings().audit
    assert (audit.stdout.enabled, audit.stdout.durable) == (True, False)
    assert (audit.file.path, audit.file.durable, audit.file.fsync) == ("", True, "batch")
    assert (audit.redis.enabled, audit.redis.durable, audit.redis.stream) == (
        True,
        True,
        "tl:audit",
    )
    assert audit.redis.maxlen == 0


def test_environment_sets_the_file_sink(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("TASKLEASE_AUDIT__FILE__PATH", str(tmp_path / "audit.jsonl"))
    clean_env.setenv("TASKLEASE_AUDIT__FILE__FSYNC", "always")
    audit = load_settings().audit
    assert (audit.file.path, audit.file.fsync) == (str(tmp_path / "audit.jsonl"), "always")


def test_no_durable_sink_refuses_to_start_unless_asked_for(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("TASKLEASE_AUDIT__REDIS__DURABLE", "false")
    with pytest.raises(ConfigurationError, match="no durable audit sink"):
        load_settings()
    clean_env.setenv("TASKLEASE_AUDIT__INSECURE_ALLOW_NO_DURABLE_SINK", "true")
    assert load_settings().audit.insecure_allow_no_durable_sink


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("TASKLEASE_AUDIT__FILE__FSYNC", "sometimes", r"audit\.file\.fsync"),
        ("TASKLEASE_AUDIT__REDIS__STREAM", "tl audit", r"audit\.redis\.stream"),
        ("TASKLEASE_AUDIT__WRITER_ID", "host\nevil", r"audit\.writer_id"),
        ("TASKLEASE_AUDIT__BATCH_MAX", "0", r"audit\.batch_max"),
        ("TASKLEASE_AUDIT__RECORD_TIMEOUT_SECONDS", "0", r"audit\.record_timeout_seconds"),
    ],
)
def test_bad_audit_settings_name_the_key(
    clean_env: pytest.MonkeyPatch, variable: str, value: str, key: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=key):
        load_settings()
