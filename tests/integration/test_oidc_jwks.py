"""OIDC JWKS adapter against a real aiohttp HTTPS server on 127.0.0.1 (and real files).

The server presents a certificate from a throwaway CA made here with ``cryptography``; the
client trusts exactly that CA. Each test changes what the server answers and checks what the
verifier then accepts: a refresh installs the key set whole, a failed one keeps the last good.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from broker.adapters.oidc_jwks import OidcJwksSource
from broker.core.oidc import DEFAULT_MAX_JWKS_BYTES, OidcIssuerConfig, OidcVerifier
from broker.devstack import DEV_TLS_CA, write_dev_tls
from broker.errors import ConfigurationError, OidcTokenRejectedError, UnavailableError
from tests.jwt_tokens import NOW, Signer, ec_key, public_jwk, rsa_key, token

ISSUER = "https://idp.example.test/realms/ops"
CLIENT = "tasklease-broker"
T0 = int(NOW.timestamp())
RS = Signer("rs-1", rsa_key(2048, "a"), "RS256")
ES = Signer("es-1", ec_key("P-256", "a"), "ES256")


def jwk(signer: Signer) -> dict[str, object]:
    return {"kid": signer.kid, "use": "sig", **public_jwk(signer.public_key)}


def jwks(*signers: Signer) -> bytes:
    return json.dumps({"keys": [jwk(s) for s in signers]}).encode()


def id_token(signer: Signer) -> str:
    claims = {"iss": ISSUER, "aud": CLIENT, "sub": "u-1", "exp": T0 + 300, "iat": T0}
    return token(signer, claims=claims)


def verifies(verifier: OidcVerifier, signer: Signer) -> str:
    """``"ok"`` when a token signed by ``signer`` verifies, else the rejection reason."""
    try:
        verifier.verify(id_token(signer), now=NOW)
    except (OidcTokenRejectedError, UnavailableError) as exc:
        return exc.reason
    return "ok"


# ---------------------------------------------------------------------------------------------
# A throwaway CA and a server certificate for 127.0.0.1


@dataclass(frozen=True)
class LocalPki:
    ca_pem: str
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    # The dev stack's own maker: a CA and a certificate for 127.0.0.1 valid now (the TLS
    # stack checks dates against the real clock).
    directory = tmp_path_factory.mktemp("oidc-pki")
    cert_file, key_file = write_dev_tls(directory)
    return LocalPki((directory / DEV_TLS_CA).read_text(), cert_file, key_file)


# ---------------------------------------------------------------------------------------------
# The IdP: an HTTPS server whose answers the test sets


@dataclass
class FakeIdp:
    base_url: str = ""
    status: int = 200
    body: bytes = b'{"keys":[]}'
    chunked: bool = False
    delay: float = 0.0
    hits: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    async def jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits["/jwks"] = self.hits.get("/jwks", 0) + 1
        if self.delay:
            # Held until the client gives up, then released at teardown.
            await asyncio.wait_for(self.release.wait(), timeout=self.delay)
        if not self.chunked:
            return web.Response(status=self.status, body=self.body, content_type="application/json")
        response = web.StreamResponse(status=self.status)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(self.body), 4096):
            await response.write(self.body[start : start + 4096])
        await response.write_eof()
        return response

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{self.base_url}/elsewhere")

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.hits["/elsewhere"] = self.hits.get("/elsewhere", 0) + 1
        return web.Response(body=jwks(ES), content_type="application/json")


@pytest.fixture
async def idp(pki: LocalPki) -> AsyncIterator[FakeIdp]:
    fake = FakeIdp()
    app = web.Application()
    app.router.add_get("/jwks", fake.jwks)
    app.router.add_get("/moved", fake.moved)
    app.router.add_get("/elsewhere", fake.elsewhere)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context())
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base_url = f"https://{host}:{port}"
    try:
        yield fake
    finally:
        fake.release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@dataclass
class Clock:
    now: datetime = NOW - timedelta(minutes=1)

    def __call__(self) -> datetime:
        return self.now


def make_source(
    url: str,
    session: aiohttp.ClientSession,
    pki: LocalPki,
    **kwargs: object,
) -> tuple[OidcJwksSource, OidcVerifier]:
    config = OidcIssuerConfig(
        issuer=ISSUER, audience=CLIENT, algorithms=frozenset({"RS256", "ES256"}), jwks_url=url
    )
    verifier = OidcVerifier(issuers=[config])
    options: dict[str, object] = {"ssl_context": pki.client_context(), **kwargs}
    source = OidcJwksSource(
        config=config,
        verifier=verifier,
        now=Clock(),
        session=session,
        **options,  # type: ignore[arg-type]
    )
    return source, verifier


# ---------------------------------------------------------------------------------------------
# URL source


async def test_refresh_installs_keys_and_a_removed_key_stops_verifying(
    idp: FakeIdp, session: aiohttp.ClientSession, pki: LocalPki
) -> None:
    source, verifier = make_source(idp.jwks_url, session, pki)
    idp.body = jwks(RS, ES)
    await source.refresh_once()
    assert (verifies(verifier, RS), verifies(verifier, ES)) == ("ok", "ok")

    idp.body = jwks(RS)
    await source.refresh_once()

    assert (verifies(verifier, RS), verifies(verifier, ES)) == ("ok", "oidc.kid_unknown")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((500, b"oops", False), "oidc_jwks.endpoint_status"),
        ((404, jwks(ES), False), "oidc_jwks.endpoint_status"),
        ((200, b" " * (DEFAULT_MAX_JWKS_BYTES + 1), False), "oidc_jwks.too_large"),
        ((200, b" " * (DEFAULT_MAX_JWKS_BYTES + 1), True), "oidc_jwks.too_large"),
        ((200, b"<html>not json</html>", False), "oidc_jwks.malformed_json"),
        ((200, b'{"keys":[],"keys":[]}', False), "oidc_jwks.duplicate_member"),
    ],
    ids=["500", "404", "oversize-content-length", "oversize-chunked", "not-json", "duplicate"],
)
async def test_failed_refresh_keeps_the_last_good_keys(
    idp: FakeIdp,
    session: aiohttp.ClientSession,
    pki: LocalPki,
    answer: tuple[int, bytes, bool],
    reason: str,
) -> None:
    """``answer`` is what the IdP sends on the second refresh: status, body, chunked."""
    source, verifier = make_source(idp.jwks_url, session, pki)
    idp.body = jwks(RS)
    await source.refresh_once()
    idp.status, idp.body, idp.chunked = answer

    with pytest.raises(UnavailableError) as info:
        await source.refresh_once()

    assert (info.value.reason, verifies(verifier, RS)) == (reason, "ok")


async def test_large_valid_jwks_delivered_in_many_chunks_is_read_whole(
    idp: FakeIdp, session: aiohttp.ClientSession, pki: LocalPki
) -> None:
    """The body arrives in 4 KiB pieces; a single bounded read would see only the first."""
    source, verifier = make_source(idp.jwks_url, session, pki)
    padding = [{"kid": f"enc-{n}", "use": "enc", "kty": "RSA"} for n in range(60)]
    document = {"keys": [*padding, jwk(ES)], "padding": "x" * 60_000}
    idp.body, idp.chunked = json.dumps(document).encode(), True

    key_set = await source.refresh_once()

    assert (
        list(key_set.keys),
        len(key_set.skipped),
        verifies(verifier, ES),
    ) == (["es-1"], 60, "ok")


async def test_redirect_is_refused_and_its_target_never_fetched(
    idp: FakeIdp, session: aiohttp.ClientSession, pki: LocalPki
) -> None:
    source, verifier = make_source(f"{idp.base_url}/moved", session, pki)

    with pytest.raises(UnavailableError) as info:
        await source.refresh_once()

    assert (
        info.value.reason,
        idp.hits.get("/elsewhere", 0),
        verifies(verifier, ES),
    ) == ("oidc_jwks.redirect_refused", 0, "oidc.keys_unavailable")


async def test_slow_endpoint_times_out_and_keeps_the_last_good_keys(
    idp: FakeIdp, session: aiohttp.ClientSession, pki: LocalPki
) -> None:
    source, verifier = make_source(idp.jwks_url, session, pki, timeout=timedelta(seconds=0.3))
    idp.body = jwks(RS)
    await source.refresh_once()
    idp.delay, idp.body = 5.0, jwks(ES)

    with pytest.raises(UnavailableError) as info:
        await source.refresh_once()

    assert (
        info.value.reason,
        verifies(verifier, RS),
        verifies(verifier, ES),
    ) == ("oidc_jwks.endpoint_unreachable", "ok", "oidc.kid_unknown")


async def test_server_not_signed_by_a_trusted_ca_is_refused(
    idp: FakeIdp, session: aiohttp.ClientSession, pki: LocalPki
) -> None:
    source, _ = make_source(idp.jwks_url, session, pki, ssl_context=ssl.create_default_context())
    idp.body = jwks(RS)

    with pytest.raises(UnavailableError) as info:
        await source.refresh_once()

    assert (info.value.reason, idp.hits.get("/jwks", 0)) == ("oidc_jwks.endpoint_unreachable", 0)


async def test_run_refreshes_periodically_and_backs_off_after_a_failure(
    idp: FakeIdp, session: aiohttp.ClientSession, pki: LocalPki
) -> None:
    """A fake ``sleep`` drives the loop: each pause changes what the IdP serves next."""
    delays: list[float] = []
    plan = [(500, jwks(RS)), (200, jwks(ES))]

    class StopLoopError(Exception):
        pass

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if not plan:
            raise StopLoopError
        idp.status, idp.body = plan.pop(0)

    source, verifier = make_source(idp.jwks_url, session, pki, sleep=sleep)
    idp.body = jwks(RS)

    with pytest.raises(StopLoopError):
        await source.run()

    # ok (regular pause) → 500 (short, jittered backoff; old keys kept) → ok with ES only.
    assert (delays[0], 2.5 <= delays[1] <= 5.0, delays[2]) == (300.0, True, 300.0)
    assert (
        verifies(verifier, RS),
        verifies(verifier, ES),
        source.failures,
    ) == ("oidc.kid_unknown", "ok", 0)


# ---------------------------------------------------------------------------------------------
# File source


@pytest.fixture
def jwks_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "idp-jwks.json"
    path.write_bytes(jwks(RS, ES))
    yield path


def make_file_source(path: Path, **kwargs: object) -> tuple[OidcJwksSource, OidcVerifier]:
    config = OidcIssuerConfig(
        issuer=ISSUER,
        audience=CLIENT,
        algorithms=frozenset({"RS256", "ES256"}),
        jwks_file=path.name,
    )
    verifier = OidcVerifier(issuers=[config])
    source = OidcJwksSource(
        config=config,
        verifier=verifier,
        now=Clock(),
        base_dir=path.parent,
        **kwargs,  # type: ignore[arg-type]
    )
    return source, verifier


async def test_file_edit_removing_a_key_stops_it_verifying_after_refresh(jwks_file: Path) -> None:
    source, verifier = make_file_source(jwks_file)
    await source.refresh_once()
    assert (verifies(verifier, RS), verifies(verifier, ES)) == ("ok", "ok")

    await asyncio.to_thread(jwks_file.write_bytes, jwks(ES))
    await source.refresh_once()

    assert (verifies(verifier, RS), verifies(verifier, ES)) == ("oidc.kid_unknown", "ok")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.unlink(), "oidc_jwks.file_unreadable"),
        (lambda p: p.write_bytes(b"{" * 10), "oidc_jwks.malformed_json"),
        (lambda p: p.write_bytes(b" " * 300_000), "oidc_jwks.too_large"),
    ],
    ids=["deleted", "garbage", "oversize"],
)
async def test_damaged_file_keeps_the_last_good_keys(
    jwks_file: Path, damage: object, reason: str
) -> None:
    source, verifier = make_file_source(jwks_file)
    await source.refresh_once()
    await asyncio.to_thread(damage, jwks_file)  # type: ignore[arg-type]

    with pytest.raises(UnavailableError) as info:
        await source.refresh_once()

    assert (reason, "ok") == (info.value.reason, verifies(verifier, RS))


def test_source_configuration_is_checked(jwks_file: Path) -> None:
    config = OidcIssuerConfig(
        issuer=ISSUER, audience=CLIENT, algorithms=frozenset({"RS256"}), jwks_url=f"{ISSUER}/jwks"
    )
    other = OidcVerifier(issuers=[])
    with pytest.raises(ConfigurationError):
        OidcJwksSource(config=config, verifier=OidcVerifier(issuers=[config]), now=Clock())
    with pytest.raises(ConfigurationError):
        OidcJwksSource(config=config, verifier=other, now=Clock())
