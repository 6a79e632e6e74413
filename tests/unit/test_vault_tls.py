"""The connection to OpenBao: ``vault.addr`` must be TLS beyond loopback, ``vault.ca_file`` is
the one CA the broker's session and minting trust, and a TLS failure says what OpenSSL said.
Handshakes with the dev stack's real HTTPS listener are in tests/integration/test_vault_tls.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from broker.adapters.tls import failure_code
from broker.adapters.vault import HvacVault, openbao_tls_context, system_roots
from broker.adapters.vault_http import VaultHttp
from broker.config import VaultSettings
from broker.devstack import DEV_TLS_CA, write_dev_tls
from broker.errors import ConfigurationError


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    write_dev_tls(tmp_path / "tls")
    return tmp_path / "tls" / DEV_TLS_CA


@pytest.mark.parametrize(
    "addr",
    [
        "https://openbao.example.org:8200",
        "https://10.0.0.5:8200",
        "http://127.0.0.1:8200",
        "http://localhost:8200",
        "http://[::1]:8200",
    ],
)
def test_tls_or_loopback_addresses_are_accepted(addr: str) -> None:
    settings = VaultSettings(addr=addr)
    assert settings.plain_http_off_loopback is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"addr": "http://openbao.example.org:8200"}, r"not a loopback address.*https://"),
        ({"addr": "http://10.0.0.5:8200"}, r"'10\.0\.0\.5', which is not a loopback"),
        ({"addr": "ftp://openbao.example.org"}, r"must be https://host\[:port\]"),
        ({"addr": "openbao.example.org:8200"}, r"must be https://host\[:port\]"),
        ({"addr": "https://"}, r"must be https://host\[:port\]"),
        (
            {"addr": "http://127.0.0.1:8200", "ca_file": "/etc/ca.pem"},
            r"vault\.ca_file is set, but vault\.addr is http://",
        ),
    ],
)
def test_addresses_that_are_not_tls_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        VaultSettings.model_validate(values)


def test_plain_http_beyond_loopback_needs_the_insecure_setting() -> None:
    settings = VaultSettings(addr="http://openbao.internal:8200", insecure_allow_plain_http=True)
    assert settings.plain_http_off_loopback is True


def test_no_ca_file_means_the_system_roots_for_both_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = VaultSettings(addr="https://openbao.example.org")
    assert openbao_tls_context(settings) is None  # aiohttp: ssl.create_default_context()
    bundle = tmp_path / "system-roots.pem"
    bundle.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # where OpenSSL looks, as aiohttp does
    assert system_roots() == str(bundle)
    vault = HvacVault(settings=settings, jwt_svid=None, now=lambda: None)  # type: ignore[arg-type,return-value]
    assert vault.client.session.verify == str(bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "absent.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert system_roots() == str(tmp_path)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "absent"))
    assert system_roots() is True


def test_the_ca_file_is_trusted_alone(ca_file: Path) -> None:
    context = openbao_tls_context(VaultSettings(addr="https://h:8200", ca_file=str(ca_file)))
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.cert_store_stats()["x509_ca"] == 1


@pytest.mark.parametrize("defect", ["missing", "not PEM"])
def test_a_ca_file_that_does_not_load_stops_start_up(tmp_path: Path, defect: str) -> None:
    path = tmp_path / "ca.pem"
    if defect == "not PEM":
        path.write_text("not a certificate\n")
    settings = VaultSettings(addr="https://h:8200", ca_file=str(path))
    with pytest.raises(ConfigurationError, match=r"vault\.ca_file .*could not be loaded"):
        HvacVault(settings=settings, jwt_svid=None, now=lambda: None)  # type: ignore[arg-type,return-value]


async def test_the_session_and_minting_use_the_ca_file(ca_file: Path) -> None:
    settings = VaultSettings(addr="https://127.0.0.1:8200", ca_file=str(ca_file))
    vault = HvacVault(settings=settings, jwt_svid=None, now=lambda: None)  # type: ignore[arg-type,return-value]
    assert vault.client.session.verify == str(ca_file)  # hvac (requests) reads the file
    http = VaultHttp(
        addr=settings.addr, timeout_seconds=1, broker_token=lambda: None, tls=vault.tls
    )
    try:
        session = http._client()
        connector = session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector._ssl is vault.tls
    finally:
        await http.close()


def test_a_tls_failure_names_what_openssl_said() -> None:
    handshake = ssl.SSLCertVerificationError(1, "certificate verify failed")
    handshake.reason = "CERTIFICATE_VERIFY_FAILED"
    handshake.verify_message = "self-signed certificate in certificate chain"
    try:
        try:
            raise handshake
        except OSError as exc:
            raise aiohttp.ClientConnectionError("cannot connect") from exc
    except aiohttp.ClientConnectionError as wrapped:
        code = failure_code(wrapped)
    assert code == (
        "ClientConnectionError, TLS CERTIFICATE_VERIFY_FAILED: "
        "self-signed certificate in certificate chain"
    )
    assert failure_code(TimeoutError()) == "TimeoutError"


def test_a_library_error_that_is_an_ssl_error_without_a_reason_is_looked_through() -> None:
    """aiohttp's certificate error subclasses ssl.SSLError but carries no reason: the one it
    chains does."""
    handshake = ssl.SSLCertVerificationError(1, "certificate verify failed")
    handshake.reason = "CERTIFICATE_VERIFY_FAILED"
    handshake.verify_message = "Hostname mismatch, certificate is not valid for 'localhost'."
    key = aiohttp.client_reqrep.ConnectionKey("localhost", 8200, True, True, None, None, None)
    try:
        try:
            raise handshake
        except ssl.SSLCertVerificationError as exc:
            raise aiohttp.ClientConnectorCertificateError(key, exc) from exc
    except aiohttp.ClientConnectorCertificateError as wrapped:
        code = failure_code(wrapped)
    assert code == (
        "ClientConnectorCertificateError, TLS CERTIFICATE_VERIFY_FAILED: "
        "Hostname mismatch, certificate is not valid for 'localhost'."
    )
