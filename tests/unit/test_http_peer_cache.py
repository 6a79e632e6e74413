"""The per-connection peer cache of the authentication middleware: a keep-alive mTLS connection
reuses its parsed chain and verified caller, but never past the SVID's NotAfter, never across
a trust bundle change (rotation, refresh, removal, staleness) and never for a bearer token.

The TLS side is real: an OpenSSL handshake in memory (``tests.mtls_memory``) gives the
``ssl.SSLObject`` a server connection has; the middleware's clock is a test clock, so a
connection can be "kept open" past NotAfter."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from cryptography import x509

from broker.core.authn import CallerAuthenticator
from broker.core.bundle import TrustBundle, TrustStore
from broker.core.identity import WorkloadIdentity
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.roles import parse_role_map
from broker.core.spiffe_id import TrustDomain
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import TaskleaseError
from broker.http.auth import CALLER_KEY, make_auth_middleware, peer_chain
from broker.http.problems import problem_middleware
from tests.mtls_memory import LivePki, Svid, client_context, handshake, live_pki, server_context

TD = "a.test"
AGENT = f"spiffe://{TD}/agent/x"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


class CountingX509:
    """The real X.509-SVID authenticator, counting the verifications it is asked for."""

    def __init__(self, real: TrustStoreX509Authenticator) -> None:
        self.real = real
        self.calls = 0

    def authenticate(self, chain: Sequence[x509.Certificate], *, now: datetime) -> WorkloadIdentity:
        self.calls += 1
        return self.real.authenticate(chain, now=now)


class TlsTransport:
    """What the middleware reads from asyncio's SSL transport: the connection's SSLObject."""

    def __init__(self, ssl_object: ssl.SSLObject) -> None:
        self.ssl_object = ssl_object

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.ssl_object if name == "ssl_object" else default

    def is_closing(self) -> bool:
        return False


class World:
    def __init__(self, *, skew: timedelta = timedelta(0), cache: bool = True) -> None:
        self.pki: LivePki = live_pki(TD)
        self.clock = Clock(datetime.now(UTC))
        self.store = TrustStore(max_staleness=timedelta(hours=2))
        self.install(self.pki.root.cert)
        self.x509 = CountingX509(TrustStoreX509Authenticator(trust_store=self.store, skew=skew))
        authenticator = CallerAuthenticator(
            x509_svids=self.x509,
            jwt_svids=JwtSvidVerifier(audience="tasklease", trust_store=self.store),
            oidc=None,
            roles=parse_role_map(
                {"workload": [{"pattern": f"spiffe://{TD}/agent/*", "roles": ["agent"]}]}
            ),
        )
        self.middleware = make_auth_middleware(
            authenticator=authenticator,
            now=self.clock.now,
            trust_store=self.store if cache else None,
        )
        self.server = server_context(self.pki.svid(f"spiffe://{TD}/broker"), [self.pki.root.cert])

    def install(self, *authorities: x509.Certificate, fetched_at: datetime | None = None) -> None:
        bundle = TrustBundle.from_authorities(TrustDomain(TD), x509_authorities=authorities)
        self.store.replace(bundle, fetched_at or datetime.now(UTC))

    def connect(self, svid: Svid) -> ssl.SSLObject:
        return handshake(self.server, client_context(svid, [self.pki.root.cert]))

    async def call(self, connection: ssl.SSLObject, headers: dict[str, str] | None = None) -> str:
        """Authenticate one request on ``connection``: the principal, or the refusal's reason."""
        request = make_mocked_request(
            "GET", "/v1/whoami", headers=headers or {}, transport=TlsTransport(connection)
        )

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(text=request[CALLER_KEY].principal_id)

        try:
            response = await self.middleware(request, handler)
        except TaskleaseError as exc:
            return f"refused {exc.reason}"
        assert isinstance(response, web.Response)
        assert isinstance(response.text, str)
        return response.text


async def test_a_keep_alive_connection_is_verified_once_and_then_served_from_the_cache() -> None:
    world = World()
    connection = world.connect(world.pki.svid(AGENT))
    for _ in range(5):
        world.clock.current += timedelta(seconds=1)
        assert await world.call(connection) == AGENT
    assert world.x509.calls == 1


async def test_each_connection_is_verified_on_its_own() -> None:
    world = World()
    svid = world.pki.svid(AGENT)
    first, second = world.connect(svid), world.connect(svid)
    assert await world.call(first) == AGENT
    assert await world.call(second) == AGENT
    assert await world.call(first) == AGENT
    assert world.x509.calls == 2


async def test_a_connection_kept_open_past_the_svids_not_after_is_refused() -> None:
    world = World()
    svid = world.pki.svid(AGENT, lifetime=timedelta(minutes=10))
    connection = world.connect(svid)
    assert await world.call(connection) == AGENT
    not_after = svid.leaf.not_valid_after_utc
    world.clock.current = not_after - timedelta(seconds=1)
    assert await world.call(connection) == AGENT
    assert world.x509.calls == 1
    world.clock.current = not_after  # RFC 5280: NotAfter itself is still valid, re-verified
    assert await world.call(connection) == AGENT
    assert world.x509.calls == 2
    world.clock.current = not_after + timedelta(seconds=1)
    assert await world.call(connection) == "refused x509.leaf_expired"
    world.clock.current = not_after + timedelta(hours=1)
    assert await world.call(connection) == "refused x509.leaf_expired"


