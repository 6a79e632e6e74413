"""``redis.sentinels`` / ``redis.sentinel_service`` / ``redis.sentinel_password_env``: what
start-up accepts and refuses, and the clients the one factory builds from them. The failover
itself runs on real processes in tests/integration/test_redis_sentinel_failover.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio.sentinel import MasterNotFoundError

from broker.adapters.redis_connection import (
    MAX_CONNECTIONS,
    SentinelMasterRedis,
    WaitingConnectionPool,
    WaitingSentinelConnectionPool,
    redis_client,
)
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings, load_settings
from broker.devstack import free_port
from broker.errors import ConfigurationError, LedgerUnavailableError
from tests.conftest import remember_secret

PASSWORD = remember_secret("master-" + uuid.uuid4().hex)
SENTINEL_PASSWORD = remember_secret("sentinel-" + uuid.uuid4().hex)
SENTINELS = ("10.0.0.5:26379", "10.0.0.6:26379", "[fd00::7]:26380")


def _sentinel_settings(**overrides: Any) -> RedisSettings:
    values: dict[str, Any] = {
        "url": f"redis://:{PASSWORD}@/2",
        "sentinels": SENTINELS,
        "sentinel_service": "tl-ledger",
    }
    values.update(overrides)
    return RedisSettings.model_validate(values)


@pytest.fixture
async def built() -> AsyncIterator[list[Any]]:
    clients: list[Any] = []
    yield clients
    for client in clients:
        await client.aclose()


# --------------------------------------------------------------------------- settings


def test_sentinel_addresses_are_host_port_pairs() -> None:
    settings = _sentinel_settings()
    assert settings.sentinel_addresses == (
        ("10.0.0.5", 26379),
        ("10.0.0.6", 26379),
        ("fd00::7", 26380),
    )


def test_without_sentinels_nothing_changes() -> None:
    settings = RedisSettings()
    assert (settings.sentinels, settings.sentinel_service, settings.sentinel_addresses) == (
        (),
        "",
        (),
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sentinel_service": ""}, r"redis\.sentinels is set but redis\.sentinel_service"),
        ({"sentinel_service": "  "}, r"redis\.sentinels is set but redis\.sentinel_service"),
        ({"sentinels": ()}, r"redis\.sentinel_service is set but redis\.sentinels"),
        (
            {"sentinels": (), "sentinel_service": "", "sentinel_password_env": "X"},
            r"redis\.sentinel_password_env is set but redis\.sentinels",
        ),
        ({"sentinels": ("10.0.0.5",)}, r"'10\.0\.0\.5' is not host:port"),
        ({"sentinels": (":26379",)}, r"is not host:port"),
        ({"sentinels": ("10.0.0.5:0",)}, r"is not host:port"),
        ({"sentinels": ("10.0.0.5:65536",)}, r"is not host:port"),
        ({"sentinels": ("10.0.0.5:port",)}, r"is not host:port"),
        ({"url": "unix:///run/redis.sock"}, r"scheme 'unix'.*redis:// or rediss://"),
    ],
)
def test_bad_sentinel_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        _sentinel_settings(**overrides)
    assert PASSWORD not in str(caught.value)


def test_start_up_names_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TASKLEASE_"):
            monkeypatch.delenv(key)
    config = tmp_path / "broker.toml"
    config.write_text('[redis]\nsentinels = ["127.0.0.1:26379"]\n')
    monkeypatch.setenv("TASKLEASE_CONFIG", str(config))
    with pytest.raises(ConfigurationError, match=r"redis\.sentinel_service is empty"):
        load_settings()
    monkeypatch.setenv("TASKLEASE_REDIS__SENTINEL_SERVICE", "tl-ledger")
    monkeypatch.setenv("TASKLEASE_REDIS__SENTINELS", '["127.0.0.1:26379", "127.0.0.1:26380"]')
    assert load_settings().redis.sentinel_addresses == (
        ("127.0.0.1", 26379),
        ("127.0.0.1", 26380),
    )


# --------------------------------------------------------------------------- the factory


async def test_a_single_redis_gets_the_waiting_pool_on_the_url(built: list[Any]) -> None:
    client = redis_client(RedisSettings(url=f"redis://:{PASSWORD}@10.0.0.9:6380/3"))
    built.append(client)
    pool = client.connection_pool
    assert type(pool) is WaitingConnectionPool
    assert (pool.max_connections, pool.timeout) == (MAX_CONNECTIONS, 2.0)
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("10.0.0.9", 6380, 3)
    assert (kwargs["socket_timeout"], kwargs["password"]) == (2.0, PASSWORD)
    assert PASSWORD not in repr(client)


async def test_sentinels_give_a_master_client_with_the_same_pool_limits(
    built: list[Any],
) -> None:
    environ = {"TL_SENTINEL_PASSWORD": SENTINEL_PASSWORD}
    settings = _sentinel_settings(sentinel_password_env="TL_SENTINEL_PASSWORD")
    client = redis_client(settings, environ=environ)
    built.append(client)
    assert isinstance(client, SentinelMasterRedis)
    pool = client.connection_pool
    assert isinstance(pool, WaitingSentinelConnectionPool)
    assert (pool.service_name, pool.is_master) == ("tl-ledger", True)
    assert (pool.max_connections, pool.timeout) == (MAX_CONNECTIONS, 2.0)
    kwargs = pool.connection_kwargs
    # The master's credentials and database come from the URL; where it is, from Sentinel.
    assert (kwargs["password"], kwargs["db"], "host" in kwargs) == (PASSWORD, 2, False)
    assert client.owned_sentinel is not None
    sentinels = client.owned_sentinel.sentinels
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ] == list(settings.sentinel_addresses)
    assert {s.connection_pool.connection_kwargs["password"] for s in sentinels} == {
        SENTINEL_PASSWORD
    }
    for shown in (repr(client), repr(pool), repr(client.owned_sentinel)):
        assert PASSWORD not in shown
        assert SENTINEL_PASSWORD not in shown


async def test_blocking_reads_have_no_read_timeout(built: list[Any]) -> None:
    client = redis_client(_sentinel_settings(), blocking_reads=True)
    built.append(client)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (None, 2.0)


def test_a_sentinel_password_variable_that_is_not_set_stops_start_up() -> None:
    settings = _sentinel_settings(sentinel_password_env="TL_SENTINEL_PASSWORD")
    with pytest.raises(ConfigurationError, match=r"redis\.sentinel_password_env names"):
        redis_client(settings, environ={"TL_SENTINEL_PASSWORD": ""})


async def test_unreachable_sentinels_are_a_ledger_error_without_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No Sentinel answers (nothing listens on their ports): 503 ``ledger.unreachable``, and
    neither password shows in the error, its cause or the client."""
    monkeypatch.setenv("TL_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    settings = _sentinel_settings(
        sentinels=tuple(f"127.0.0.1:{free_port()}" for _ in range(3)),
        sentinel_password_env="TL_SENTINEL_PASSWORD",
        socket_timeout_seconds=0.5,
    )
    ledger = RedisLedger(settings=settings)
    try:
        # More failures than the pool has connections: a failed connect gives its slot back
        # (else the 65th call would fail with "No connection available." after a wait).
        for _ in range(MAX_CONNECTIONS + 6):
            with pytest.raises(LedgerUnavailableError) as caught:
                await ledger.get_lease("cred_a")
            assert isinstance(caught.value.__cause__, MasterNotFoundError)
    finally:
        await ledger.close()
    assert caught.value.reason == "ledger.unreachable"
    for shown in (str(caught.value), repr(caught.value.__cause__), repr(ledger.client)):
        assert PASSWORD not in shown
        assert SENTINEL_PASSWORD not in shown
