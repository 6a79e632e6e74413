"""Server TLS with the broker's own X.509-SVID, rotated without a restart.

The listening socket is created once with a base ``ssl.SSLContext``; every handshake's SNI
callback (called with or without an SNI extension) switches the connection to the *current*
context, rebuilt whenever the Workload API delivers a new SVID or new bundles. So a rotated
SVID is served and a removed root stops being accepted without restarting the listener.

Client certificates are optional: OpenSSL checks that a presented chain ends at one of the
trusted roots and that the client holds the leaf's key (the handshake is the proof of
possession). That store is the union of the trust domains' roots, which is only the first
gate: the request layer re-verifies the chain against the bundle of the leaf's *own* trust
domain with the strict SPIFFE rules (``broker.core.x509svid``).

The private key never touches the disk: it is handed to OpenSSL through an anonymous
in-memory file (``memfd_create``) that is closed right after loading.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


@contextlib.contextmanager
def _memfd_path(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("tasklease-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _pem_chain(chain: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)


def build_server_context(
    *,
    chain: Iterable[x509.Certificate],
    private_key: PrivateKeyTypes,
    client_roots: Iterable[x509.Certificate],
) -> ssl.SSLContext:
    """A TLS 1.2+ server context serving ``chain`` and asking for an optional client cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with _memfd_path(_pem_chain(chain) + key_pem) as path:
        context.load_cert_chain(certfile=path)
    del key_pem
    roots = _pem_chain(client_roots)
    if roots:
        context.load_verify_locations(cadata=roots.decode("ascii"))
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        # No trusted roots at all: accept no client certificates (JWT-SVID bearer only).
        context.verify_mode = ssl.CERT_NONE
    return context


class RotatingServerTls:
    """Holds the current server context; ``listener_context`` switches each handshake to it."""

    def __init__(self, initial: ssl.SSLContext) -> None:
        self._lock = threading.Lock()
        self._current = initial
        self._base = initial
        self._base.sni_callback = self._pick_current
        self.rotations = 0

    @property
    def listener_context(self) -> ssl.SSLContext:
        """The context to give the listening socket (it never changes)."""
        return self._base

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes use."""
        with self._lock:
            return self._current

    def replace(self, context: ssl.SSLContext) -> None:
        """Use ``context`` for every handshake from now on."""
        context.sni_callback = self._pick_current
        with self._lock:
            self._current = context
            self.rotations += 1

    def _pick_current(
        self, ssl_object: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        current = self.current
        if ssl_object.context is not current:
            ssl_object.context = current


def failure_code(exc: BaseException) -> str:
    """A client failure in a few words for an error message: the exception's type, and when
    TLS failed behind it (the libraries raise their own error while handling OpenSSL's) what
    OpenSSL said: ``ConnectionError, TLS CERTIFICATE_VERIFY_FAILED: Hostname mismatch, …``.
    Never a URL or anything sent."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:
        # OpenSSL's own errors carry a reason; a library's subclass of ssl.SSLError (aiohttp's
        # ClientConnectorCertificateError) may not, and chains the real one.
        reason = getattr(cause, "reason", None) if isinstance(cause, ssl.SSLError) else None
        if reason:
            detail = getattr(cause, "verify_message", None)
            said = f"{reason}: {detail}" if detail else str(reason)
            return f"{type(exc).__name__}, TLS {said}"
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return type(exc).__name__
