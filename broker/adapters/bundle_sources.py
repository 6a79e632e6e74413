"""Where trust bundles come from, per trust domain, feeding one ``core.bundle.TrustStore``.

Three sources (SPIFFE Trust Domain and Bundle; SPIFFE Federation):

* :class:`WorkloadApiBundleFeed` — the bundles the local SPIRE agent streams (the broker's own
  trust domain, plus whatever SPIRE federates with). A domain the agent stops delivering is
  removed: the federation relationship ended (Federation §6.3).
* :class:`StaticBundleFile` — a SPIFFE bundle (JWKS) file per trust domain, re-read on a
  cadence so that an edit (a key removed) takes effect and the bundle stays fresh while the
  file is readable.
* :class:`FederationEndpointSource` — a bundle endpoint with the ``https_web`` profile (Web PKI
  server authentication), refreshed on the bundle's ``spiffe_refresh_hint``.

Failures never install anything: the last good bundle stays until it goes stale, and then the
store fails closed (``bundle.stale``). Each refusal is logged with its reason and
``alert=True``. Logs carry counts, sequence numbers and reason codes, never a bundle body;
values that came from the network pass through :func:`~broker.core.untrusted.printable`.

Every store update runs on the event loop thread. ``TrustStore`` swaps snapshots without a
lock, so two threads replacing at once could lose an update (a removed domain coming back);
the Workload API's callbacks, which arrive on py-spiffe threads, are therefore handed to the
loop instead of touching the store themselves.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog

from broker.adapters.workload_api import WorkloadApiBundles
from broker.core.bundle import (
    DEFAULT_MAX_BUNDLE_BYTES,
    ReplaceOutcome,
    TrustBundle,
    TrustStore,
    parse_spiffe_bundle,
)
from broker.core.spiffe_id import TrustDomain
from broker.core.untrusted import printable
from broker.errors import BundleUnavailableError, ConfigurationError, SpiffeIdError

__all__ = [
    "DEFAULT_REFRESH",
    "MAX_REFRESH",
    "MIN_REFRESH",
    "FederationEndpointSource",
    "FetchResult",
    "StaticBundleFile",
    "WorkloadApiBundleFeed",
    "WorkloadApiBundleSource",
]

_log = structlog.get_logger("broker.bundles")

DEFAULT_REFRESH: Final = timedelta(minutes=5)
"""Refresh interval when a bundle carries no ``spiffe_refresh_hint``."""
MIN_REFRESH: Final = timedelta(seconds=5)
MAX_REFRESH: Final = timedelta(hours=1)
DEFAULT_MAX_REDIRECTS: Final = 3

# RFC 9110 §15.4: the statuses that carry a Location to follow. 300 and 304 do not.
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# Asking for the identity encoding keeps the byte limit a limit on what the server sends;
# aiohttp still decodes a compressed body it was sent anyway, and the limit then applies to
# the decoded bytes.
_REQUEST_HEADERS: Final = {"Accept": "application/json", "Accept-Encoding": "identity"}


class WorkloadApiBundleSource(Protocol):
    """What :class:`WorkloadApiBundleFeed` needs from the Workload API adapter.

    Satisfied by :class:`broker.adapters.workload_api.WorkloadApiSource`.
    """

    def bundles(self) -> WorkloadApiBundles:
        """The authorities of every trust domain the Workload API currently delivers."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) after every update."""
        ...


def _report(
    trust_domain: TrustDomain, source: str, bundle: TrustBundle, outcome: ReplaceOutcome
) -> None:
    for skipped in bundle.skipped:
        # ``detail`` was escaped by the parser; it names the defect, never the key material.
        _log.warning(
            "bundle.key_skipped",
            trust_domain=trust_domain.name,
            source=source,
            index=skipped.index,
            reason=skipped.reason,
            detail=skipped.detail,
            alert=True,
        )
    if outcome.kept_old:
        _log.error(
            "bundle.update_refused",
            trust_domain=trust_domain.name,
            source=source,
            outcome=outcome.value,
            refused_sequence=bundle.sequence_number,
            alert=True,
        )
    elif outcome is ReplaceOutcome.INSTALLED:
        _log.info(
            "bundle.installed",
            trust_domain=trust_domain.name,
            source=source,
            x509_authorities=len(bundle.x509_authorities),
            jwt_authorities=len(bundle.jwt_authorities),
            sequence=bundle.sequence_number,
        )


