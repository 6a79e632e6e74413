"""Where an OIDC issuer's signing keys come from, feeding one ``core.oidc.OidcVerifier``.

:class:`OidcJwksSource` loads one issuer's JWK Set from a file or an ``https`` URL, parses it
strictly (``core.oidc.parse_oidc_jwks``) and installs it whole, so a key the IdP removed stops
verifying after the next refresh. The URL is fetched with aiohttp and Web PKI server
authentication (``ssl_context``, default: the system roots with hostname checking); redirects
are not followed (a JWKS moved elsewhere, to plain HTTP or another host, is a failed refresh,
never a new source of keys); bodies above ``max_bytes`` (counted after decompression) or slower
than ``timeout`` fail the refresh.

A failed refresh installs nothing: the last good key set stays until it is older than the
issuer's ``max_key_age``, and then the verifier fails closed (``oidc.keys_stale``). Each
failure is logged with its reason and ``alert=True``; each skipped JWK entry with its reason.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import structlog

from broker.core.oidc import (
    DEFAULT_MAX_JWKS_BYTES,
    MIN_JWKS_REFRESH,
    OidcIssuerConfig,
    OidcKeySet,
    OidcVerifier,
    parse_oidc_jwks,
)
from broker.core.untrusted import printable
from broker.errors import ConfigurationError, UnavailableError

__all__ = ["DEFAULT_FETCH_TIMEOUT", "OidcJwksSource"]

_log = structlog.get_logger("broker.oidc")

DEFAULT_FETCH_TIMEOUT = timedelta(seconds=10)
_CHUNK_BYTES = 16 * 1024


class OidcJwksSource:
    """The JWK Set of one OIDC issuer (``config``), installed into ``verifier``.

    Exactly one of ``config.jwks_file`` (relative paths resolve against ``base_dir``, default
    the working directory) and ``config.jwks_url`` is set; a URL source needs ``session``.
    :meth:`refresh_once` fetches, parses and installs once; :meth:`run` does so every
    ``config.refresh``, backing off with jitter after failures. ``now`` stamps each install
    (the verifier's staleness clock); ``sleep`` is the pause between refreshes.
    """

    def __init__(
        self,
        *,
        config: OidcIssuerConfig,
        verifier: OidcVerifier,
        now: Callable[[], datetime],
        session: aiohttp.ClientSession | None = None,
        ssl_context: ssl.SSLContext | None = None,
        base_dir: Path | None = None,
        max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        timeout: timedelta = DEFAULT_FETCH_TIMEOUT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if config.issuer not in verifier.issuers:
            raise ConfigurationError(
                f"JWKS source for {config.issuer!r}: the verifier does not know this issuer"
            )
        remote: tuple[str, aiohttp.ClientSession] | None = None
        if config.jwks_url is not None:
            if session is None:
                raise ConfigurationError(
                    f"JWKS source for {config.issuer!r}: jwks_url needs an aiohttp session"
                )
            remote = (config.jwks_url, session)
        if max_bytes < 1 or timeout <= timedelta(0):
            raise ConfigurationError(
                f"JWKS source for {config.issuer!r}: max_bytes {max_bytes} and timeout "
                f"{timeout} must be positive"
            )
        self.config = config
        self._verifier = verifier
        self._now = now
        self._remote = remote
        self._ssl = ssl_context or ssl.create_default_context()
        self._path = (
            None
            if config.jwks_file is None
            else (base_dir or Path()).joinpath(Path(config.jwks_file).expanduser())
        )
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._sleep = sleep
        self.failures = 0
        """Consecutive failed refreshes (0 after a success)."""

    @property
    def location(self) -> str:
        """Where the keys are read from: the URL or the file path."""
        return self.config.jwks_url or str(self._path)

    async def refresh_once(self) -> OidcKeySet:
        """Fetch, parse and install the key set once; raise on any failure (nothing installed).

        Raises :class:`~broker.errors.UnavailableError` with an ``oidc_jwks.*`` reason.
        """
        if self._remote is not None:
            data = await self._fetch(*self._remote)
        elif self._path is not None:
            data = await self._read_file(self._path)
        else:  # pragma: no cover - OidcIssuerConfig guarantees exactly one source
            raise AssertionError("JWKS source has neither a file nor a URL")
        key_set = parse_oidc_jwks(self.config.issuer, data, max_bytes=self._max_bytes)
        self._verifier.install_keys(self.config.issuer, key_set, fetched_at=self._now())
        for skipped in key_set.skipped:
            _log.warning(
                "oidc.jwk_skipped",
                issuer=self.config.issuer,
                source=self.location,
                index=skipped.index,
                reason=skipped.reason,
                detail=skipped.detail,
            )
        _log.info(
            "oidc.keys_installed",
            issuer=self.config.issuer,
            source=self.location,
            kids=sorted(key_set.keys),
            skipped=len(key_set.skipped),
        )
        return key_set

    async def run(self) -> None:
        """Refresh forever; a failed refresh keeps the last good keys and backs off."""
        while True:
            try:
                await self.refresh_once()
                self.failures = 0
                delay = self.config.refresh.total_seconds()
            except UnavailableError as exc:
                self.failures += 1
                _log.error(
                    "oidc.keys_refresh_failed",
                    issuer=self.config.issuer,
                    source=self.location,
                    reason=exc.reason,
                    detail=exc.detail,
                    failures=self.failures,
                    alert=True,
                )
                # Retry sooner than the regular cadence, so one blip does not age the keys
                # by a whole period; jitter keeps replicas from retrying in step.
                backoff = min(
                    MIN_JWKS_REFRESH.total_seconds() * 2 ** min(self.failures - 1, 10),
                    self.config.refresh.total_seconds(),
                )
                delay = backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
            await self._sleep(delay)

    async def _read_file(self, path: Path) -> bytes:
        def read() -> bytes:
            # Read one byte past the limit instead of trusting the file size (it may grow).
            with path.open("rb") as handle:
                return handle.read(self._max_bytes + 1)

        try:
            data = await asyncio.to_thread(read)
        except OSError as exc:
            raise UnavailableError(
                f"cannot read the JWKS file of {self.config.issuer!r} at {str(path)!r} "
                f"({type(exc).__name__})",
                reason="oidc_jwks.file_unreadable",
            ) from exc
        self._check_size(len(data))
        return data

    async def _fetch(self, url: str, session: aiohttp.ClientSession) -> bytes:
        try:
            async with session.get(
                url,
                ssl=self._ssl,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout.total_seconds()),
                headers={"Accept": "application/jwk-set+json, application/json"},
            ) as response:
                if 300 <= response.status < 400:
                    raise UnavailableError(
                        f"JWKS endpoint of {self.config.issuer!r} answered {response.status} "
                        f"to {printable(response.headers.get('Location', ''), 120)}; "
                        "redirects are not followed",
                        reason="oidc_jwks.redirect_refused",
                    )
                if response.status != 200:
                    raise UnavailableError(
                        f"JWKS endpoint of {self.config.issuer!r} answered {response.status}, "
                        "expected 200",
                        reason="oidc_jwks.endpoint_status",
                    )
                if response.content_length is not None:
                    self._check_size(response.content_length)
                body = bytearray()
                # StreamReader.read(n) returns whatever is buffered (possibly less than n), so
                # read chunk by chunk and stop as soon as the budget is exceeded.
                async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                    body += chunk
                    self._check_size(len(body))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UnavailableError(
                f"JWKS endpoint of {self.config.issuer!r} failed: {type(exc).__name__}: "
                f"{printable(exc, 200)}",
                reason="oidc_jwks.endpoint_unreachable",
            ) from exc
        return bytes(body)

    def _check_size(self, size: int) -> None:
        if size > self._max_bytes:
            raise UnavailableError(
                f"JWKS of {self.config.issuer!r} from {self.location} is larger than "
                f"{self._max_bytes} bytes; not parsed",
                reason="oidc_jwks.too_large",
            )
