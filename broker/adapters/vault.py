"""OpenBao/Vault through hvac: the broker's own session, health, and (later) minting.

hvac is synchronous; every call goes through ``asyncio.to_thread`` here and nowhere else.
hvac and requests exceptions are translated into :class:`VaultUnavailableError` (chained).

The broker's session: it logs in with its own JWT-SVID (OpenBao JWT auth) — so the broker
holds no long-lived secret — or, for development only, with a token of its policy. The
session is renewed by logging in again before it expires; its remaining TTL is observable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import hvac
import hvac.exceptions
import requests

from broker.config import VaultSettings
from broker.core.ports import CheckResult
from broker.core.untrusted import printable
from broker.errors import VaultUnavailableError


@dataclass(frozen=True, slots=True)
class VaultHealth:
    """What ``sys/health`` and the broker's token lookup say."""

    initialized: bool
    sealed: bool
    standby: bool
    version: str


@dataclass(frozen=True, slots=True)
class BrokerSession:
    """The broker's own token, as far as it is safe to show (never the token itself)."""

    accessor: str
    policies: tuple[str, ...]
    expires_at: datetime
    renewable: bool


class HvacVault:  # the broker's OpenBao/Vault adapter
    """The broker's connection to OpenBao/Vault."""

    def __init__(
        self,
        *,
        settings: VaultSettings,
        jwt_svid: Callable[[str], Awaitable[str]] | None,
        now: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._jwt_svid = jwt_svid
        self._now = now
        self._client = hvac.Client(url=settings.addr, timeout=settings.request_timeout_seconds)
        self._session: BrokerSession | None = None
        self._login_lock = asyncio.Lock()

    @property
    def session(self) -> BrokerSession | None:
        """The broker's current session (accessor, policies, expiry), if logged in."""
        return self._session

    def seconds_to_expiry(self) -> float | None:
        """Seconds until the broker's own token expires (None before the first login)."""
        if self._session is None:
            return None
        return (self._session.expires_at - self._now()).total_seconds()

    async def _call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except hvac.exceptions.VaultDown as exc:
            raise VaultUnavailableError(
                f"{what}: OpenBao is sealed", reason="vault.sealed"
            ) from exc
        except hvac.exceptions.RateLimitExceeded as exc:
            raise VaultUnavailableError(
                f"{what}: OpenBao is rate limiting (429)", reason="vault.rate_limited"
            ) from exc
        except hvac.exceptions.Forbidden as exc:
            raise VaultUnavailableError(
                f"{what}: OpenBao refused the broker (403): {printable(_errors_of(exc))}",
                reason="vault.forbidden",
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise VaultUnavailableError(
                f"{what}: OpenBao answered an error: {printable(_errors_of(exc))}",
                reason="vault.error",
            ) from exc
        except requests.RequestException as exc:
            raise VaultUnavailableError(
                f"{what}: OpenBao at {self._settings.addr} is unreachable ({type(exc).__name__})",
                reason="vault.unreachable",
            ) from exc

    async def health(self) -> VaultHealth:
        """``sys/health``, asking for 200 in every state so the body tells the state."""
        body = await self._call(
            "reading sys/health",
            self._client.sys.read_health_status,
            method="GET",
            standby_ok=True,
            sealed_code=200,
            uninit_code=200,
            standby_code=200,
            performance_standby_code=200,
        )
        if not isinstance(body, dict):
            raise VaultUnavailableError(
                "sys/health answered something that is not JSON", reason="vault.bad_health"
            )
        return VaultHealth(
            initialized=bool(body.get("initialized")),
            sealed=bool(body.get("sealed", True)),
            standby=bool(body.get("standby")),
            version=str(body.get("version", "")),
        )

    async def login(self) -> BrokerSession:
        """Log in (JWT-SVID) or adopt the configured token; then look the session up."""
        async with self._login_lock:
            if self._settings.auth_method == "jwt-svid":
                if self._jwt_svid is None:
                    raise VaultUnavailableError(
                        "vault.auth_method is jwt-svid but no JWT-SVID source is configured",
                        reason="vault.no_jwt_source",
                    )
                token = await self._jwt_svid(self._settings.jwt_audience)
                await self._call(
                    "logging in with the broker's JWT-SVID",
                    self._client.auth.jwt.jwt_login,
                    role=self._settings.jwt_role,
                    jwt=token,
                    path=self._settings.jwt_mount,
                )
            else:
                assert self._settings.token is not None  # checked by VaultSettings  # noqa: S101
                self._client.token = self._settings.token.get_secret_value()
            self._session = await self._lookup_self()
            return self._session

    async def _lookup_self(self) -> BrokerSession:
        response = await self._call(
            "looking up the broker's own token", self._client.auth.token.lookup_self
        )
        data = response["data"]
        ttl = int(data.get("ttl") or 0)
        return BrokerSession(
            accessor=str(data.get("accessor", "")),
            policies=tuple(sorted(data.get("policies") or ())),
            expires_at=self._now() + timedelta(seconds=ttl),
            renewable=bool(data.get("renewable")),
        )

    async def check_session(self) -> BrokerSession:
        """Look the broker's token up again (is it still valid?)."""
        self._session = await self._lookup_self()
        return self._session

    async def keep_session(self, *, poll_seconds: float = 5.0) -> None:
        """Run forever: log in again once less than ``renew_at_fraction`` of the TTL is left.

        A failing renewal is retried at the next poll; readiness reports the remaining TTL,
        so an operator sees a session running out long before it does.
        """
        issued_ttl: float | None = None
        while True:
            remaining = self.seconds_to_expiry()
            if self._session is not None and issued_ttl is None:
                issued_ttl = remaining
            if (
                remaining is None
                or issued_ttl is None
                or remaining < issued_ttl * self._settings.renew_at_fraction
            ):
                with contextlib.suppress(VaultUnavailableError):
                    await self.login()
                    issued_ttl = self.seconds_to_expiry()
            await asyncio.sleep(poll_seconds)

    def close(self) -> None:
        """Close the HTTP session."""
        self._client.adapter.close()


def _errors_of(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)
    return str(exc)


class VaultReadiness:  # satisfies core.ports.ReadinessCheck
    """Ready when OpenBao is initialised, unsealed, and the broker's own session is valid."""

    name = "openbao"

    def __init__(self, vault: HvacVault) -> None:
        self._vault = vault

    async def check(self, now: datetime) -> CheckResult:
        """Read sys/health, then look the broker's token up."""
        health = await self._vault.health()
        if not health.initialized:
            return CheckResult(self.name, ok=False, detail="OpenBao is not initialised")
        if health.sealed:
            return CheckResult(self.name, ok=False, detail="OpenBao is sealed")
        session = await self._vault.check_session()
        remaining = self._vault.seconds_to_expiry() or 0.0
        if remaining <= 0:
            return CheckResult(self.name, ok=False, detail="the broker's OpenBao token expired")
        return CheckResult(
            self.name,
            ok=True,
            detail=f"unsealed (version {health.version}); broker session valid for "
            f"{int(remaining)} s with policies {', '.join(session.policies)}",
        )
