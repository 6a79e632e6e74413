"""Authentication middleware: every ``/v1`` request carries one verified identity.

The peer certificate comes from the TLS layer only — the leaf and what the peer sent, read from
the SSL object of the connection after the handshake proved possession of the leaf's key.
Headers such as ``X-Forwarded-Client-Cert`` are never read: a pasted certificate proves nothing.

A keep-alive connection presents the same certificates on every request, so
:class:`PeerIdentityCache` keeps, per connection, the parsed chain and (given the trust store)
the X.509-SVID caller it authenticated, re-checked on every request: see its docstring.
"""

from __future__ import annotations

import _ssl
import ssl
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from cryptography import x509

from broker.core.authn import Caller, CallerAuthenticator
from broker.core.bundle import TrustBundle, TrustStore
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.roles import Role
from broker.core.untrusted import printable
from broker.errors import AuthenticationError, ForbiddenError, TaskleaseError
from broker.http.audit_rejections import RejectionAuditor
from broker.http.problems import REQUEST_ID_KEY

CALLER_KEY = web.RequestKey("caller", Caller)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})

_log = structlog.get_logger("broker.auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_chain(request: web.Request) -> list[x509.Certificate]:
    """The client's certificate chain as presented in the TLS handshake (leaf first).

    Empty when the client sent no certificate. The handshake already proved the client holds
    the leaf's private key and that the chain reaches *some* trusted root; the caller verifies
    it again against the leaf's own trust domain.
    """
    ssl_object = _ssl_object(request)
    if ssl_object is None:
        return []
    leaf_der = ssl_object.getpeercert(binary_form=True)
    if not leaf_der:
        return []
    return _read_chain(ssl_object, leaf_der)


def _ssl_object(request: web.Request) -> ssl.SSLObject | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_object if isinstance(ssl_object, ssl.SSLObject) else None


def _read_chain(ssl_object: ssl.SSLObject, leaf_der: bytes) -> list[x509.Certificate]:
    # Python 3.13 has SSLObject.get_unverified_chain(); 3.11/3.12 have it on the C object.
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None
    )
    presented: Sequence[bytes] = [leaf_der]
    if getter is not None:
        presented = [_der(cert) for cert in (getter() or [])] or [leaf_der]
    chain = [x509.load_der_x509_certificate(der) for der in presented]
    # OpenSSL puts the leaf first; make sure of it, whatever the accessor returned (compared
    # as the DER the first certificate was parsed from: re-encoding it costs more).
    if presented[0] != leaf_der:
        chain = [x509.load_der_x509_certificate(leaf_der), *chain]
    return chain


def _der(cert: object) -> bytes:
    public_bytes = getattr(cert, "public_bytes", None)
    if public_bytes is None:
        raise AuthenticationError(
            "the TLS layer returned an unreadable peer certificate",
            reason="auth.tls_chain_unreadable",
        )
    data = public_bytes(_ssl.ENCODING_DER)
    if not isinstance(data, bytes):
        raise AuthenticationError(
            "the TLS layer returned an unreadable peer certificate",
            reason="auth.tls_chain_unreadable",
        )
    return data


@dataclass(slots=True)
class _Peer:
    """One connection's peer: its leaf as last reported, the chain parsed from it, and the
    caller the chain authenticated (with the bundle and the instant it was verified at)."""

    leaf_der: bytes
    chain: tuple[x509.Certificate, ...]
    caller: Caller | None = None
    bundle: TrustBundle | None = None
    verified_at: datetime | None = None


