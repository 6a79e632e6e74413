"""Settings: TOML file, environment overrides, and errors that name the bad key."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from broker.bootstrap import run_on_event_loop, running_loop_name
from broker.config import load_settings
from broker.errors import ConfigurationError


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("TASKLEASE_"):
            monkeypatch.delenv(key)
    path = tmp_path / "broker.toml"
    path.write_text('[vault]\naddr = "https://vault.example:8200"\n[server]\nport = 9443\n')
    monkeypatch.setenv("TASKLEASE_CONFIG", str(path))
    return path


def test_the_file_is_read(config_file: Path) -> None:
    settings = load_settings()
    assert (settings.vault.addr, settings.server.port) == ("https://vault.example:8200", 9443)


def test_environment_overrides_the_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEASE_SERVER__PORT", "10443")
    assert load_settings().server.port == 10443


def test_a_bad_value_names_the_key_and_its_variable(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEASE_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigurationError, match=r"server\.port \(TASKLEASE_SERVER__PORT\)"):
        load_settings()


def test_an_unknown_key_in_the_file_stops_start_up(config_file: Path) -> None:
    config_file.write_text("[vault]\nadress = 'typo'\n")
    with pytest.raises(ConfigurationError, match=r"vault\.adress"):
        load_settings()


def test_an_empty_jwt_audience_refuses_to_start(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKLEASE_SPIFFE__JWT_AUDIENCE", "  ")
    with pytest.raises(ConfigurationError, match=r"spiffe\.jwt_audience.*must not be empty"):
        load_settings()


def test_token_auth_needs_a_token(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEASE_VAULT__AUTH_METHOD", "token")
    with pytest.raises(ConfigurationError, match="TASKLEASE_VAULT__TOKEN"):
        load_settings()


def test_secrets_are_never_shown(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEASE_REDIS__URL", "redis://:hunter2-secret@127.0.0.1:6379/0")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())


def test_a_missing_named_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLEASE_CONFIG", "/nonexistent/broker.toml")
    with pytest.raises(ConfigurationError, match="not a readable file"):
        load_settings()


def test_invalid_toml_is_a_configuration_error(config_file: Path) -> None:
    config_file.write_text("[vault\n")
    with pytest.raises(ConfigurationError, match="cannot read the configuration file"):
        load_settings()


def test_the_event_loop_is_uvloop_unless_configured_otherwise(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().server.event_loop == "uvloop"
    monkeypatch.setenv("TASKLEASE_SERVER__EVENT_LOOP", "asyncio")
    assert load_settings().server.event_loop == "asyncio"
    monkeypatch.setenv("TASKLEASE_SERVER__EVENT_LOOP", "trio")
    with pytest.raises(ConfigurationError, match=r"server\.event_loop"):
        load_settings()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_run_on_event_loop_runs_on_the_named_loop(event_loop: str) -> None:
    async def main() -> tuple[str, str]:
        return running_loop_name(), type(asyncio.get_running_loop()).__module__

    name, module = run_on_event_loop(main(), event_loop)
    assert name == event_loop
    assert module.split(".")[0] == event_loop


def test_the_live_credential_limit_is_on_by_default_and_bounded(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().issuance.live_credentials_per_identity == 500
    assert load_settings().issuance.credentials_per_identity_per_minute == 600
    monkeypatch.setenv("TASKLEASE_ISSUANCE__LIVE_CREDENTIALS_PER_IDENTITY", "0")
    assert load_settings().issuance.live_credentials_per_identity == 0  # off
    monkeypatch.setenv("TASKLEASE_ISSUANCE__LIVE_CREDENTIALS_PER_IDENTITY", "-1")
    with pytest.raises(ConfigurationError, match=r"issuance\.live_credentials_per_identity"):
        load_settings()
