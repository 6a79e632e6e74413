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
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import hvac.exceptions
import requests

from broker.adapters.kinds import KindSecret, SecretKind
from broker.adapters.tls import failure_code
from broker.adapters.vault_http import VaultHttp, VaultResponseError, translate
from broker.config import VaultSettings
from broker.core.model import TargetKind
from broker.core.ports import (
    CheckResult,
    MintedCredential,
    MintSpec,
    RevokeOutcome,
    TaskToken,
)
from broker.core.untrusted import printable
from broker.errors import (
    BadRequestError,
    ConfigurationError,
    MintOutcomeUnknownError,
    VaultUnavailableError,
)


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


def system_roots() -> str | bool:
    """Where OpenSSL finds the system's CA certificates (``SSL_CERT_FILE``/``SSL_CERT_DIR``
    honoured), for requests' ``verify``: the file, else the directory, else True (requests'
    own bundle, when the system has none)."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile and Path(paths.cafile).is_file():
        return paths.cafile
    if paths.capath and Path(paths.capath).is_dir():
        return paths.capath
    return True


def openbao_tls_context(settings: VaultSettings) -> ssl.SSLContext | None:
    """The context that verifies OpenBao against ``vault.ca_file`` alone (None: empty, the
    libraries' default roots). :class:`ConfigurationError` when the file does not load."""
    if not settings.ca_file:
        return None
    try:
        return ssl.create_default_context(cafile=settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigurationError(
            f"vault.ca_file {settings.ca_file!r} could not be loaded ({problem}); expected a "
            "PEM CA certificate"
        ) from exc


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
        self._tls = openbao_tls_context(settings)
        self._client = hvac.Client(
            url=settings.addr,
            timeout=settings.request_timeout_seconds,
            # requests reads the CA file itself (the context above proved it loads); without
            # one, the system roots, as minting (aiohttp) uses, rather than certifi's.
            verify=settings.ca_file or system_roots(),
        )
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

    @property
    def client(self) -> hvac.Client:
        """The broker's own client (for adapters in this module, inside worker threads)."""
        return self._client

    @property
    def settings(self) -> VaultSettings:
        """The Vault settings."""
        return self._settings

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The TLS context of ``vault.ca_file`` for other clients of the same OpenBao, or
        None for the system roots."""
        return self._tls

    async def call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking hvac work in a thread, translating hvac/requests errors."""
        return await self._call(what, func, *args, **kwargs)

    async def _call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except hvac.exceptions.InvalidRequest as exc:
            raise BadRequestError(
                f"{what}: OpenBao refused the request (400): {printable(_errors_of(exc))}",
                reason="vault.invalid_request",
            ) from exc
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
                f"{what}: OpenBao at {self._settings.addr} is unreachable ({failure_code(exc)})",
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


_LEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*(/[A-Za-z0-9_.:-]+)+")
# A revocation can still be visible for a moment after OpenBao answered it: a lookup still
# finds the thing, or answers 403 for a token in the middle of its revocation (longer when it
# takes leases with it: a certificate's CRL, a database role). A revoke's confirmation asks
# again after these pauses (1.55 s in all) before it calls something still live; a 403 that
# lasts (the broker's policy changed) still fails the confirmation.
_CONFIRM_RETRY_DELAYS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8)
# One confirming lookup: what it names in a report, its path and body, the words of "gone".
_Lookup = tuple[str, str, dict[str, str], str]


def _is_wellformed_lease_id(lease_id: str) -> bool:
    # SECURITY 25: sys/leases/revoke answers success for ids it does not know, and a malformed
    # id fails every lookup the same way a revoked one does; so it is never counted as revoked.
    return (
        0 < len(lease_id) <= 512
        and _LEASE_ID.fullmatch(lease_id) is not None
        and not any(part in {".", ".."} for part in lease_id.split("/"))
    )


def _says(exc: Exception, words: str) -> bool:
    return words in str(exc).lower()


class VaultMinter:  # satisfies core.ports.SecretMinter and core.ports.TaskTokenInventory
    """Mints per-task credentials: a per-task child token, then the secret read *with it*.

    The task token is created through the task token role (orphan, not renewable, service
    type), with ``ttl = explicit_max_ttl =`` the credential TTL, the target's policies and
    metadata naming the credential, run, task, holder and owner. Every lease read with it
    belongs to it, so Vault revokes everything when the token ends — even with the broker and
    Redis down. Anything that would outlive the token (a lease or a certificate NotAfter) is
    shortened or refused; on any failure after the token exists, the token is revoked.

    The hot paths use :class:`~broker.adapters.vault_http.VaultHttp` (async) with the broker's
    current session token from :class:`HvacVault`.
    """

    def __init__(
        self,
        *,
        vault: HvacVault,
        kinds: Mapping[TargetKind, SecretKind],
        now: Callable[[], datetime],
        slack: timedelta = timedelta(seconds=2),
    ) -> None:
        self._vault = vault
        self._kinds = kinds
        self._now = now
        self._slack = slack
        self._http = VaultHttp(
            addr=vault.settings.addr,
            timeout_seconds=vault.settings.request_timeout_seconds,
            broker_token=lambda: vault.client.token,
            tls=vault.tls,
        )

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.close()

    async def mint(self, spec: MintSpec) -> MintedCredential:
        """Mint one credential for ``spec``; raise a TaskleaseError with nothing left behind."""
        kind = self._kinds.get(spec.target.kind)
        if kind is None:
            raise VaultUnavailableError(
                f"no secret kind {spec.target.kind!r} is configured", reason="vault.unknown_kind"
            )
        ttl_seconds = int(spec.ttl.total_seconds())
        started = self._now()
        auth = await self._create_task_token(spec, ttl_seconds)
        accessor = str(auth["accessor"])
        token = str(auth["client_token"])
        try:
            self._check_task_token(auth, ttl_seconds)
            token_expires = started + timedelta(seconds=int(auth["lease_duration"]))
            read = await kind.read(self._http, spec, token=token)
            lease_ids: tuple[str, ...] = (read.lease_id,) if read.lease_id else ()
            if read.not_after is not None and read.not_after > token_expires + self._slack:
                raise VaultUnavailableError(
                    f"the {spec.target.kind} credential would be valid until "
                    f"{read.not_after.isoformat()}, after the task token ends at "
                    f"{token_expires.isoformat()}; refused and revoked",
                    reason="vault.outlives_task",
                )
            # Shortening a lease to the task is left to the caller to await alongside the
            # record of the credential: the secret is handed out only after both.
            finish = None
            if read.lease_id:

                async def finish() -> None:
                    await self._bound_lease(read, token_expires)

            return MintedCredential(
                token_accessor=accessor,
                vault_lease_ids=lease_ids,
                expires_at=min(token_expires, read.not_after or token_expires),
                secret=read.secret,
                finish=finish,
            )
        except BaseException as failure:
            # Nothing half-minted survives: the token (and every lease under it) goes now.
            try:
                await self._http.raw(
                    "POST", "auth/token/revoke-accessor", body={"accessor": accessor}
                )
            except Exception as exc:  # noqa: BLE001 - any failure leaves the outcome unknown
                raise MintOutcomeUnknownError(
                    f"minting {spec.credential_id} failed ({type(failure).__name__}) and its "
                    f"task token could not be revoked ({type(exc).__name__}); it stays recorded "
                    "for the sweeper and the reconciler",
                    reason="vault.mint_cleanup_failed",
                ) from failure
            raise

    async def _create_task_token(self, spec: MintSpec, ttl_seconds: int) -> Mapping[str, Any]:
        settings = self._vault.settings
        body = {
            "policies": list(spec.target.policies),
            "ttl": f"{ttl_seconds}s",
            "explicit_max_ttl": f"{ttl_seconds}s",
            "renewable": False,
            "display_name": f"tasklease-{spec.credential_id}"[:64],
            "meta": {
                "tasklease": "1",
                "credential_id": spec.credential_id,
                "workflow_id": spec.workflow_id,
                "task_id": spec.task_id,
                "holder": spec.holder,
                "owner": spec.owner,
                "target": spec.target.name,
                "chain": spec.chain.compact()[:1024],
            },
        }
        path = f"auth/token/create/{settings.task_token_role}"
        try:
            response = await self._http.raw("POST", path, body=body)
        except VaultResponseError as exc:
            raise translate(f"creating the task token for {spec.credential_id}", exc) from exc
        except aiohttp.ClientConnectorError as exc:
            # Never connected: nothing was created.
            raise VaultUnavailableError(
                f"OpenBao at {settings.addr} is unreachable ({type(exc).__name__})",
                reason="vault.unreachable",
            ) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have reached Vault: a token may exist that we cannot name.
            raise MintOutcomeUnknownError(
                f"creating the task token for {spec.credential_id} failed in flight "
                f"({type(exc).__name__}); the reconciler will find any token it left",
                reason="vault.mint_outcome_unknown",
            ) from exc
        auth = response.get("auth")
        if not isinstance(auth, dict):
            raise VaultUnavailableError(
                "OpenBao answered a token creation without auth data", reason="vault.error"
            )
        return auth

    async def check_task_token_role(self) -> None:
        """Refuse to start on a task token role that could yield unsafe tokens (SECURITY 28)."""
        role = self._vault.settings.task_token_role
        response = await self._http.call(
            f"reading the task token role {role!r}", "GET", f"auth/token/roles/{role}"
        )
        data = response.get("data") or {}
        problems = []
        if data.get("renewable", True):
            problems.append("renewable must be false")
        if not data.get("orphan", False):
            problems.append("orphan must be true")
        if data.get("token_type") not in ("service", "default-service"):
            problems.append(f"token_type must be service (is {data.get('token_type')!r})")
        if int(data.get("token_period") or data.get("period") or 0):
            problems.append("token_period must be unset (periodic tokens never expire)")
        if problems:
            raise ConfigurationError(
                f"the task token role {role!r} is unsafe: " + "; ".join(problems)
            )

    def _check_task_token(self, auth: Mapping[str, Any], ttl_seconds: int) -> None:
        # SECURITY 28 at run time: whatever the role says, a task token that is renewable,
        # not an orphan, not a service token or longer than asked is refused (and revoked).
        problems = []
        if auth.get("renewable") is not False:
            problems.append("renewable")
        if auth.get("orphan") is not True:
            problems.append("not an orphan")
        if auth.get("token_type", "service") != "service":
            problems.append(f"token_type {auth.get('token_type')!r}")
        lease = int(auth.get("lease_duration") or 0)
        if not 0 < lease <= ttl_seconds:
            problems.append(f"ttl {lease} s for a {ttl_seconds} s credential")
        if problems:
            raise VaultUnavailableError(
                "the task token role produced an unsafe token (" + ", ".join(problems) + "); "
                "fix the role (renewable=false, orphan=true, token_type=service)",
                reason="vault.unsafe_task_token",
            )

    async def _bound_lease(self, read: KindSecret, token_expires: datetime) -> None:
        remaining = int((token_expires - self._now()).total_seconds())
        if read.lease_seconds <= remaining + self._slack.total_seconds():
            return
        if not read.lease_renewable:
            raise VaultUnavailableError(
                f"lease {read.lease_id} lasts {read.lease_seconds} s, beyond the task token's "
                f"{remaining} s, and cannot be shortened; refused and revoked",
                reason="vault.outlives_task",
            )
        # The engine's default TTL is longer than the task: shorten the lease to the task.
        # (Revoking the token would revoke it anyway; this makes the bound visible and exact.)
        renewed = await self._http.call(
            "shortening a lease to the task",
            "PUT",
            "sys/leases/renew",
            body={"lease_id": read.lease_id, "increment": max(remaining, 1)},
        )
        if int(renewed.get("lease_duration") or 0) > max(remaining, 1):
            raise VaultUnavailableError(
                f"lease {read.lease_id} would outlive the task token and could not be shortened",
                reason="vault.outlives_task",
            )

    async def task_tokens(self, *, limit: int) -> list[TaskToken]:
        """Live task tokens tasklease minted (metadata ``tasklease=1``), for the reconciler.

        Lists every accessor (needs ``list`` + ``sudo`` on ``auth/token/accessors``) and looks
        each up: O(tokens in OpenBao). Bounded by ``limit`` lookups per call.
        """
        listed = await self._http.call("listing token accessors", "LIST", "auth/token/accessors")
        accessors = list((listed.get("data") or {}).get("keys") or [])[:limit]
        tokens: list[TaskToken] = []
        denied: VaultResponseError | None = None
        looked_up = 0
        for accessor in accessors:
            try:
                response = await self._http.raw(
                    "POST", "auth/token/lookup-accessor", body={"accessor": accessor}
                )
            except VaultResponseError as exc:
                if exc.status == 400:
                    continue  # revoked or expired since the list: nothing to reconcile
                if exc.status == 403:
                    # OpenBao answers 403 for an accessor whose token is being revoked while
                    # we list (seen under load: the sweeper revokes as the reconciler reads).
                    # Such a token is no orphan to reconcile; a policy that denies lookups
                    # denies every one of them, which is an error (below).
                    denied = exc
                    continue
                raise translate("looking up a token accessor", exc) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise VaultUnavailableError(
                    f"looking up token accessors: OpenBao is unreachable ({type(exc).__name__})",
                    reason="vault.unreachable",
                ) from exc
            looked_up += 1
            data = response.get("data") or {}
            meta = data.get("meta") or {}
            if meta.get("tasklease") != "1":
                continue
            expire = data.get("expire_time")
            tokens.append(
                TaskToken(
                    accessor=str(accessor),
                    credential_id=str(meta.get("credential_id", "")),
                    created_at=datetime.fromtimestamp(int(data.get("creation_time", 0)), UTC),
                    expires_at=datetime.fromisoformat(expire) if expire else None,
                )
            )
        if denied is not None and not looked_up:
            # Not one lookup allowed: the broker's policy lacks the lookup (fail, never report
            # "no orphans" for a pass that saw nothing).
            raise translate("looking up a token accessor", denied) from denied
        return tokens

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        """Revoke the task token by accessor and each lease (sync), then confirm by lookup."""
        still_live: list[str] = []
        errors: list[str] = []
        if token_accessor:
            await self._http.call(
                "revoking a task token",
                "POST",
                "auth/token/revoke-accessor",
                body={"accessor": token_accessor},
            )
        for lease_id in vault_lease_ids:
            if not _is_wellformed_lease_id(lease_id):
                still_live.append(lease_id[:80])
                errors.append("malformed lease id, never counted as revoked")
                continue
            await self._http.call(
                "revoking a lease", "PUT", "sys/leases/revoke", body={"lease_id": lease_id}
            )
        # Confirm: Vault says "success" for unknown ids, so only a lookup failure that says
        # the thing is gone counts.
        lookups: list[_Lookup] = []
        if token_accessor:
            lookups.append(
                (
                    f"token:{token_accessor}",
                    "auth/token/lookup-accessor",
                    {"accessor": token_accessor},
                    "invalid accessor",
                )
            )
        lookups += [
            (lease_id, "sys/leases/lookup", {"lease_id": lease_id}, "invalid lease")
            for lease_id in vault_lease_ids
            if _is_wellformed_lease_id(lease_id)
        ]
        still_live += await self._still_there(lookups)
        return RevokeOutcome(
            confirmed=not still_live, still_live=tuple(still_live), error="; ".join(errors)
        )

    async def _still_there(self, lookups: list[_Lookup]) -> list[str]:
        """The labels of the ``(label, path, body, gone words)`` lookups whose thing OpenBao
        still knows. A revocation may still be visible for a moment after it was answered, so
        what is not gone is asked again after each of the pauses; then what is still found
        counts as still live, and a lasting 403 fails the confirmation."""
        pending = lookups
        for pause in (*_CONFIRM_RETRY_DELAYS, None):
            found: list[_Lookup] = []
            refused: tuple[str, VaultResponseError] | None = None
            for lookup in pending:
                _, path, body, gone_words = lookup
                method = "PUT" if path.startswith("sys/") else "POST"
                try:
                    await self._http.raw(method, path, body=body)
                except VaultResponseError as exc:
                    if exc.status == 400 and exc.says(gone_words):
                        continue
                    if exc.status != 403:
                        raise translate(f"confirming at {path}", exc) from exc
                    refused = (path, exc)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise VaultUnavailableError(
                        f"confirming at {path}: OpenBao is unreachable ({type(exc).__name__})",
                        reason="vault.unreachable",
                    ) from exc
                found.append(lookup)
            if not found:
                return []
            if pause is None:
                if refused is not None:
                    where, answer = refused
                    raise translate(f"confirming at {where}", answer) from answer
                return [label for label, *_ in found]
            await asyncio.sleep(pause)  # a revocation in progress: ask again shortly
            pending = found
        raise AssertionError("unreachable")  # pragma: no cover - the last pass returns
