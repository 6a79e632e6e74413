"""The broker's own identity and trust bundles from the SPIFFE Workload API (a SPIRE agent).

Wraps py-spiffe's ``X509Source`` and ``JwtSource`` (blocking, thread-based) behind async
methods. The X.509 source streams updates: the broker's SVID rotates and bundles refresh
without a restart; subscribers (the TLS context, the trust store) are told on every update.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffe.errors import PySpiffeError

from broker.core.ports import CheckResult
from broker.core.untrusted import printable
from broker.errors import BundleUnavailableError

_S = TypeVar("_S")


@dataclass(frozen=True, slots=True)
class OwnSvid:
    """The broker's current X.509-SVID: leaf first, then intermediates; and its key."""

    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes = field(repr=False)


@dataclass(frozen=True, slots=True)
class WorkloadApiBundles:
    """Trust bundles as the Workload API last delivered them, per trust domain name."""

    x509_authorities: dict[str, tuple[x509.Certificate, ...]]
    jwt_authorities: dict[str, dict[str, PublicKeyTypes]]
    received_at: datetime


class WorkloadApiSource:  # satisfies the broker's own-identity needs (TLS, Vault login, bundles)
    """The broker's X.509-SVID, JWT-SVIDs and bundles from one Workload API socket."""

    def __init__(self, *, socket_path: str, timeout_seconds: float = 15.0) -> None:
        if socket_path and not socket_path.startswith(("unix:", "tcp:")):
            socket_path = f"unix://{socket_path}"
        self._socket_path = socket_path or None
        self._timeout = timeout_seconds
        self._client: WorkloadApiClient | None = None
        self._x509: X509Source | None = None
        self._jwt: JwtSource | None = None
        self._subscribers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._updated_at: datetime | None = None

    async def start(self) -> None:
        """Connect and wait for the first SVID and bundles."""
        await asyncio.to_thread(self._start_blocking)

    def _start_blocking(self) -> None:
        try:
            self._client = WorkloadApiClient(self._socket_path)
            self._x509 = X509Source(
                workload_api_client=self._client, timeout_in_seconds=self._timeout
            )
            self._jwt = JwtSource(
                workload_api_client=self._client, timeout_in_seconds=self._timeout
            )
        except PySpiffeError as exc:
            self.close()
            raise BundleUnavailableError(
                f"cannot get the broker's SVID from the Workload API at "
                f"{printable(self._socket_path)}: {printable(exc)}",
                reason="workload_api.unavailable",
            ) from exc
        self._updated_at = datetime.now(UTC)
        self._x509.subscribe_for_updates(self._on_update)
        self._jwt.subscribe_for_updates(self._on_update)

    def _on_update(self) -> None:
        with self._lock:
            self._updated_at = datetime.now(UTC)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from a Workload API thread) after every SVID or bundle update."""
        with self._lock:
            self._subscribers.append(callback)

    def own_svid(self) -> OwnSvid:
        """The current default X.509-SVID of the broker."""
        source = self._require(self._x509)
        try:
            svid = source.get_x509_context().default_svid
        except PySpiffeError as exc:
            raise BundleUnavailableError(
                f"the Workload API source failed: {printable(exc)}",
                reason="workload_api.failed",
            ) from exc
        return OwnSvid(
            spiffe_id=str(svid.spiffe_id),
            chain=tuple(svid.cert_chain),
            private_key=svid.private_key,
        )

    def bundles(self) -> WorkloadApiBundles:
        """The X.509 and JWT authorities of every trust domain the Workload API delivered."""
        x509_source = self._require(self._x509)
        jwt_source = self._require(self._jwt)
        try:
            x509_bundles = x509_source.get_x509_context().x509_bundle_set.bundles
            jwt_bundles = jwt_source.bundles
        except PySpiffeError as exc:
            raise BundleUnavailableError(
                f"the Workload API source failed: {printable(exc)}",
                reason="workload_api.failed",
            ) from exc
        with self._lock:
            received_at = self._updated_at or datetime.now(UTC)
        return WorkloadApiBundles(
            x509_authorities={b.trust_domain.name: tuple(b.x509_authorities) for b in x509_bundles},
            jwt_authorities={b.trust_domain.name: dict(b.jwt_authorities) for b in jwt_bundles},
            received_at=received_at,
        )

    async def fetch_jwt_svid(self, audience: str) -> str:
        """A fresh JWT-SVID of the broker for ``audience`` (e.g. OpenBao's JWT auth)."""
        source = self._require(self._jwt)

        def fetch() -> str:
            try:
                return source.fetch_svid(audience={audience}, timeout=self._timeout).token
            except PySpiffeError as exc:
                raise BundleUnavailableError(
                    f"cannot fetch a JWT-SVID for audience {printable(audience)}: {printable(exc)}",
                    reason="workload_api.jwt_fetch_failed",
                ) from exc

        return await asyncio.to_thread(fetch)

    def close(self) -> None:
        """Stop streaming and close the connection."""
        for source in (self._x509, self._jwt):
            if source is not None:
                source.close()
        if self._client is not None:
            self._client.close()
        self._x509 = self._jwt = None
        self._client = None

    @staticmethod
    def _require(source: _S | None) -> _S:
        if source is None:
            raise BundleUnavailableError(
                "the Workload API source is not started or was closed",
                reason="workload_api.not_started",
            )
        return source


class WorkloadApiReadiness:  # satisfies core.ports.ReadinessCheck
    """Ready when the broker has a valid SVID and the bundles were refreshed recently."""

    name = "trust_bundles"

    def __init__(self, source: WorkloadApiSource, *, max_age_seconds: int) -> None:
        self._source = source
        self._max_age = max_age_seconds

    async def check(self, now: datetime) -> CheckResult:
        """The SVID must be inside its validity and the last update within ``max_age``."""
        svid = self._source.own_svid()
        bundles = self._source.bundles()
        leaf = svid.chain[0]
        if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
            return CheckResult(self.name, ok=False, detail="the broker's own SVID is not valid now")
        age = (now - bundles.received_at).total_seconds()
        if age > self._max_age:
            return CheckResult(
                self.name,
                ok=False,
                detail=f"trust bundles are {int(age)} s old, the limit is {self._max_age} s",
            )
        domains = sorted(set(bundles.x509_authorities) | set(bundles.jwt_authorities))
        return CheckResult(
            self.name,
            ok=True,
            detail=f"SVID {svid.spiffe_id} valid until {leaf.not_valid_after_utc.isoformat()}; "
            f"bundles for {', '.join(domains)} updated {int(age)} s ago",
        )