class PeerIdentityCache:
    """Per TLS connection (the connection's ``ssl.SSLObject``, held weakly: an entry goes with
    its connection), what the peer's certificates gave on an earlier request:

    * **the parsed chain**, reused while the TLS layer reports the same leaf DER (read on every
      request; a renegotiation that changes the certificate starts afresh). Parsing is
      deterministic, so this alone changes no decision.
    * with ``trust_store``, **the X.509-SVID caller** the chain authenticated, reused only if,
      at this request's ``now``:

      - ``verified_at <= now < expires_at``, where ``expires_at`` is the earliest NotAfter of
        the verified chain (leaf, intermediates, authority): a connection kept open past the
        SVID's NotAfter is verified again, and refused (a clock stepping back re-verifies too);
      - the trust store still holds, fresh, the very bundle object of the SVID's trust domain
        that it held when the chain was verified: a rotation, any refresh, a removed domain or
        a stale bundle re-verifies (and a stale or removed one then fails closed with its
        typed error).

      The bundle is read right after the verification, in the same synchronous step: the
      store is swapped only on the event loop thread (its feeds run there), so it is the one
      the verification used. Roles come from the authenticator's role map, which is fixed
      for its life. Only successes are kept; a bearer token (JWT-SVID, OIDC) is never cached.
    """

    def __init__(self, *, trust_store: TrustStore | None = None) -> None:
        self._store = trust_store
        self._peers: weakref.WeakKeyDictionary[ssl.SSLObject, _Peer] = weakref.WeakKeyDictionary()

    def peer(self, request: web.Request) -> _Peer | None:
        """The request connection's peer, None when it presented no certificate."""
        ssl_object = _ssl_object(request)
        if ssl_object is None:
            return None
        leaf_der = ssl_object.getpeercert(binary_form=True)
        if not leaf_der:
            return None
        peer = self._peers.get(ssl_object)
        if peer is None or peer.leaf_der != leaf_der:
            peer = _Peer(leaf_der, tuple(_read_chain(ssl_object, leaf_der)))
            self._peers[ssl_object] = peer
        return peer

    def cached_caller(self, peer: _Peer, now: datetime) -> Caller | None:
        """The caller ``peer`` authenticated, if it still holds at ``now`` (see above)."""
        caller, verified_at = peer.caller, peer.verified_at
        if caller is None or verified_at is None or self._store is None:
            return None
        identity = caller.identity
        if isinstance(identity, WorkloadIdentity) and verified_at <= now < identity.expires_at:
            try:
                bundle = self._store.bundle_for(identity.spiffe_id.trust_domain, now)
            except TaskleaseError:
                bundle = None  # stale or removed: the full verification says why
            if bundle is not None and bundle is peer.bundle:
                return caller
        peer.caller = peer.bundle = peer.verified_at = None
        return None

    def remember(self, peer: _Peer, caller: Caller, now: datetime) -> None:
        """Keep ``caller``, just authenticated from ``peer``'s chain at ``now``."""
        identity = caller.identity
        if (
            self._store is None
            or not isinstance(identity, WorkloadIdentity)
            or identity.method is not AuthMethod.X509_SVID
        ):
            return
        try:
            bundle = self._store.bundle_for(identity.spiffe_id.trust_domain, now)
        except TaskleaseError:
            return
        peer.caller, peer.bundle, peer.verified_at = caller, bundle, now


def make_auth_middleware(
    *,
    authenticator: CallerAuthenticator,
    now: Callable[[], datetime],
    rejections: RejectionAuditor | None = None,
    trust_store: TrustStore | None = None,
) -> Middleware:
    """Middleware that authenticates every non-public request, or answers 401/403 (and
    records ``identity.rejected`` through ``rejections``). ``trust_store`` (the one the
    authenticator verifies X.509-SVIDs against) lets a keep-alive connection reuse the caller
    its SVID authenticated while that still holds (:class:`PeerIdentityCache`)."""
    peers = PeerIdentityCache(trust_store=trust_store)

    def authenticate(request: web.Request) -> Caller:
        peer = peers.peer(request)
        authorization = request.headers.get("Authorization")
        moment = now()
        # A certificate alone: the connection's cached caller, if it still holds. With an
        # Authorization header too the authenticator refuses the request (auth.ambiguous).
        certificate_only = peer if authorization is None else None
        if certificate_only is not None:
            cached = peers.cached_caller(certificate_only, moment)
            if cached is not None:
                return cached
        caller = authenticator.authenticate(
            peer_chain=peer.chain if peer is not None else (),
            authorization=authorization,
            now=moment,
        )
        if certificate_only is not None:
            peers.remember(certificate_only, caller, moment)
        return caller

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        try:
            caller = authenticate(request)
        except (AuthenticationError, ForbiddenError) as exc:
            _log_rejection(request, exc)
            if rejections is not None:
                await rejections.rejected(request, exc)
            raise
        request[CALLER_KEY] = caller
        structlog.contextvars.bind_contextvars(principal=caller.principal_id)
        try:
            return await handler(request)
        finally:
            structlog.contextvars.unbind_contextvars("principal")

    return auth_middleware


def _log_rejection(request: web.Request, exc: TaskleaseError) -> None:
    _log.warning(
        "identity.rejected",
        request_id=request.get(REQUEST_ID_KEY, ""),
        path=printable(request.path, 200),
        status=exc.status,
        reason=exc.reason,
        detail=printable(exc.detail, 500),
        remote=printable(request.remote or "", 64),
    )


def require_roles(request: web.Request, *roles: Role) -> Caller:
    """The request's caller, if it holds one of ``roles``; otherwise a 403."""
    caller = request[CALLER_KEY]
    if not caller.has_any(roles):
        raise ForbiddenError(
            f"{printable(caller.principal_id)} has roles "
            f"{sorted(r.value for r in caller.roles)}; this needs one of "
            f"{sorted(r.value for r in roles)}",
            reason="auth.role_required",
        )
    return caller
