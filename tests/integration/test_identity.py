"""Workload identity against the running broker and a real SPIRE: mTLS X.509-SVIDs, JWT-SVIDs,
federation, and rejection of everything else with a stable reason."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.bootstrap import RunningBroker
from broker.devstack import DevStack
from tests.conftest import LOG_DIR
from tests.integration.clients import StartBroker, client_context
from tests.jwt_tokens import Signer, bundle_json, ec_key, token, x509_jwk
from tests.pki import make_root, new_key

pytestmark = pytest.mark.stack


async def _get(
    broker: RunningBroker,
    context: ssl.SSLContext,
    path: str = "/v1/whoami",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}{path}", ssl=context, headers=headers or {}) as response,
    ):
        return response.status, await response.json(content_type=None)


def _agent_id(stack: DevStack) -> str:
    return f"spiffe://{stack.trust_domain}/agent/demo"


async def test_spire_x509_svid_over_mtls_is_authenticated(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start()
    status, body = await _get(broker, client_context(stack, tmp_path, _agent_id(stack)))
    assert (status, body["principal"], body["method"], body["roles"]) == (
        200,
        _agent_id(stack),
        "x509-svid",
        ["agent"],
    )


async def test_spire_jwt_svid_bearer_is_authenticated(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start()
    jwt_svid = stack.mint_jwt_svid(_agent_id(stack), audience="tasklease")
    status, body = await _get(
        broker, client_context(stack, tmp_path), headers={"Authorization": f"Bearer {jwt_svid}"}
    )
    assert (status, body["principal"], body["method"]) == (200, _agent_id(stack), "jwt-svid")


async def test_jwt_svid_for_another_audience_is_rejected(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start()
    jwt_svid = stack.mint_jwt_svid(_agent_id(stack), audience="someone-else")
    status, body = await _get(
        broker, client_context(stack, tmp_path), headers={"Authorization": f"Bearer {jwt_svid}"}
    )
    assert (status, body["code"], body["reason"]) == (401, "jwt_svid_rejected", "jwt.aud_mismatch")
    assert jwt_svid not in json.dumps(body)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "auth.missing"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "auth.bad_authorization_header"),
        ({"Authorization": "Bearer not.a.jwt"}, "jwt.bad_base64"),
    ],
)
async def test_missing_or_malformed_credentials_are_401(
    stack: DevStack, start: StartBroker, tmp_path: Path, headers: dict[str, str], reason: str
) -> None:
    broker = await start()
    status, body = await _get(broker, client_context(stack, tmp_path), headers=headers)
    assert (status, body.get("reason")) == (401, reason)
    assert body["type"].endswith(body["code"])


async def test_a_pasted_certificate_is_never_an_identity(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """SECURITY 9: a valid SVID's PEM in a header, without the TLS handshake, proves nothing."""
    broker = await start()
    minted = stack.mint_x509_svid(_agent_id(stack))
    pem = minted["svid"].replace("\n", "")
    headers = {
        "X-Forwarded-Client-Cert": f'Cert="{pem}"',
        "X-SSL-Client-Cert": pem,
        "X-Client-Cert": pem,
    }
    status, body = await _get(broker, client_context(stack, tmp_path), headers=headers)
    assert (status, body["reason"]) == (401, "auth.missing")