def _positive(name: str, value: timedelta) -> timedelta:
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise ConfigurationError(f"{name} is {value!r}, expected a positive duration")
    return value


# --------------------------------------------------------------------------------------------
# Workload API


class WorkloadApiBundleFeed:
    """Installs the Workload API's bundles into the store on start and on every update.

    Updates arrive on a Workload API thread; each is scheduled onto the event loop that was
    running when :meth:`start` was called, so the store is only ever written from that loop.
    """

    def __init__(
        self, *, source: WorkloadApiBundleSource, store: TrustStore, now: Callable[[], datetime]
    ) -> None:
        self._source = source
        self._store = store
        self._now = now
        self._managed: frozenset[TrustDomain] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def trust_domains(self) -> frozenset[TrustDomain]:
        """The trust domains this feed installed and still manages."""
        return self._managed

    def start(self) -> None:
        """Install the current bundles and follow updates; call on the event loop thread.

        Raises :class:`BundleUnavailableError` when the Workload API has no bundles to give:
        a broker that cannot learn its own trust domain must not start.
        """
        self._loop = asyncio.get_running_loop()
        self.sync()
        self._source.subscribe(self._on_update)

    def _on_update(self) -> None:
        # Runs on a py-spiffe thread: hand the work to the loop, never touch the store here.
        loop = self._loop
        if loop is None:  # pragma: no cover - subscribe() only happens after _loop is set
            return
        try:
            loop.call_soon_threadsafe(self._sync_logged)
        except RuntimeError:
            # The loop is closed: the broker is shutting down and nothing verifies any more.
            _log.warning("bundle.update_dropped", source="workload_api", detail="loop closed")

    def _sync_logged(self) -> None:
        try:
            self.sync()
        except BundleUnavailableError as exc:
            # Keep the last good bundles; they go stale (and fail closed) on their own.
            _log.error(
                "bundle.refresh_failed",
                source="workload_api",
                reason=exc.reason,
                detail=exc.detail,
                alert=True,
            )

    def sync(self) -> None:
        """Install what the Workload API holds now; drop domains it no longer delivers.

        Call on the event loop thread. Raises :class:`BundleUnavailableError` (and changes
        nothing) when the Workload API cannot be read.
        """
        delivered = self._source.bundles()
        names = set(delivered.x509_authorities) | set(delivered.jwt_authorities)
        seen: set[TrustDomain] = set()
        now = self._now()
        for name in sorted(names):
            try:
                trust_domain = TrustDomain(name)
            except SpiffeIdError as exc:
                _log.error(
                    "bundle.bad_trust_domain",
                    source="workload_api",
                    name=printable(name, 300),
                    reason=exc.reason,
                    alert=True,
                )
                continue
            try:
                bundle = TrustBundle.from_authorities(
                    trust_domain,
                    x509_authorities=delivered.x509_authorities.get(name, ()),
                    jwt_authorities=delivered.jwt_authorities.get(name, {}),
                )
            except BundleUnavailableError as exc:
                # from_authorities skips bad entries, so this is not expected; if it happens,
                # the domain keeps its last good bundle rather than being dropped.
                _log.error(
                    "bundle.update_refused",
                    trust_domain=trust_domain.name,
                    source="workload_api",
                    reason=exc.reason,
                    detail=exc.detail,
                    alert=True,
                )
                if trust_domain in self._managed:
                    seen.add(trust_domain)
                continue
            _report(trust_domain, "workload_api", bundle, self._store.replace(bundle, now))
            seen.add(trust_domain)
        for gone in sorted(self._managed - seen, key=lambda td: td.name):
            self._store.remove(gone)
            _log.warning("bundle.removed", trust_domain=gone.name, source="workload_api")
        self._managed = frozenset(seen)


# --------------------------------------------------------------------------------------------
# Static file