async def test_past_not_after_the_skew_is_what_full_verification_allows_and_no_more() -> None:
    world = World(skew=timedelta(seconds=30))
    svid = world.pki.svid(AGENT, lifetime=timedelta(minutes=10))
    connection = world.connect(svid)
    assert await world.call(connection) == AGENT
    not_after = svid.leaf.not_valid_after_utc
    world.clock.current = not_after + timedelta(seconds=10)  # inside the skew: re-verified
    assert await world.call(connection) == AGENT
    assert world.x509.calls == 2
    world.clock.current = not_after + timedelta(seconds=31)
    assert await world.call(connection) == "refused x509.leaf_expired"


async def test_a_bundle_rotation_that_drops_the_root_refuses_an_open_connection() -> None:
    world = World()
    connection = world.connect(world.pki.svid(AGENT))
    assert await world.call(connection) == AGENT
    world.install(live_pki(TD).root.cert)  # another root only: ours is gone
    assert await world.call(connection) == "refused x509.chain_invalid"


async def test_a_refresh_with_the_same_root_reverifies_and_still_accepts() -> None:
    world = World()
    connection = world.connect(world.pki.svid(AGENT))
    assert await world.call(connection) == AGENT
    world.install(world.pki.root.cert)  # a new bundle object, same authorities
    assert await world.call(connection) == AGENT
    assert world.x509.calls == 2


async def test_a_removed_trust_domain_or_a_stale_bundle_refuses_an_open_connection() -> None:
    world = World()
    connection = world.connect(world.pki.svid(AGENT))
    assert await world.call(connection) == AGENT
    world.clock.current += timedelta(hours=3)  # the bundle was fetched more than 2 h ago
    assert await world.call(connection) == "refused bundle.stale"
    world.clock.current -= timedelta(hours=3)
    assert await world.call(connection) == AGENT
    world.store.remove(TrustDomain(TD))
    assert await world.call(connection) == "refused trust_domain.untrusted"


async def test_a_clock_stepping_back_before_the_verification_reverifies() -> None:
    world = World()
    connection = world.connect(world.pki.svid(AGENT))
    assert await world.call(connection) == AGENT
    world.clock.current -= timedelta(seconds=5)
    assert await world.call(connection) == AGENT
    assert world.x509.calls == 2


async def test_a_bearer_token_on_a_cached_connection_is_still_ambiguous() -> None:
    world = World()
    connection = world.connect(world.pki.svid(AGENT))
    assert await world.call(connection) == AGENT
    refused = await world.call(connection, {"Authorization": "Bearer a.b.c"})
    assert refused == "refused auth.ambiguous"


async def test_without_the_trust_store_every_request_is_verified() -> None:
    world = World(cache=False)
    connection = world.connect(world.pki.svid(AGENT))
    for _ in range(3):
        assert await world.call(connection) == AGENT
    assert world.x509.calls == 3


async def test_a_connection_without_a_certificate_presents_no_chain() -> None:
    world = World()
    anonymous = handshake(world.server, client_context(None, [world.pki.root.cert]))
    assert await world.call(anonymous) == "refused auth.missing"
    request = make_mocked_request("GET", "/v1/whoami", transport=TlsTransport(anonymous))
    assert peer_chain(request) == []


def test_peer_chain_reads_leaf_first_as_presented() -> None:
    world = World()
    svid = world.pki.svid(AGENT)
    request = make_mocked_request("GET", "/", transport=TlsTransport(world.connect(svid)))
    assert peer_chain(request) == svid.chain


# --------------------------------------------------------------------------- over real TLS


async def test_over_a_real_keep_alive_connection_expiry_and_rotation_are_enforced() -> None:
    """The whole app over a real TLS listener and one pooled client connection."""
    world = World()
    svid = world.pki.svid(AGENT, lifetime=timedelta(minutes=10))
    seen: set[int] = set()

    async def whoami(request: web.Request) -> web.Response:
        assert request.transport is not None
        seen.add(id(request.transport.get_extra_info("ssl_object")))
        return web.Response(text=request[CALLER_KEY].principal_id)

    app = web.Application(middlewares=[problem_middleware, world.middleware])
    app.router.add_get("/v1/whoami", whoami)
    server = TestServer(app)
    await server.start_server(ssl=world.server)
    connector = aiohttp.TCPConnector(limit=1, ssl=client_context(svid, [world.pki.root.cert]))
    results: list[Any] = []
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def ask() -> None:
                async with session.get(server.make_url("/v1/whoami")) as response:
                    body = await response.json() if response.status != 200 else None
                    results.append(
                        (response.status, await response.text() if body is None else body["reason"])
                    )

            await ask()
            await ask()
            world.clock.current = svid.leaf.not_valid_after_utc + timedelta(seconds=1)
            await ask()
            world.clock.current = datetime.now(UTC)
            await ask()
            world.install(live_pki(TD).root.cert)
            await ask()
    finally:
        await server.close()
    assert results == [
        (200, AGENT),
        (200, AGENT),
        (401, "x509.leaf_expired"),
        (200, AGENT),
        (401, "x509.chain_invalid"),
    ]
    assert len(seen) == 1  # one connection, kept alive throughout
    assert world.x509.calls == 4  # first, after the expired check, after the rotation


@pytest.mark.parametrize("lifetime", [timedelta(minutes=10)])
def test_the_live_pki_issues_svids_valid_now(lifetime: timedelta) -> None:
    svid = live_pki(TD).svid(AGENT, lifetime=lifetime)
    now = datetime.now(UTC)
    assert svid.leaf.not_valid_before_utc <= now < svid.leaf.not_valid_after_utc