async def test_both_a_certificate_and_a_bearer_token_is_ambiguous(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start()
    jwt_svid = stack.mint_jwt_svid(_agent_id(stack), audience="tasklease")
    status, body = await _get(
        broker,
        client_context(stack, tmp_path, _agent_id(stack)),
        headers={"Authorization": f"Bearer {jwt_svid}"},
    )
    assert (status, body["reason"]) == (401, "auth.ambiguous")


async def test_an_identity_without_a_role_is_403(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start()
    stranger = f"spiffe://{stack.trust_domain}/stranger/x"
    status, body = await _get(broker, client_context(stack, tmp_path, stranger))
    assert (status, body["code"], body["reason"]) == (403, "forbidden", "auth.no_role")


class OtherDomain:
    """A second trust domain (a test CA and a JWT key) that SPIRE knows nothing about."""

    def __init__(self, tmp_path: Path) -> None:
        now = datetime.now(UTC)
        self.root = make_root(
            "other.test", not_before=now - timedelta(days=1), not_after=now + timedelta(days=30)
        )
        self.leaf_key = new_key()
        self.agent_id = "spiffe://other.test/agent/remote"
        self.leaf = self.root.leaf(
            self.agent_id, key=self.leaf_key, not_before=now - timedelta(minutes=5)
        )
        self.signer = Signer(kid="other-k1", key=ec_key(label="other"), alg="ES256")
        self.bundle_file = tmp_path / "other.test.bundle.json"
        self.bundle_file.write_bytes(
            bundle_json([x509_jwk(self.root.cert), self.signer.jwk()], sequence=1)
        )
        self.cert_file = tmp_path / "other-svid.pem"
        self.key_file = tmp_path / "other-key.pem"
        self.cert_file.write_bytes(self.leaf.public_bytes(serialization.Encoding.PEM))
        self.key_file.write_bytes(
            self.leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.identities = tmp_path / "identities.toml"
        self.identities.write_text(
            Path("config/identities.toml").read_text()
            + '\n[[workload]]\npattern = "spiffe://other.test/agent/*"\nroles = ["agent"]\n'
        )

    def jwt(self, audience: str = "tasklease") -> str:
        issued = int(time.time())
        return token(
            self.signer,
            sub=self.agent_id,
            claims={"aud": [audience], "iat": issued, "exp": issued + 300},
        )

    def federation_env(self) -> dict[str, str]:
        entry = {"trust_domain": "other.test", "bundle_file": str(self.bundle_file)}
        return {
            "TASKLEASE_SPIFFE__FEDERATION": json.dumps([entry]),
            "TASKLEASE_IDENTITIES_FILE": str(self.identities),
        }


async def test_a_second_trust_domain_is_rejected_until_federated(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    other = OtherDomain(tmp_path)
    plain = client_context(stack, tmp_path)
    mtls = client_context(stack, tmp_path)
    mtls.load_cert_chain(other.cert_file, other.key_file)
    bearer = {"Authorization": f"Bearer {other.jwt()}"}

    broker = await start(TASKLEASE_IDENTITIES_FILE=str(other.identities))
    status, body = await _get(broker, plain, headers=bearer)
    assert (status, body["code"], body["reason"]) == (
        401,
        "untrusted_trust_domain",
        "trust_domain.untrusted",
    )
    # The TLS layer itself refuses a client chain that ends at no trusted root.
    with pytest.raises(aiohttp.ClientError):
        await _get(broker, mtls)
    await broker.stop()

    federated = await start(**other.federation_env())
    status, body = await _get(federated, plain, headers=bearer)
    assert (status, body["principal"], body["trust_domain"]) == (200, other.agent_id, "other.test")
    status, body = await _get(federated, mtls)
    assert (status, body["principal"], body["method"]) == (200, other.agent_id, "x509-svid")


async def test_a_federated_leaf_cannot_claim_the_local_trust_domain(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """A leaf naming tasklease.test but signed by other.test's CA: TLS passes (union of roots),
    the per-trust-domain verification does not."""
    other = OtherDomain(tmp_path)
    now = datetime.now(UTC)
    key = new_key()
    impostor = other.root.leaf(_agent_id(stack), key=key, not_before=now - timedelta(minutes=5))
    (tmp_path / "impostor.pem").write_bytes(impostor.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "impostor-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = client_context(stack, tmp_path)
    context.load_cert_chain(tmp_path / "impostor.pem", tmp_path / "impostor-key.pem")
    broker = await start(**other.federation_env())
    status, body = await _get(broker, context)
    assert (status, body["code"]) == (401, "x509_svid_rejected")


def _server_serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _broker_entry_id(stack: DevStack) -> str:
    out = stack._spire(
        "spire-server",
        "entry",
        "show",
        "-spiffeID",
        stack.endpoints.broker_spiffe_id if stack.endpoints else "",
        "-output",
        "json",
        *stack._server_socket_args(),
    )
    entries = json.loads(out)["entries"]
    assert len(entries) == 1
    return str(entries[0]["id"])


def _set_broker_x509_ttl(stack: DevStack, seconds: int) -> None:
    assert stack.endpoints is not None
    stack._spire(
        "spire-server",
        "entry",
        "update",
        "-entryID",
        _broker_entry_id(stack),
        "-parentID",
        f"spiffe://{stack.trust_domain}/node/local",
        "-spiffeID",
        stack.endpoints.broker_spiffe_id,
        "-selector",
        f"unix:uid:{stack.endpoints.workload_uids['broker']}",
        "-x509SVIDTTL",
        str(seconds),
        "-jwtSVIDTTL",
        "300",
        *stack._server_socket_args(),
    )


async def test_the_broker_keeps_serving_across_its_own_svid_rotation(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """With a short SVID TTL the Workload API rotates the broker's SVID; the listener picks up
    each new certificate without a restart and keeps authenticating clients."""
    broker = await start()
    context = client_context(stack, tmp_path, _agent_id(stack))
    first = await asyncio.to_thread(_server_serial, broker.port, context)
    _set_broker_x509_ttl(stack, 20)
    try:
        deadline = time.monotonic() + 45
        serials = {first}
        while time.monotonic() < deadline and len(serials) < 3:
            serials.add(await asyncio.to_thread(_server_serial, broker.port, context))
            await asyncio.sleep(1)
        # The first change comes from the TTL update, the next from rotation at half-life.
        assert len(serials) >= 3, f"served certificates: {serials}"
        assert broker.runtime.tls.rotations >= 2
        status, body = await _get(broker, context)
        assert (status, body["principal"]) == (200, _agent_id(stack))
    finally:
        _set_broker_x509_ttl(stack, 3600)


async def test_hostile_values_are_logged_as_one_escaped_truncated_line(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """SECURITY 38: CR/LF, ANSI escapes and a long value in an untrusted field (a JWT's kid)
    become one JSON log line with the value escaped and cut to a fixed budget."""
    broker = await start()
    hostile_kid = "evil\r\nlevel=critical fake=1\x1b[31m" + "K" * 5000
    signer = Signer(kid="ok", key=ec_key(label="hostile"), alg="ES256")
    forged = token(signer, header={"kid": hostile_kid}, sub=_agent_id(stack))
    request_id = "hostile-kid-1"
    status, body = await _get(
        broker,
        client_context(stack, tmp_path),
        headers={"Authorization": f"Bearer {forged}", "X-Request-Id": request_id},
    )
    assert (status, body["reason"]) == (401, "jwt.kid_malformed")
    assert "\r" not in body["detail"] and "\x1b" not in body["detail"]
    lines = [
        line
        for line in (LOG_DIR / "broker.jsonl").read_text().splitlines()
        if request_id in line and '"event": "identity.rejected"' in line
    ]
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert "\\r\\n" in event["detail"] and "\\x1b" in event["detail"]
    assert "\r" not in event["detail"] and "\x1b" not in event["detail"]
    assert len(lines[0]) < 2000
    assert forged not in lines[0]


async def test_a_person_with_an_oidc_id_token_from_a_configured_issuer_is_authenticated(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """A human approver/admin: an ID token from a test issuer (JWKS file), claims → roles."""
    issuer = "https://idp.tasklease.test/realms/ops"
    signer = Signer(kid="idp-key-1", key=ec_key(label="idp"), alg="ES256")
    jwks_file = tmp_path / "idp-jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**signer.jwk(), "use": "sig"}]}))
    identities = tmp_path / "identities.toml"
    identities.write_text(
        Path("config/identities.toml").read_text()
        + f'\n[[oidc_issuer]]\nissuer = "{issuer}"\naudience = "tasklease"\n'
        f'algorithms = ["ES256"]\njwks_file = "{jwks_file}"\n'
        f'\n[[human]]\nissuer = "{issuer}"\nclaim = "groups"\nvalue = "security-team"\n'
        'roles = ["admin", "approver"]\n'
    )
    broker = await start(TASKLEASE_IDENTITIES_FILE=str(identities))
    issued = int(time.time())

    def id_token(groups: list[str], audience: str = "tasklease") -> str:
        return token(
            signer,
            sub="user-7",
            claims={
                "iss": issuer,
                "aud": audience,
                "iat": issued,
                "exp": issued + 300,
                "email": "alice@example.test",
                "groups": groups,
            },
        )

    context = client_context(stack, tmp_path)
    status, body = await _get(
        broker, context, headers={"Authorization": f"Bearer {id_token(['security-team'])}"}
    )
    assert (status, body["principal"], body["method"], body["roles"], body["display"]) == (
        200,
        f"oidc:{issuer}#user-7",
        "oidc",
        ["admin", "approver"],
        "alice@example.test",
    )
    status, body = await _get(
        broker, context, headers={"Authorization": f"Bearer {id_token(['developers'])}"}
    )
    assert (status, body["reason"]) == (403, "auth.no_role")
    status, body = await _get(
        broker,
        context,
        headers={"Authorization": f"Bearer {id_token(['security-team'], 'other-app')}"},
    )
    assert (status, body["reason"]) == (401, "oidc.aud_mismatch")
