"""TLS to Redis (``rediss://`` and ``redis.tls_*``): what start-up accepts and refuses, the
one TLS context every connection uses and how it follows rotated files, and the clients the
factory builds. Handshakes with real TLS servers, Sentinels included, are in
tests/integration/test_redis_tls.py."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from pydantic import ValidationError
from structlog.testing import capture_logs

from broker.adapters.redis_common import redis_error_code
from broker.adapters.redis_connection import (
    RedisTLS,
    SentinelMasterRedis,
    SentinelTLSConnection,
    TLSConnection,
    redis_client,
)
from broker.config import RedisSettings
from broker.errors import ConfigurationError
from tests.conftest import remember_secret
from tests.pki import new_key
from tests.redis_tls import RedisTLSFiles, issue, key_pem, new_authority, write_redis_tls_files

PASSWORD = remember_secret("master-" + uuid.uuid4().hex)


@pytest.fixture
def files(tmp_path: Path) -> RedisTLSFiles:
    return write_redis_tls_files(tmp_path / "pki")


@pytest.fixture
async def built() -> AsyncIterator[list[Any]]:
    clients: list[Any] = []
    yield clients
    for client in clients:
        await client.aclose()


def _tls_settings(files: RedisTLSFiles, **overrides: Any) -> RedisSettings:
    values: dict[str, Any] = {
        "url": f"rediss://:{PASSWORD}@127.0.0.1:6380/0",
        "tls_ca_file": str(files.ca),
        "tls_cert_file": str(files.client_cert),
        "tls_key_file": str(files.client_key),
    }
    values.update(overrides)
    return RedisSettings.model_validate(values)


# --------------------------------------------------------------------------- settings


def test_rediss_means_tls_and_redis_does_not() -> None:
    assert RedisSettings(url="rediss://redis.internal:6380/0").tls is True
    assert RedisSettings(url="redis://127.0.0.1:6379/0").tls is False


def test_rediss_through_sentinel_is_accepted(files: RedisTLSFiles) -> None:
    settings = _tls_settings(
        files, url=f"rediss://:{PASSWORD}@/0", sentinels=("10.0.0.5:26379",), sentinel_service="m"
    )
    assert settings.tls


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url": "redis://127.0.0.1:6379/0"}, r"redis\.tls_ca_file.*redis://, which is not TLS"),
        (
            {"url": "redis://127.0.0.1:6379/0", "tls_ca_file": ""},
            r"redis\.tls_cert_file, redis\.tls_key_file set.*use rediss://",
        ),
        ({"tls_key_file": ""}, r"both redis\.tls_cert_file and redis\.tls_key_file"),
        ({"tls_cert_file": ""}, r"both redis\.tls_cert_file and redis\.tls_key_file"),
        (
            {"url": f"rediss://:{PASSWORD}@127.0.0.1:6380/0?ssl_cert_reqs=none"},
            r"redis\.url sets ssl_cert_reqs: TLS is configured with redis\.tls_ca_file",
        ),
        (
            {"url": f"rediss://:{PASSWORD}@h:1/0?ssl_check_hostname=false&ssl_ca_certs=/x"},
            r"redis\.url sets ssl_ca_certs, ssl_check_hostname",
        ),
    ],
)
def test_tls_settings_that_do_not_fit_are_refused(
    files: RedisTLSFiles, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        _tls_settings(files, **overrides)
    assert PASSWORD not in str(caught.value)


# --------------------------------------------------------------------------- the context


def test_the_context_trusts_the_configured_ca_only(files: RedisTLSFiles) -> None:
    context = RedisTLS(ca_file=str(files.ca)).get()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    # Not the system roots as well (redis-py's own context would add them).
    assert context.cert_store_stats()["x509_ca"] == 1
    assert [int(str(entry["serialNumber"]), 16) for entry in context.get_ca_certs()] == [
        _ca_serial(files)
    ]


def _ca_serial(files: RedisTLSFiles) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(files.ca.read_bytes()).serial_number


def test_without_a_ca_file_the_system_roots_verify(files: RedisTLSFiles) -> None:
    context = RedisTLS().get()
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


def test_the_same_context_serves_each_connection_until_a_file_changes(
    files: RedisTLSFiles,
) -> None:
    tls = RedisTLS(
        ca_file=str(files.ca), cert_file=str(files.client_cert), key_file=str(files.client_key)
    )
    first = tls.get()
    assert first is tls.get()
    # A rotation writes new files (a new inode, as an atomic rename does, or new contents).
    rotated_cert, rotated_key = issue(new_authority(), files.client_cert.parent, "next", "b")
    rotated_key.replace(files.client_key)
    rotated_cert.replace(files.client_cert)
    second = tls.get()
    assert second is not first
    assert second is tls.get()


def test_a_half_rotated_pair_keeps_the_last_good_context_and_logs_once(
    files: RedisTLSFiles,
) -> None:
    tls = RedisTLS(
        ca_file=str(files.ca), cert_file=str(files.client_cert), key_file=str(files.client_key)
    )
    good = tls.get()
    # The certificate is replaced, its key not yet: they do not match.
    other_cert, _ = issue(new_authority(), files.client_cert.parent, "other", "b")
    other_cert.replace(files.client_cert)
    with capture_logs() as logs:
        assert tls.get() is good
        assert tls.get() is good
    assert [entry["event"] for entry in logs] == ["redis.tls_reload_failed"]
    assert "redis.tls_cert_file" in logs[0]["error"]
    assert files.client_key.read_text() not in logs[0]["error"]


@pytest.mark.parametrize(
    ("defect", "message"),
    [
        ("missing CA", r"No such file or directory: .*missing\.pem"),
        ("CA not PEM", r"SSLError"),
        ("key of another certificate", r"KEY_VALUES_MISMATCH"),
        ("encrypted key", r"SSLError"),
        ("missing key", r"No such file or directory"),
    ],
)
def test_bad_tls_files_stop_start_up_without_their_contents(
    files: RedisTLSFiles, defect: str, message: str
) -> None:
    paths = {"ca_file": str(files.ca), "cert_file": str(files.client_cert)}
    paths["key_file"] = str(files.client_key)
    secret_key = files.client_key.read_text()
    if defect == "missing CA":
        paths["ca_file"] = str(files.ca.parent / "missing.pem")
    elif defect == "CA not PEM":
        files.ca.write_text("not a certificate\n")
    elif defect == "key of another certificate":
        files.client_key.write_bytes(key_pem(new_key()))
        secret_key = files.client_key.read_text()
    elif defect == "encrypted key":
        files.client_key.write_bytes(key_pem(new_key(), passphrase=b"hunter22"))
        secret_key = files.client_key.read_text()
    else:
        paths["key_file"] = str(files.client_key.parent / "gone-key.pem")
    with pytest.raises(ConfigurationError, match=message) as caught:
        RedisTLS(**paths)
    assert "redis.tls_ca_file, redis.tls_cert_file or redis.tls_key_file" in str(caught.value)
    assert secret_key not in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_the_context_shows_its_files_not_their_contents(files: RedisTLSFiles) -> None:
    tls = RedisTLS(
        ca_file=str(files.ca), cert_file=str(files.client_cert), key_file=str(files.client_key)
    )
    assert str(files.client_key) in repr(tls)
    assert "PRIVATE" not in repr(tls)


def test_a_tls_failure_names_what_openssl_said() -> None:
    handshake = ssl.SSLCertVerificationError(1, "certificate verify failed")
    handshake.reason = "CERTIFICATE_VERIFY_FAILED"
    handshake.verify_message = "unable to get local issuer certificate"
    try:
        try:
            raise handshake
        except OSError as exc:
            raise redis.exceptions.ConnectionError("Error 1 connecting to 10.0.0.9:6380.") from exc
    except redis.exceptions.ConnectionError as wrapped:
        code = redis_error_code(wrapped)
    assert code == (
        "ConnectionError, TLS CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
    )
    assert redis_error_code(redis.exceptions.ConnectionError("refused")) == "ConnectionError"


# --------------------------------------------------------------------------- the factory


async def test_a_single_redis_over_tls_connects_under_the_configured_context(
    files: RedisTLSFiles, built: list[Any]
) -> None:
    client = redis_client(_tls_settings(files))
    built.append(client)
    pool = client.connection_pool
    assert pool.connection_class is TLSConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("127.0.0.1", 6380, PASSWORD)
    connection = pool.make_connection()
    # The hook into redis-py: the context its SSL connection hands to asyncio is ours.
    assert connection._connection_arguments()["ssl"] is kwargs["tls"].get()
    assert PASSWORD not in repr(client)
    assert PASSWORD not in repr(pool)


async def test_through_sentinel_the_master_and_the_sentinels_use_tls(
    files: RedisTLSFiles, built: list[Any]
) -> None:
    settings = _tls_settings(
        files,
        url=f"rediss://:{PASSWORD}@/1",
        sentinels=("10.0.0.5:26379", "10.0.0.6:26379"),
        sentinel_service="tl-ledger",
    )
    client = redis_client(settings)
    built.append(client)
    assert isinstance(client, SentinelMasterRedis)
    pool = client.connection_pool
    assert pool.connection_class is SentinelTLSConnection
    tls = pool.connection_kwargs["tls"]
    assert isinstance(tls, RedisTLS)
    assert client.owned_sentinel is not None
    for node in client.owned_sentinel.sentinels:
        node_pool = node.connection_pool
        assert node_pool.connection_class is TLSConnection
        assert node_pool.connection_kwargs["tls"] is tls
    assert [
        (n.connection_pool.connection_kwargs["host"], n.connection_pool.connection_kwargs["port"])
        for n in client.owned_sentinel.sentinels
    ] == [("10.0.0.5", 26379), ("10.0.0.6", 26379)]


async def test_without_tls_nothing_changes(built: list[Any]) -> None:
    client = redis_client(RedisSettings(url=f"redis://:{PASSWORD}@10.0.0.9:6379/0"))
    built.append(client)
    assert "tls" not in client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "Connection"


def test_a_bad_file_stops_the_factory(files: RedisTLSFiles) -> None:
    files.ca.write_text("")
    with pytest.raises(ConfigurationError, match=r"could not be loaded"):
        redis_client(_tls_settings(files))
