"""Real mutual-TLS connections in memory: an OpenSSL handshake over ``ssl.MemoryBIO`` pairs, so
tests and benchmarks get the ``ssl.SSLObject`` a server connection really has (peer
certificate, presented chain) without sockets or an event loop.

The test PKI (:mod:`tests.pki`) places certificates around a fixed instant in 2030; OpenSSL
checks dates against the real clock, so :func:`live_pki` issues a root, an intermediate, a
server SVID and client SVIDs valid around *now*.
"""

from __future__ import annotations

import contextlib
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.pki import Authority, make_root, new_key, to_pem


@dataclass(frozen=True)
class Svid:
    """A leaf, the intermediates sent with it, and its key."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey

    @property
    def chain(self) -> list[x509.Certificate]:
        """Leaf first, as a TLS peer presents it."""
        return [self.leaf, *self.intermediates]


@dataclass(frozen=True)
class LivePki:
    """A trust domain's root and intermediate, valid around the real time."""

    root: Authority
    intermediate: Authority

    def svid(
        self,
        spiffe_id: str,
        *,
        lifetime: timedelta = timedelta(hours=1),
        not_before: datetime | None = None,
    ) -> Svid:
        """An X.509-SVID issued by the intermediate (SPIRE-shaped)."""
        key = new_key()
        start = not_before or datetime.now(UTC) - timedelta(minutes=5)
        leaf = self.intermediate.leaf(
            spiffe_id, key=key, not_before=start, not_after=start + lifetime
        )
        return Svid(leaf=leaf, intermediates=(self.intermediate.cert,), key=key)


def live_pki(trust_domain: str = "a.test") -> LivePki:
    """A root and an intermediate of ``trust_domain`` valid from a day ago for a year."""
    now = datetime.now(UTC)
    root = make_root(
        trust_domain, not_before=now - timedelta(days=1), not_after=now + timedelta(days=365)
    )
    intermediate = root.intermediate(
        not_before=now - timedelta(days=1), not_after=now + timedelta(days=30)
    )
    return LivePki(root=root, intermediate=intermediate)


def _load_chain(context: ssl.SSLContext, svid: Svid) -> None:
    key_pem = svid.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.TemporaryDirectory(prefix="tl-mtls-") as workdir:
        path = Path(workdir) / "svid.pem"
        path.write_bytes(to_pem(*svid.chain) + key_pem)
        context.load_cert_chain(certfile=str(path))


def server_context(server: Svid, client_roots: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """A server context like the broker's (TLS 1.2+, optional client certificates)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, server)
    context.load_verify_locations(cadata=to_pem(*client_roots).decode("ascii"))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(client: Svid | None, server_roots: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """A client context presenting ``client`` (or no certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=to_pem(*server_roots).decode("ascii"))
    if client is not None:
        _load_chain(context, client)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """Complete a handshake in memory; the server side's ``SSLObject``."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    client_side = client.wrap_bio(client_in, client_out, server_side=False)
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
                    done[name] = True
        if client_out.pending:
            server_in.write(client_out.read())
        if server_out.pending:
            client_in.write(server_out.read())
        if all(done.values()) and not client_out.pending and not server_out.pending:
            return server_side
    raise RuntimeError("the in-memory TLS handshake did not complete")