class StaticBundleFile:
    """A SPIFFE bundle file for one trust domain, re-read every ``reload_every``.

    Only a regular file is read, and at most ``max_bytes`` + 1 bytes of it: a path that points
    at a FIFO or a device cannot hang or exhaust the broker.
    """

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        path: Path,
        store: TrustStore,
        now: Callable[[], datetime],
        reload_every: timedelta = timedelta(seconds=60),
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    ) -> None:
        if max_bytes < 1:
            raise ConfigurationError(f"bundle file max_bytes is {max_bytes}, expected at least 1")
        self.trust_domain = trust_domain
        self._path = Path(path)
        self._store = store
        self._now = now
        self._reload_every = _positive("bundle file reload_every", reload_every)
        self._max_bytes = max_bytes
        self._source = printable(f"file:{self._path}", 300)

    def load(self) -> ReplaceOutcome:
        """Read and install the file; raise :class:`BundleUnavailableError` if unusable.

        Blocking (a small local read); :meth:`reload` does the read off the event loop.
        """
        return self._install(self._read())

    async def reload(self) -> ReplaceOutcome:
        """:meth:`load`, with the file read in a worker thread and the install on the loop."""
        data = await asyncio.to_thread(self._read)
        return self._install(data)

    async def run(self) -> None:
        """Reload forever, starting one interval from now (call :meth:`load` first).

        A failed reload keeps the last good bundle and logs why.
        """
        while True:
            await asyncio.sleep(self._reload_every.total_seconds())
            try:
                await self.reload()
            except BundleUnavailableError as exc:
                _log.error(
                    "bundle.reload_failed",
                    trust_domain=self.trust_domain.name,
                    source=self._source,
                    reason=exc.reason,
                    detail=exc.detail,
                    alert=True,
                )

    def _read(self) -> bytes:
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
            fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise self._unreadable(type(exc).__name__) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._unreadable("not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as file:
                # One byte over the limit is enough for the parser to refuse it as too large.
                return file.read(self._max_bytes + 1)
        except OSError as exc:
            raise self._unreadable(type(exc).__name__) from exc
        finally:
            os.close(fd)

    def _unreadable(self, why: str) -> BundleUnavailableError:
        return BundleUnavailableError(
            f"cannot read the bundle file for {self.trust_domain} at "
            f"{printable(str(self._path), 300)} ({why})",
            reason="bundle.file_unreadable",
        )

    def _install(self, data: bytes) -> ReplaceOutcome:
        bundle = parse_spiffe_bundle(self.trust_domain, data, max_bytes=self._max_bytes)
        outcome = self._store.replace(bundle, self._now())
        _report(self.trust_domain, self._source, bundle, outcome)
        return outcome


# --------------------------------------------------------------------------------------------
# Federation endpoint (https_web)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """One refresh of a federation endpoint."""

    outcome: ReplaceOutcome
    next_refresh: timedelta
    """The fetched bundle's refresh hint, clamped (see :class:`FederationEndpointSource`)."""


def _origin(url: str) -> tuple[str, str, int]:
    """Scheme, lower-case host and effective port of ``url``; ValueError if malformed."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("no host")
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname.lower(), parts.port or default_port


class FederationEndpointSource:
    """A SPIFFE bundle endpoint, ``https_web`` profile (SPIFFE Federation §5.2.1).

    The server is authenticated with Web PKI (``ssl_context``, default: the system roots; a
    context that does not require a certificate and check the host name is refused).

    Redirects (§5.2.1.4: clients SHOULD follow one to a valid bundle endpoint URL) are followed
    only to ``https`` on the same host and port as the configured URL, without userinfo, at
    most ``max_redirects`` times and never to a URL already visited; the next refresh starts
    from the configured URL again. Anything else — a redirect to plain HTTP or another host, a
    loop, any status but 200 — fails the refresh with ``bundle.endpoint_status``. A body over
    ``max_bytes`` fails with ``bundle.endpoint_too_large``; a refresh (all hops and the body)
    slower than ``timeout``, or a TLS or connection failure, with
    ``bundle.endpoint_unreachable``. A failed refresh installs nothing.

    :meth:`run` refreshes on the bundle's refresh hint, clamped to [``min_refresh``, ceiling]
    where the ceiling is ``max_refresh`` or half the store's staleness limit for the domain,
    whichever is smaller (so a missed refresh can be retried before the bundle goes stale).
    After a failure, or an update the store refused, it retries with jittered exponential
    backoff starting at twice ``min_refresh`` and capped at half the ceiling.
    """

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        url: str,
        store: TrustStore,
        now: Callable[[], datetime],
        ssl_context: ssl.SSLContext | None = None,
        max_bytes: int = 256 * 1024,
        timeout: timedelta = timedelta(seconds=10),
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        min_refresh: timedelta = MIN_REFRESH,
        max_refresh: timedelta = MAX_REFRESH,
        default_refresh: timedelta = DEFAULT_REFRESH,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        try:
            parts = urlsplit(url)
            origin: tuple[str, str, int] | None = _origin(url)
        except ValueError:
            origin = None
        if origin is not None and (parts.username is not None or parts.password is not None):
            # §5.2.1.1: MUST NOT include userinfo (and a password would end up in logs, so
            # this message does not echo the URL).
            raise ConfigurationError(
                f"federation endpoint URL for {trust_domain} must not contain userinfo"
            )
        if origin is None or origin[0] != "https":
            raise ConfigurationError(
                f"federation endpoint for {trust_domain} must be an https:// URL with a host "
                f"(https_web profile), got {printable(url)}"
            )
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:
            # §5.2.1.4: the server certificate MUST be validated per RFC 6125.
            raise ConfigurationError(
                f"the TLS context for the bundle endpoint of {trust_domain} must verify the "
                "server certificate and its host name (https_web profile)"
            )
        if max_bytes < 1:
            raise ConfigurationError(f"bundle endpoint max_bytes is {max_bytes}, expected >= 1")
        if not 0 <= max_redirects <= 10:
            raise ConfigurationError(f"max_redirects is {max_redirects}, expected 0..10")
        _positive("bundle endpoint timeout", timeout)
        _positive("min_refresh", min_refresh)
        _positive("default_refresh", default_refresh)
        if _positive("max_refresh", max_refresh) < min_refresh:
            raise ConfigurationError(
                f"max_refresh {max_refresh} is below min_refresh {min_refresh}"
            )
        self.trust_domain = trust_domain
        self.url = url
        self._origin = origin
        self._source = printable(url, 300)
        self._store = store
        self._now = now
        self._ssl = context
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._max_redirects = max_redirects
        self._min_refresh = min_refresh
        self._max_refresh = max_refresh
        self._default_refresh = default_refresh
        self._sleep = sleep
        self._failures = 0

    @property
    def failures(self) -> int:
        """Consecutive failed (or refused) refreshes in :meth:`run`; 0 after a good one."""
        return self._failures

    async def refresh_once(self, session: aiohttp.ClientSession) -> FetchResult:
        """Fetch, parse and install the bundle once; raise on any failure (nothing installed).

        A bundle the store refuses (sequence regressed or reused) is not an exception: the
        result's ``outcome`` says ``kept_old`` and the refusal is logged as an alert.
        """
        body = await self._fetch(session)
        bundle = parse_spiffe_bundle(self.trust_domain, body, max_bytes=self._max_bytes)
        outcome = self._store.replace(bundle, self._now())
        _report(self.trust_domain, self._source, bundle, outcome)
        return FetchResult(outcome, self._next_refresh(bundle))

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Refresh now and then forever on the hint; back off (with jitter) after failures."""
        while True:
            try:
                result = await self.refresh_once(session)
            except BundleUnavailableError as exc:
                self._failed(exc.reason, exc.detail)
                delay = self._backoff()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one refresh
                self._failed(
                    "bundle.refresh_crashed", f"{type(exc).__name__}: {printable(str(exc))}"
                )
                delay = self._backoff()
            else:
                if result.outcome.kept_old:
                    self._failures += 1  # _report already alerted
                    delay = self._backoff()
                else:
                    self._failures = 0
                    delay = result.next_refresh.total_seconds()
            await self._sleep(delay)

    # ---- scheduling

    def _ceiling(self) -> timedelta:
        half_staleness = self._store.max_staleness_of(self.trust_domain) / 2
        return max(self._min_refresh, min(self._max_refresh, half_staleness))

    def _next_refresh(self, bundle: TrustBundle) -> timedelta:
        # `is not None`: a hint of 0 means "as often as allowed", not "use the default".
        hint = bundle.refresh_hint if bundle.refresh_hint is not None else self._default_refresh
        return min(max(hint, self._min_refresh), self._ceiling())

    def _backoff(self) -> float:
        cap = max(self._min_refresh, self._ceiling() / 2)
        base = min(self._min_refresh * (1 << min(self._failures, 16)), cap)
        jittered = base.total_seconds() * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
        return max(self._min_refresh.total_seconds(), jittered)

    def _failed(self, reason: str, detail: str) -> None:
        self._failures += 1
        _log.error(
            "bundle.refresh_failed",
            trust_domain=self.trust_domain.name,
            source=self._source,
            reason=reason,
            detail=detail,
            failures=self._failures,
            alert=True,
        )

    # ---- HTTP

    async def _fetch(self, session: aiohttp.ClientSession) -> bytes:
        seconds = self._timeout.total_seconds()
        try:
            # One budget for every hop and the whole body: a server that drips bytes cannot
            # hold a refresh open by resetting a per-read timer.
            async with asyncio.timeout(seconds):
                return await self._follow(session, seconds)
        except TimeoutError as exc:
            raise BundleUnavailableError(
                f"bundle endpoint for {self.trust_domain} did not deliver a bundle within "
                f"{self._timeout}",
                reason="bundle.endpoint_unreachable",
            ) from exc
        except aiohttp.ClientError as exc:
            raise BundleUnavailableError(
                f"bundle endpoint for {self.trust_domain} failed: {type(exc).__name__}: "
                f"{printable(str(exc))}",
                reason="bundle.endpoint_unreachable",
            ) from exc

    async def _follow(self, session: aiohttp.ClientSession, seconds: float) -> bytes:
        url = self.url
        visited = {url.partition("#")[0]}
        for _ in range(self._max_redirects + 1):
            async with session.get(
                url,
                ssl=self._ssl,
                allow_redirects=False,
                headers=_REQUEST_HEADERS,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                if response.status in _REDIRECT_STATUSES:
                    url = self._redirect_target(url, response.headers.get("Location"))
                    if url in visited:
                        raise self._status_error(
                            f"redirected back to {printable(url)} (a redirect loop)"
                        )
                    visited.add(url)
                    continue
                if response.status != 200:
                    raise self._status_error(f"answered HTTP {response.status}, expected 200")
                return await self._read_body(response)
        raise self._status_error(f"redirected more than {self._max_redirects} times")

    def _redirect_target(self, current: str, location: str | None) -> str:
        if location is None:
            raise self._status_error("sent a redirect without a Location")
        try:
            target = urljoin(current, location).partition("#")[0]
            parts = urlsplit(target)
            origin = _origin(target)
        except ValueError:
            raise self._status_error(
                f"redirected to a malformed URL {printable(location)}"
            ) from None
        if parts.username is not None or parts.password is not None:
            raise self._status_error("redirected to a URL with userinfo, refused")
        if origin[0] != "https":
            raise self._status_error(
                f"redirected to {printable(target)}: plain HTTP or another scheme is refused"
            )
        if origin != self._origin:
            raise self._status_error(
                f"redirected to {printable(target)}: another host or port than the configured "
                "endpoint is refused"
            )
        return target

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            raise self._too_large(f"declared a body of {declared} bytes")
        # StreamReader.read(n) returns whatever is buffered (up to n), not n bytes: read until
        # EOF, and stop as soon as one byte more than the limit has arrived.
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.read(self._max_bytes + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_bytes:
                raise self._too_large("sent a larger body")
        return b"".join(chunks)

    def _status_error(self, what: str) -> BundleUnavailableError:
        return BundleUnavailableError(
            f"bundle endpoint for {self.trust_domain} {what}; nothing installed",
            reason="bundle.endpoint_status",
        )

    def _too_large(self, what: str) -> BundleUnavailableError:
        return BundleUnavailableError(
            f"bundle endpoint for {self.trust_domain} {what}, over the limit of "
            f"{self._max_bytes} bytes; nothing installed",
            reason="bundle.endpoint_too_large",
        )
