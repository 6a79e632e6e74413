"""Authentication middleware: every ``/v1`` request carries one verified identity.

The peer certificate comes from the TLS layer only — the leaf and what the peer sent, read from
the SSL object of the connection after the handshake proved possession of the leaf's key.
Headers such as ``X-Forwarded-Client-Cert`` are never read: a pasted certificate proves nothing.
"""

from __future__ import annotations

import _ssl
import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.core.authn import Caller, CallerAuthenticator
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
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return []
    leaf_der = ssl_object.getpeercert(binary_form=True)
    if not leaf_der:
        return []
    # Python 3.13 has SSLObject.get_unverified_chain(); 3.11/3.12 have it on the C object.
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None
    )
    presented: Sequence[bytes] = [leaf_der]
    if getter is not None:
        presented = [_der(cert) for cert in (getter() or [])] or [leaf_der]
    chain = [x509.load_der_x509_certificate(der) for der in presented]
    # OpenSSL puts the leaf first; make sure of it, whatever the accessor returned.
    if chain[0].public_bytes(Encoding.DER) != leaf_der:
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


def make_auth_middleware(
    *,
    authenticator: CallerAuthenticator,
    now: Callable[[], datetime],
    rejections: RejectionAuditor | None = None,
) -> Middleware:
    """Middleware that authenticates every non-public request, or answers 401/403 (and
    records ``identity.rejected`` through ``rejections``)."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        try:
            caller = authenticator.authenticate(
                peer_chain=peer_chain(request),
                authorization=request.headers.get("Authorization"),
                now=now(),
            )
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
