"""Bundle sources against real servers and files: SECURITY 19-21 (sources side).

Federation endpoints are real aiohttp HTTPS servers on 127.0.0.1 with certificates from a
throwaway test CA; the source trusts only that CA. Static bundles are real files. Times that
the store judges (fetched, stale) come from a settable clock, never from sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from broker.adapters.bundle_sources import FederationEndpointSource, StaticBundleFile
from broker.core.bundle import ReplaceOutcome, TrustBundle, TrustStore
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.spiffe_id import SpiffeId
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import (
    BundleUnavailableError,
    ConfigurationError,
    JwtSvidRejectedError,
    X509SvidRejectedError,
)
from tests import pki
from tests.jwt_tokens import (
    AUDIENCE,
    DROP,
    NOW,
    SUB_A,
    TD_A,
    bundle_json,
    ca_cert,
    signer_es256_a,
    signer_rs256_a,
    token,
    x509_jwk,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BYTES = 8 * 1024
SOURCE_TIMEOUT = timedelta(seconds=0.3)
SLOW_SERVER_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------
# A throwaway Web PKI and HTTPS servers on loopback


@dataclass(frozen=True)
class WebPki:
    """A test CA and the files and contexts built from it."""

    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    directory: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only, with host name checking on."""
        pem = self.ca.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return ssl.create_default_context(cadata=pem)

    def server_context(self, name: str, *, dns: list[str], ips: list[str]) -> ssl.SSLContext:
        """A server context serving a certificate for ``dns``/``ips`` issued by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        wall = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(wall - timedelta(hours=1))
            .not_valid_after(wall + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        path = self.directory / f"{name}.pem"
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(path)
        return context


def make_web_pki(directory: Path, name: str) -> WebPki:
    """A self-signed CA named ``name`` whose files live in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    wall = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(wall - timedelta(hours=1))
        .not_valid_after(wall + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(pki.CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return WebPki(ca_key=key, ca=ca, directory=directory)


@dataclass
class Endpoint:
    """A running HTTPS server whose routes each test sets."""

    port: int
    client_ssl: ssl.SSLContext
    handlers: dict[str, Handler] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base(self) -> str:
        return f"https://localhost:{self.port}"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        handler = self.handlers.get(request.path)
        if handler is None:
            return web.Response(status=404)
        return await handler(request)


@contextlib.asynccontextmanager
async def https_server(context: ssl.SSLContext, handler: Handler) -> AsyncIterator[int]:
    """Serve ``handler`` on every path over TLS on a free loopback port; yield the port."""
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock, ssl_context=context)
    await site.start()
    try:
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def web_pki(tmp_path_factory: pytest.TempPathFactory) -> WebPki:
    return make_web_pki(tmp_path_factory.mktemp("webpki"), "tasklease test CA")


@pytest.fixture(scope="module")
async def shared_endpoint(web_pki: WebPki) -> AsyncIterator[Endpoint]:
    context = web_pki.server_context("bundles", dns=["localhost"], ips=["127.0.0.1"])
    endpoint = Endpoint(port=0, client_ssl=web_pki.client_context())
    async with https_server(context, endpoint.dispatch) as port:
        endpoint.port = port
        yield endpoint
        endpoint.release.set()


@pytest.fixture
def endpoint(shared_endpoint: Endpoint) -> Iterator[Endpoint]:
    """The shared server with no routes and no recorded requests."""
    shared_endpoint.handlers.clear()
    shared_endpoint.hits.clear()
    shared_endpoint.release = asyncio.Event()
    yield shared_endpoint
    # Let a handler still waiting on a stalled response finish before the next test.
    shared_endpoint.release.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


# ---------------------------------------------------------------------------------------------
# Handlers, bundles, clock


def serve(body: bytes, *, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type="application/json")

    return handler


def redirect(location: str, *, status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return handler


def serve_in_pieces(body: bytes, *, pieces: int, pause: float = 0.0) -> Handler:
    """Stream ``body`` chunked (no Content-Length), ``pieces`` writes with ``pause`` between."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        size = -(-len(body) // pieces)
        for start in range(0, len(body), size):
            await response.write(body[start : start + size])
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return handler


def stall_after_headers(endpoint: Endpoint, body: bytes) -> Handler:
    """Send headers and a few bytes, then wait longer than the source's timeout."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:8])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(endpoint.release.wait(), SLOW_SERVER_SECONDS)
        with contextlib.suppress(ConnectionError):
            await response.write(body[8:])
        return response

    return handler


class SettableClock:
    """A clock a test moves by hand."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def now(self) -> datetime:
        return self.moment


def good_entries() -> list[dict[str, object]]:
    return [x509_jwk(ca_cert(TD_A)), signer_es256_a().jwk(), signer_rs256_a().jwk()]


def good_bundle(*, sequence: object = 1, refresh_hint: object = 300) -> bytes:
    return bundle_json(good_entries(), sequence=sequence, refresh_hint=refresh_hint)


def new_store(staleness: timedelta = timedelta(hours=1)) -> TrustStore:
    return TrustStore(max_staleness=staleness)


def make_source(
    endpoint: Endpoint,
    store: TrustStore,
    clock: SettableClock | None = None,
    *,
    path: str = "/bundle",
    **options: Any,
) -> FederationEndpointSource:
    return FederationEndpointSource(
        trust_domain=TD_A,
        url=f"{endpoint.base}{path}",
        store=store,
        now=(clock or SettableClock(NOW)).now,
        ssl_context=endpoint.client_ssl,
        max_bytes=MAX_BYTES,
        timeout=SOURCE_TIMEOUT,
        **options,
    )


async def installed_good(
    endpoint: Endpoint,
    session: aiohttp.ClientSession,
    source: FederationEndpointSource,
    store: TrustStore,
) -> TrustBundle:
    """Serve and install the good bundle at ``/bundle``; return what the store then holds."""
    endpoint.handlers["/bundle"] = serve(good_bundle())
    result = await source.refresh_once(session)
    assert result.outcome == ReplaceOutcome.INSTALLED
    return store.bundle_for(TD_A, NOW)


def jwt_verifier(store: TrustStore) -> JwtSvidVerifier:
    return JwtSvidVerifier(audience=AUDIENCE, trust_store=store)


async def refresh_fails(
    source: FederationEndpointSource, session: aiohttp.ClientSession
) -> BundleUnavailableError:
    with pytest.raises(BundleUnavailableError) as caught:
        await source.refresh_once(session)
    return caught.value


# ---------------------------------------------------------------------------------------------
# Federation endpoint: the good path


async def test_good_bundle_installs_and_verifies(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    endpoint.handlers["/bundle"] = serve(good_bundle(sequence=7))

    result = await make_source(endpoint, store).refresh_once(session)

    assert result.outcome == ReplaceOutcome.INSTALLED
    bundle = store.bundle_for(TD_A, NOW)
    assert bundle.sequence_number == 7
    assert {"a-ec-1", "a-rsa-1"} == set(bundle.jwt_authorities)
    assert [ca_cert(TD_A)] == list(bundle.x509_authorities)
    assert store.fetched_at(TD_A) == NOW
    assert (
        SpiffeId.parse(SUB_A)
        == jwt_verifier(store).verify(token(signer_es256_a()), now=NOW).spiffe_id
    )


@pytest.mark.parametrize(
    ("hint", "staleness", "expected"),
    [
        pytest.param(300, timedelta(hours=1), timedelta(seconds=300), id="hint-used-as-is"),
        pytest.param(DROP, timedelta(hours=1), timedelta(minutes=5), id="no-hint-default"),
        pytest.param(0, timedelta(hours=1), timedelta(seconds=5), id="zero-clamped-to-min"),
        pytest.param(1, timedelta(hours=1), timedelta(seconds=5), id="tiny-clamped-to-min"),
        pytest.param(86_400, timedelta(hours=4), timedelta(hours=1), id="huge-clamped-to-max"),
        pytest.param(
            86_400, timedelta(minutes=20), timedelta(minutes=10), id="capped-at-half-staleness"
        ),
    ],
)
async def test_refresh_hint_drives_next_refresh_clamped(
    endpoint: Endpoint,
    session: aiohttp.ClientSession,
    hint: object,
    staleness: timedelta,
    expected: timedelta,
) -> None:
    endpoint.handlers["/bundle"] = serve(good_bundle(refresh_hint=hint))

    result = await make_source(endpoint, new_store(staleness)).refresh_once(session)

    assert expected == result.next_refresh


async def test_body_arriving_in_pieces_is_read_whole(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    """One read() returns only what is buffered; the source must read to the end."""
    store = new_store()
    endpoint.handlers["/bundle"] = serve_in_pieces(good_bundle(sequence=3), pieces=4, pause=0.05)

    result = await make_source(endpoint, store).refresh_once(session)

    assert result.outcome == ReplaceOutcome.INSTALLED
    assert store.bundle_for(TD_A, NOW).sequence_number == 3


async def test_same_host_https_redirect_is_followed_once_per_refresh(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    """Federation §5.2.1.4: clients SHOULD follow a redirect to a valid bundle endpoint URL."""
    store = new_store()
    endpoint.handlers["/bundle"] = redirect("/moved/bundle.json", status=307)
    endpoint.handlers["/moved/bundle.json"] = serve(good_bundle())

    result = await make_source(endpoint, store).refresh_once(session)

    assert result.outcome == ReplaceOutcome.INSTALLED
    assert endpoint.hits == ["/bundle", "/moved/bundle.json"]


# ---------------------------------------------------------------------------------------------
# Federation endpoint: a refresh that removes an authority (no add-only store)


async def test_refresh_removing_a_jwt_key_stops_it_verifying(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    source = make_source(endpoint, store)
    await installed_good(endpoint, session, source, store)
    removed = token(signer_rs256_a())
    assert SpiffeId.parse(SUB_A) == jwt_verifier(store).verify(removed, now=NOW).spiffe_id
    endpoint.handlers["/bundle"] = serve(
        bundle_json([x509_jwk(ca_cert(TD_A)), signer_es256_a().jwk()], sequence=2)
    )

    assert (await source.refresh_once(session)).outcome == ReplaceOutcome.INSTALLED

    assert {"a-ec-1"} == set(store.bundle_for(TD_A, NOW).jwt_authorities)
    with pytest.raises(JwtSvidRejectedError) as caught:
        jwt_verifier(store).verify(removed, now=NOW)
    assert caught.value.reason == "jwt.kid_unknown"


async def test_refresh_removing_an_x509_authority_stops_it_verifying(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    source = make_source(endpoint, store)
    old_root, kept_root = pki.make_root("a.test"), pki.make_root("a.test")
    endpoint.handlers["/bundle"] = serve(
        bundle_json([x509_jwk(old_root.cert), x509_jwk(kept_root.cert)], sequence=1)
    )
    await source.refresh_once(session)
    authenticator = TrustStoreX509Authenticator(trust_store=store)
    leaf = old_root.leaf("spiffe://a.test/workload")
    assert str(authenticator.authenticate([leaf], now=NOW).spiffe_id) == "spiffe://a.test/workload"
    endpoint.handlers["/bundle"] = serve(bundle_json([x509_jwk(kept_root.cert)], sequence=2))

    assert (await source.refresh_once(session)).outcome == ReplaceOutcome.INSTALLED

    assert [kept_root.cert] == list(store.bundle_for(TD_A, NOW).x509_authorities)
    with pytest.raises(X509SvidRejectedError):
        authenticator.authenticate([leaf], now=NOW)


# ---------------------------------------------------------------------------------------------
# Federation endpoint: failed refreshes keep the last good bundle


@pytest.mark.parametrize(
    ("routes", "never_requested", "detail_says"),
    [
        pytest.param(
            {"/bundle": lambda base: redirect(base.replace("https://", "http://") + "/plain")},
            "/plain",
            "plain HTTP",
            id="redirect-to-http",
        ),
        pytest.param(
            # The same server under another name: it would succeed if followed.
            {"/bundle": lambda base: redirect(base.replace("localhost", "127.0.0.1") + "/ok")},
            "/ok",
            "another host",
            id="redirect-to-another-host",
        ),
        pytest.param(
            {"/bundle": lambda base: redirect("https://localhost:1/ok")},
            "/ok",
            "another host",
            id="redirect-to-another-port",
        ),
        pytest.param(
            {"/bundle": lambda base: redirect("/b"), "/b": lambda base: redirect("/bundle")},
            None,
            "loop",
            id="redirect-loop",
        ),
        pytest.param(
            {
                "/bundle": lambda base: redirect("/r1"),
                "/r1": lambda base: redirect("/r2"),
                "/r2": lambda base: redirect("/r3"),
                "/r3": lambda base: redirect("/ok"),
            },
            "/ok",
            "more than 3",
            id="too-many-redirects",
        ),
        pytest.param(
            {"/bundle": lambda base: redirect("https://user:pw@localhost/ok")},
            "/ok",
            "userinfo",
            id="redirect-with-userinfo",
        ),
        pytest.param(
            {"/bundle": lambda base: serve(b"", status=302)},
            None,
            "without a Location",
            id="redirect-without-location",
        ),
        pytest.param(
            {"/bundle": lambda base: serve(b"down", status=503)},
            None,
            "HTTP 503",
            id="server-error-503",
        ),
        pytest.param(
            {"/bundle": lambda base: serve(b"oops", status=500)},
            None,
            "HTTP 500",
            id="server-error-500",
        ),
        pytest.param(
            {"/bundle": lambda base: serve(good_bundle(sequence=9), status=203)},
            None,
            "HTTP 203",
            id="non-200-success",
        ),
    ],
)
async def test_refused_response_keeps_last_good_bundle(
    endpoint: Endpoint,
    session: aiohttp.ClientSession,
    routes: dict[str, Callable[[str], Handler]],
    never_requested: str | None,
    detail_says: str,
) -> None:
    store = new_store()
    clock = SettableClock(NOW)
    source = make_source(endpoint, store, clock)
    before = await installed_good(endpoint, session, source, store)
    endpoint.handlers.update({path: make(endpoint.base) for path, make in routes.items()})
    endpoint.hits.clear()
    clock.moment = NOW + timedelta(minutes=5)

    error = await refresh_fails(source, session)

    assert error.reason == "bundle.endpoint_status"
    assert detail_says in error.detail
    assert before is store.bundle_for(TD_A, NOW)
    assert store.fetched_at(TD_A) == NOW
    if never_requested is not None:
        assert never_requested not in endpoint.hits


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(serve(b"x" * (MAX_BYTES + 1)), id="content-length-over-limit"),
        pytest.param(serve_in_pieces(b" " * (4 * MAX_BYTES), pieces=32), id="chunked-over-limit"),
    ],
)
async def test_body_over_the_limit_is_refused_and_last_good_kept(
    endpoint: Endpoint, session: aiohttp.ClientSession, handler: Handler
) -> None:
    store = new_store()
    source = make_source(endpoint, store)
    before = await installed_good(endpoint, session, source, store)
    endpoint.handlers["/bundle"] = handler

    error = await refresh_fails(source, session)

    assert error.reason == "bundle.endpoint_too_large"
    assert before is store.bundle_for(TD_A, NOW)


async def test_slow_body_times_out_and_last_good_kept(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    source = make_source(endpoint, store)
    before = await installed_good(endpoint, session, source, store)
    endpoint.handlers["/bundle"] = stall_after_headers(endpoint, good_bundle(sequence=2))
    loop = asyncio.get_running_loop()
    started = loop.time()

    error = await refresh_fails(source, session)

    assert error.reason == "bundle.endpoint_unreachable"
    assert loop.time() - started < SLOW_SERVER_SECONDS
    assert before is store.bundle_for(TD_A, NOW)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(
            bundle_json([signer_es256_a().jwk(), signer_rs256_a().jwk(kid="a-ec-1")], sequence=2),
            "bundle.duplicate_kid",
            id="duplicate-kid",
        ),
        pytest.param(b"<html>not json</html>", "bundle.malformed_json", id="not-json"),
        pytest.param(b'{"keys": [], "keys": []}', "bundle.duplicate_member", id="duplicate-member"),
        pytest.param(b'{"spiffe_sequence": 2}', "bundle.keys_missing", id="no-keys"),
        pytest.param(b"\xff\xfe{}", "bundle.malformed_json", id="not-utf8"),
    ],
)
async def test_invalid_bundle_is_rejected_and_last_good_kept(
    endpoint: Endpoint, session: aiohttp.ClientSession, body: bytes, reason: str
) -> None:
    store = new_store()
    source = make_source(endpoint, store)
    before = await installed_good(endpoint, session, source, store)
    endpoint.handlers["/bundle"] = serve(body)

    error = await refresh_fails(source, session)

    assert reason == error.reason
    assert before is store.bundle_for(TD_A, NOW)


async def test_sequence_going_backwards_keeps_old_bundle_and_alerts(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    clock = SettableClock(NOW)
    source = make_source(endpoint, store, clock)
    endpoint.handlers["/bundle"] = serve(good_bundle(sequence=5))
    await source.refresh_once(session)
    before = store.bundle_for(TD_A, NOW)
    # An older bundle that still trusted a key the publisher has since dropped.
    endpoint.handlers["/bundle"] = serve(bundle_json([signer_es256_a().jwk()], sequence=4))
    clock.moment = NOW + timedelta(minutes=5)

    with capture_logs() as logs:
        result = await source.refresh_once(session)

    assert result.outcome == ReplaceOutcome.KEPT_SEQUENCE_REGRESSED
    assert before is store.bundle_for(TD_A, NOW)
    assert store.fetched_at(TD_A) == NOW
    refused = [entry for entry in logs if entry["event"] == "bundle.update_refused"]
    assert [(e["outcome"], e["refused_sequence"], e["alert"]) for e in refused] == [
        ("kept_sequence_regressed", 4, True)
    ]


async def test_bundle_fails_closed_once_stale_past_the_limit(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    """A failed refresh does not renew the fetch time; past the limit the store fails closed."""
    store = new_store(timedelta(minutes=10))
    clock = SettableClock(NOW)
    source = make_source(endpoint, store, clock)
    await installed_good(endpoint, session, source, store)
    endpoint.handlers["/bundle"] = serve(b"down", status=503)
    clock.moment = NOW + timedelta(minutes=8)
    await refresh_fails(source, session)

    assert store.bundle_for(TD_A, NOW + timedelta(minutes=10)).sequence_number == 1
    with pytest.raises(BundleUnavailableError) as caught:
        store.bundle_for(TD_A, NOW + timedelta(minutes=10, seconds=1))
    assert caught.value.reason == "bundle.stale"


# ---------------------------------------------------------------------------------------------
# Federation endpoint: server authentication and configuration


@pytest.mark.parametrize(
    "impostor",
    [
        pytest.param(("rogue", ["localhost"], ["127.0.0.1"]), id="certificate-from-another-ca"),
        pytest.param(
            ("trusted", ["bundles.elsewhere.test"], []), id="certificate-for-another-host"
        ),
    ],
)
async def test_server_certificate_not_valid_for_the_endpoint_is_refused(
    web_pki: WebPki,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    impostor: tuple[str, list[str], list[str]],
) -> None:
    issuer, dns, ips = impostor
    signing = make_web_pki(tmp_path, "rogue CA") if issuer == "rogue" else web_pki
    context = signing.server_context("impostor", dns=dns, ips=ips)
    store = new_store()
    store.replace(TrustBundle(trust_domain=TD_A), NOW)
    before = store.bundle_for(TD_A, NOW)

    async with https_server(context, serve(good_bundle(sequence=2))) as port:
        source = FederationEndpointSource(
            trust_domain=TD_A,
            url=f"https://localhost:{port}/bundle",
            store=store,
            now=SettableClock(NOW).now,
            ssl_context=web_pki.client_context(),
        )
        error = await refresh_fails(source, session)

    assert error.reason == "bundle.endpoint_unreachable"
    assert "Certificate" in error.detail
    assert before is store.bundle_for(TD_A, NOW)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://localhost/bundle", id="plain-http"),
        pytest.param("ftp://localhost/bundle", id="other-scheme"),
        pytest.param("https:///bundle", id="no-host"),
        pytest.param("https://user:secret@localhost/bundle", id="userinfo"),
        pytest.param("http://user:secret@localhost/bundle", id="plain-http-with-userinfo"),
        pytest.param("https://localhost:99999/bundle", id="bad-port"),
    ],
)
def test_endpoint_url_that_is_not_https_web_is_refused_at_construction(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        FederationEndpointSource(
            trust_domain=TD_A, url=url, store=new_store(), now=SettableClock(NOW).now
        )
    assert "secret" not in caught.value.detail


def test_tls_context_that_does_not_verify_is_refused_at_construction() -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    with pytest.raises(ConfigurationError):
        FederationEndpointSource(
            trust_domain=TD_A,
            url="https://localhost/bundle",
            store=new_store(),
            now=SettableClock(NOW).now,
            ssl_context=context,
        )


# ---------------------------------------------------------------------------------------------
# Federation endpoint: run()


class _StopRunError(Exception):
    """Ends a run() loop from the injected sleep."""


def stop_after(count: int, delays: list[float]) -> Callable[[float], Awaitable[None]]:
    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) >= count:
            raise _StopRunError

    return sleep


async def test_run_backs_off_after_failures_and_recovers(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    answers = [serve(b"down", status=503), serve(b"down", status=503), serve(good_bundle())]

    async def recovering(request: web.Request) -> web.StreamResponse:
        return await answers.pop(0)(request)

    endpoint.handlers["/bundle"] = recovering
    delays: list[float] = []
    source = make_source(endpoint, store, sleep=stop_after(3, delays))

    with capture_logs() as logs, pytest.raises(_StopRunError):
        await source.run(session)

    assert store.bundle_for(TD_A, NOW).sequence_number == 1
    assert source.failures == 0
    first, second, after_success = delays
    # Backoff starts at twice min_refresh (5 s), halves at most by jitter, then doubles.
    assert 5.0 <= first <= 10.0
    assert 10.0 <= second <= 20.0
    assert after_success == 300.0
    failed = [entry for entry in logs if entry["event"] == "bundle.refresh_failed"]
    assert [(entry["reason"], entry["failures"]) for entry in failed] == [
        ("bundle.endpoint_status", 1),
        ("bundle.endpoint_status", 2),
    ]
    assert all(entry["alert"] for entry in failed)


async def test_run_backs_off_when_the_store_refuses_the_update(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    store = new_store()
    endpoint.handlers["/bundle"] = serve(good_bundle(sequence=5))
    await make_source(endpoint, store).refresh_once(session)
    endpoint.handlers["/bundle"] = serve(good_bundle(sequence=4))
    delays: list[float] = []
    source = make_source(endpoint, store, sleep=stop_after(1, delays))

    with pytest.raises(_StopRunError):
        await source.run(session)

    assert source.failures == 1
    assert store.bundle_for(TD_A, NOW).sequence_number == 5
    assert 5.0 <= delays[0] <= 10.0


async def test_logs_never_carry_bundle_material(
    endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    oct_key: dict[str, object] = {"use": "jwt-svid", "kid": "oct-1", "kty": "oct", "k": "c2VjcmV0"}
    entries = [*good_entries(), oct_key]
    answers = [serve(b'{"keys": "\x1b[2J"}'), serve(bundle_json(entries))]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await answers.pop(0)(request)

    endpoint.handlers["/bundle"] = handler
    source = make_source(endpoint, new_store(), sleep=stop_after(2, []))

    with capture_logs() as logs, pytest.raises(_StopRunError):
        await source.run(session)

    text = repr(logs)
    x5c = good_entries()[0]["x5c"]
    assert isinstance(x5c, list)
    assert x5c[0][:40] not in text
    assert str(signer_es256_a().jwk()["x"]) not in text
    assert "c2VjcmV0" not in text
    assert "\x1b" not in text
    assert {"bundle.refresh_failed", "bundle.key_skipped", "bundle.installed"} <= {
        entry["event"] for entry in logs
    }


# ---------------------------------------------------------------------------------------------
# Static bundle file


def write_bundle(path: Path, entries: list[dict[str, object]], *, sequence: int = 1) -> None:
    path.write_bytes(bundle_json(entries, sequence=sequence))


def file_source(path: Path, store: TrustStore, clock: SettableClock) -> StaticBundleFile:
    return StaticBundleFile(
        trust_domain=TD_A, path=path, store=store, now=clock.now, max_bytes=MAX_BYTES
    )


def test_static_file_edit_dropping_a_key_stops_it_verifying(tmp_path: Path) -> None:
    path = tmp_path / "a.test.json"
    store = new_store()
    clock = SettableClock(NOW)
    source = file_source(path, store, clock)
    write_bundle(path, good_entries())
    assert source.load() == ReplaceOutcome.INSTALLED
    removed = token(signer_rs256_a())
    assert SpiffeId.parse(SUB_A) == jwt_verifier(store).verify(removed, now=NOW).spiffe_id
    write_bundle(path, [x509_jwk(ca_cert(TD_A)), signer_es256_a().jwk()], sequence=2)
    clock.moment = NOW + timedelta(minutes=1)

    assert source.load() == ReplaceOutcome.INSTALLED

    assert {"a-ec-1"} == set(store.bundle_for(TD_A, clock.moment).jwt_authorities)
    with pytest.raises(JwtSvidRejectedError) as caught:
        jwt_verifier(store).verify(removed, now=NOW)
    assert caught.value.reason == "jwt.kid_unknown"


async def test_static_file_reload_reads_off_the_loop_and_refreshes(tmp_path: Path) -> None:
    path = tmp_path / "a.test.json"
    store = new_store()
    clock = SettableClock(NOW)
    source = file_source(path, store, clock)
    write_bundle(path, good_entries())
    source.load()
    clock.moment = NOW + timedelta(minutes=1)

    assert await source.reload() == ReplaceOutcome.REFRESHED

    assert clock.moment == store.fetched_at(TD_A)


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "absent.json"


def _directory(tmp_path: Path) -> Path:
    return tmp_path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "bundle.fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make_path", [_missing, _directory, _fifo], ids=["missing", "dir", "fifo"])
def test_static_file_unreadable_is_refused(
    tmp_path: Path, make_path: Callable[[Path], Path]
) -> None:
    """A FIFO with no writer must not hang the read: it is not a regular file."""
    store = new_store()
    source = file_source(make_path(tmp_path), store, SettableClock(NOW))

    with pytest.raises(BundleUnavailableError) as caught:
        source.load()

    assert caught.value.reason == "bundle.file_unreadable"
    assert frozenset() == store.trust_domains


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"{not json", "bundle.malformed_json", id="not-json"),
        pytest.param(b" " * (MAX_BYTES + 100), "bundle.too_large", id="too-large"),
        pytest.param(
            bundle_json([signer_es256_a().jwk(), signer_es256_a().jwk()], sequence=2),
            "bundle.duplicate_kid",
            id="duplicate-kid",
        ),
    ],
)
def test_static_file_bad_on_reload_keeps_last_good(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "a.test.json"
    store = new_store()
    clock = SettableClock(NOW)
    source = file_source(path, store, clock)
    write_bundle(path, good_entries())
    source.load()
    before = store.bundle_for(TD_A, NOW)
    path.write_bytes(content)
    clock.moment = NOW + timedelta(minutes=1)

    with pytest.raises(BundleUnavailableError) as caught:
        source.load()

    assert reason == caught.value.reason
    assert before is store.bundle_for(TD_A, NOW)
    assert store.fetched_at(TD_A) == NOW


def test_static_file_unreadable_on_reload_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "a.test.json"
    store = new_store()
    source = file_source(path, store, SettableClock(NOW))
    write_bundle(path, good_entries())
    source.load()
    before = store.bundle_for(TD_A, NOW)
    path.unlink()

    with pytest.raises(BundleUnavailableError) as caught:
        source.load()

    assert caught.value.reason == "bundle.file_unreadable"
    assert before is store.bundle_for(TD_A, NOW)
