"""The tasklease Python SDK: for agents, orchestrators and security teams.

An agent asks for a credential for one task and gives it back when the task is done::

    from spiffe import X509Source
    from broker.client import TaskCredential, X509SourceAuth

    with X509Source() as source:
        auth = X509SourceAuth(source, broker_id="spiffe://example.org/tasklease/broker")
        async with TaskCredential(
            "https://tasklease.internal:8443", auth,
            workflow="nightly-42", task="load-orders", target="orders-db", ttl_seconds=300,
            justification="load yesterday's orders", approval_timeout=600,
        ) as cred:
            connect(user=cred.secret["username"], password=cred.secret["password"])

``TaskCredential`` waits for a human approval when policy asks for one (up to
``approval_timeout`` seconds, polling the approval) and releases the credential on exit, also
when the block raises. An orchestrator starts and completes runs with
:class:`OrchestratorClient`; a security team revokes, quarantines and decides approvals with
:class:`AdminClient`.

Authentication is never a shared secret: an X.509-SVID over mTLS (:class:`X509SourceAuth` for
a py-spiffe ``X509Source``, :class:`PemAuth` for PEM material), a JWT-SVID
(:class:`JwtSourceAuth`) or, for people, an OIDC ID token (:class:`BearerAuth`). The broker's
own certificate is an X.509-SVID: it is verified against the trust bundle and, when
``broker_id`` is given, its SPIFFE ID must be exactly that.

Every refusal is an :class:`ApiError` carrying the problem+json ``code``, ``reason`` and
``detail`` the broker sent (never a secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import ssl
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "AdminClient",
    "AgentClient",
    "ApiError",
    "ApprovalRefusedError",
    "ApprovalTimeoutError",
    "BearerAuth",
    "Credential",
    "JwtSourceAuth",
    "OrchestratorClient",
    "PemAuth",
    "PendingApproval",
    "TaskCredential",
    "TaskleaseClient",
    "X509SourceAuth",
]


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """The broker refused a request (or could not be reached): status, stable code and reason."""

    def __init__(
        self, status: int, code: str, reason: str, detail: str, problem: Mapping[str, Any]
    ) -> None:
        super().__init__(f"{status} {code} ({reason}): {detail}")
        self.status = status
        self.code = code
        self.reason = reason
        self.detail = detail
        self.problem = dict(problem)


class ApprovalRefusedError(ApiError):
    """The approval the request waited for was denied, withdrawn or expired."""


class ApprovalTimeoutError(TimeoutError):
    """No decision on the approval within the time the caller was willing to wait."""

    def __init__(self, approval_id: str, waited: float) -> None:
        super().__init__(f"approval {approval_id} was not decided within {waited:.0f} s")
        self.approval_id = approval_id


# --------------------------------------------------------------------------- authentication


class Auth(Protocol):
    """How a client proves who it is and checks who the broker is."""

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context (with the client certificate for mTLS)."""
        ...

    async def headers(self) -> dict[str, str]:
        """Extra request headers (``Authorization`` for bearer tokens)."""
        ...

    @property
    def broker_id(self) -> str | None:
        """The SPIFFE ID the broker's certificate must carry (None: any in the bundle)."""
        ...


def _pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _client_context(
    roots_pem: bytes, chain_pem: bytes | None, key_pem: bytes | None
) -> ssl.SSLContext:
    """TLS 1.2+, the broker verified against ``roots_pem``; the SPIFFE ID is checked per
    connection (an SVID names no host), so hostname checking is off."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=roots_pem.decode("ascii"))
    if chain_pem is not None and key_pem is not None:
        # The key goes through an anonymous in-memory file where the platform has one.
        with _secret_file(chain_pem + key_pem) as path:
            context.load_cert_chain(certfile=path)
    return context


@contextlib.contextmanager
def _secret_file(data: bytes) -> Any:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tasklease-client", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    # Platforms without memfd: a private temporary file, removed at once.
    with tempfile.NamedTemporaryFile(prefix="tasklease-", suffix=".pem") as handle:
        Path(handle.name).chmod(0o600)
        handle.write(data)
        handle.flush()
        yield handle.name


class _SourceLike(Protocol):
    def get_x509_context(self) -> Any: ...


class X509SourceAuth:
    """mTLS with the current X.509-SVID of a py-spiffe ``X509Source`` (rotation-aware: the
    context is rebuilt whenever the source delivers a new SVID or bundle)."""

    def __init__(self, source: _SourceLike, *, broker_id: str | None = None) -> None:
        self._source = source
        self._broker_id = broker_id
        self._cached: tuple[object, ssl.SSLContext] | None = None

    @property
    def broker_id(self) -> str | None:
        """The broker's expected SPIFFE ID."""
        return self._broker_id

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for the source's current SVID and bundles."""
        context = self._source.get_x509_context()
        svid = context.default_svid
        roots = [a for bundle in context.x509_bundle_set.bundles for a in bundle.x509_authorities]
        fingerprint = (
            svid.leaf.serial_number,
            tuple(sorted(root.serial_number for root in roots)),
        )
        if self._cached is not None and self._cached[0] == fingerprint:
            return self._cached[1]
        built = _client_context(_pem(roots), _pem(svid.cert_chain), _key_pem(svid.private_key))
        self._cached = (fingerprint, built)
        return built

    async def headers(self) -> dict[str, str]:
        """None: the certificate is the proof."""
        return {}


class PemAuth:
    """mTLS with PEM material: an SVID chain and key (e.g. written by spiffe-helper) and the
    trust bundle to verify the broker with. Without ``chain``/``key`` it only verifies the
    broker (use with a bearer)."""

    def __init__(
        self,
        *,
        bundle: bytes | str | Path,
        chain: bytes | str | Path | None = None,
        key: bytes | str | Path | None = None,
        broker_id: str | None = None,
    ) -> None:
        self._roots = _read(bundle)
        self._chain = _read(chain) if chain is not None else None
        self._key = _read(key) if key is not None else None
        self._broker_id = broker_id
        self._context: ssl.SSLContext | None = None

    @property
    def broker_id(self) -> str | None:
        """The broker's expected SPIFFE ID."""
        return self._broker_id

    def ssl_context(self) -> ssl.SSLContext:
        """The client context (built once)."""
        if self._context is None:
            self._context = _client_context(self._roots, self._chain, self._key)
        return self._context

    async def headers(self) -> dict[str, str]:
        """None: the certificate is the proof."""
        return {}


def _read(value: bytes | str | Path) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode("ascii")
    return Path(value).read_bytes()


class _BearerOverVerifiedTls:
    """What the bearer-token identities share: no client certificate, and the broker's
    certificate verified against ``bundle`` (and its SPIFFE ID, if given)."""

    def __init__(self, *, bundle: bytes | str | Path, broker_id: str | None) -> None:
        self._tls = PemAuth(bundle=bundle, broker_id=broker_id)

    @property
    def broker_id(self) -> str | None:
        """The broker's expected SPIFFE ID."""
        return self._tls.broker_id

    def ssl_context(self) -> ssl.SSLContext:
        """Server verification only."""
        return self._tls.ssl_context()


class BearerAuth(_BearerOverVerifiedTls):
    """A bearer token (a person's OIDC ID token, or a JWT-SVID fetched elsewhere), with the
    bundle to verify the broker's certificate."""

    def __init__(self, token: str, *, bundle: bytes | str | Path, broker_id: str | None = None):
        super().__init__(bundle=bundle, broker_id=broker_id)
        self._token = token

    async def headers(self) -> dict[str, str]:
        """``Authorization: Bearer``."""
        return {"Authorization": f"Bearer {self._token}"}


class _JwtSourceLike(Protocol):
    def fetch_svid(self, audience: set[str]) -> Any: ...


class JwtSourceAuth(_BearerOverVerifiedTls):
    """A fresh JWT-SVID per request from a py-spiffe ``JwtSource`` (audience: the broker's),
    with the X.509 bundle to verify the broker's certificate."""

    def __init__(
        self,
        source: _JwtSourceLike,
        *,
        audience: str,
        bundle: bytes | str | Path,
        broker_id: str | None = None,
    ) -> None:
        super().__init__(bundle=bundle, broker_id=broker_id)
        self._source = source
        self._audience = audience

    async def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <JWT-SVID>`` (the Workload API caches and renews it)."""
        svid = await asyncio.to_thread(self._source.fetch_svid, {self._audience})
        return {"Authorization": f"Bearer {svid.token}"}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential as issued: the metadata and the secret (shown once; keep it in memory)."""

    credential_id: str
    workflow_id: str
    task_id: str
    target: str
    kind: str
    expires_at: datetime
    ttl_seconds: int
    revocable: bool
    policy_ids: tuple[str, ...]
    secret: Mapping[str, Any] = field(repr=False)
    metadata: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Credential:
        """From the 201 body of ``POST /v1/credentials``."""
        return cls(
            credential_id=str(body["credential_id"]),
            workflow_id=str(body["workflow_id"]),
            task_id=str(body["task_id"]),
            target=str(body["target"]),
            kind=str(body["kind"]),
            expires_at=datetime.fromisoformat(str(body["expires_at"])),
            ttl_seconds=int(body["ttl_seconds"]),
            revocable=bool(body.get("revocable", True)),
            policy_ids=tuple(str(p) for p in body.get("policy_ids", ())),
            secret=dict(body["secret"]),
            metadata={k: v for k, v in body.items() if k != "secret"},
        )


@dataclass(frozen=True, slots=True)
class PendingApproval:
    """A request that waits for a human decision (the 202 answer)."""

    approval_id: str
    poll_url: str
    expires_at: str
    quorum: int
    detail: str


# --------------------------------------------------------------------------- the client


class _SpiffeIdConnector(aiohttp.TCPConnector):
    """Checks, right after each TLS handshake and before any request is written on the
    connection, that the broker's certificate names exactly the expected SPIFFE ID (an
    X.509-SVID names no host name, so this replaces hostname verification)."""

    def __init__(self, expected: str | None) -> None:
        super().__init__()
        self._expected = expected

    async def _create_connection(  # aiohttp's hook for a new connection
        self,
        req: Any,
        traces: Any,
        timeout: Any,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Any:
        protocol = await super()._create_connection(req, traces, timeout)
        if self._expected is not None:
            transport = protocol.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            found: list[str] = []
            if der:
                cert = x509.load_der_x509_certificate(der)
                with contextlib.suppress(x509.ExtensionNotFound):
                    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                    found = san.value.get_values_for_type(x509.UniformResourceIdentifier)
            if found != [self._expected]:
                if transport is not None:
                    transport.close()
                raise ApiError(
                    0,
                    "wrong_broker",
                    "client.wrong_broker",
                    f"the server presented {found or 'no SPIFFE ID'}, expected {self._expected}",
                    {},
                )
        return protocol


# Answers worth asking again: the broker could not be reached or answered that a dependency is
# unavailable (nothing was minted, or what was minted is revoked; see request_credential).
_TRANSIENT_STATUS: frozenset[int] = frozenset({0, 429, 502, 503, 504})
_MAX_RETRY_AFTER = 30.0


def _transient(error: ApiError) -> bool:
    if error.status not in _TRANSIENT_STATUS or error.reason in _NOT_TRANSIENT:
        return False
    # A broker asking for a longer wait than a retry would make (a live-credential limit
    # whose earliest credential expires in minutes): tell the caller now, not after it.
    said = str(error.problem.get("retry_after", ""))
    return not (said.isdigit() and float(said) > _MAX_RETRY_AFTER)


# Status 0 without a connection problem: the broker's identity or TLS is wrong; asking again
# cannot help.
_NOT_TRANSIENT: frozenset[str] = frozenset({"client.wrong_broker", "client.tls"})


class TaskleaseClient:
    """HTTPS to the broker with one connection pool; problem+json errors become ApiError.

    ``retries`` is how many times a call that is safe to repeat is asked again after a
    transient failure (the broker unreachable, a timeout, 429, 502, 503, 504), waiting
    ``backoff`` seconds doubled each time with jitter, or what ``Retry-After`` says; an answer
    whose ``Retry-After`` is over 30 s (a live-credential limit far from freeing) is raised at
    once. Safe to repeat: reads, releases, and credential requests (each carries an
    ``Idempotency-Key``, so a retry never mints a second credential).
    """

    def __init__(
        self,
        base_url: str,
        auth: Auth,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must not be negative")
        self._base = base_url.rstrip("/")
        self._auth = auth
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._retries = retries
        self._backoff = backoff

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = _SpiffeIdConnector(self._auth.broker_id)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        return self._session

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201, 202, 207),
    ) -> tuple[int, dict[str, Any]]:
        """One request; the status and JSON body when the status is in ``ok``, else ApiError."""
        sent = {**(await self._auth.headers()), **(headers or {})}
        try:
            async with self._client().request(
                method,
                f"{self._base}{path}",
                json=json_body,
                params=params,
                headers=sent,
                ssl=self._auth.ssl_context(),
            ) as response:
                body = (
                    await response.json(content_type=None) if response.content_length != 0 else {}
                )
                status = response.status
                retry_after = response.headers.get("Retry-After", "")
        except aiohttp.ClientSSLError as exc:
            raise ApiError(0, "tls", "client.tls", f"{type(exc).__name__}: {exc}", {}) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(
                0, "unreachable", "client.unreachable", f"{type(exc).__name__}: {exc}", {}
            ) from exc
        body = body if isinstance(body, dict) else {"value": body}
        if status not in ok:
            problem = dict(body)
            if retry_after:
                problem.setdefault("retry_after", retry_after)
            raise ApiError(
                status,
                str(body.get("code", "error")),
                str(body.get("reason", body.get("code", "error"))),
                str(body.get("detail", "")),
                problem,
            )
        return status, body

    async def call_again(
        self,
        method: str,
        path: str,
        **kwargs: Any,
    ) -> tuple[int, dict[str, Any]]:
        """:meth:`call`, asked again after a transient failure (up to ``retries`` times): for
        requests that are safe to repeat."""
        for attempt in range(self._retries + 1):
            try:
                return await self.call(method, path, **kwargs)
            except ApiError as error:
                if attempt == self._retries or not _transient(error):
                    raise
                await asyncio.sleep(self._delay(attempt, error))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _delay(self, attempt: int, error: ApiError) -> float:
        """Seconds before attempt ``attempt + 1``: Retry-After when the broker said, else
        jittered exponential backoff."""
        said = str(error.problem.get("retry_after", ""))
        if said.isdigit():
            return min(float(said), _MAX_RETRY_AFTER)
        return float(self._backoff * (2**attempt) * (0.5 + random.random()))  # noqa: S311

    async def whoami(self) -> dict[str, Any]:
        """How the broker sees this caller: principal, method, roles."""
        return (await self.call_again("GET", "/v1/whoami"))[1]


class AgentClient(TaskleaseClient):
    """For agents: request, wait for approvals, release, report tool calls and side effects."""

    async def request_credential(
        self,
        *,
        workflow: str,
        task: str,
        target: str,
        ttl_seconds: int = 300,
        justification: str = "",
        tool: str = "",
        params: Mapping[str, str] | None = None,
        approval_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Credential | PendingApproval:
        """One request: the credential (201) or the approval it waits for (202).

        Every request carries an ``Idempotency-Key`` (``idempotency_key``, or a fresh random
        one), and a transient failure is asked again with the same key, so a retry never
        mints a second credential. When a retry finds that an earlier attempt did mint one
        whose answer was lost (``409 idempotency_replayed``: the secret is never sent twice),
        that credential is released at once (nobody holds its secret) and the request is
        asked again under a new key; with an ``approval_id`` it cannot be (the approval was
        spent on the lost credential) and :class:`ApiError` ``client.answer_lost`` says so.
        """
        body: dict[str, Any] = {
            "workflow_id": workflow,
            "task_id": task,
            "target": target,
            "ttl_seconds": ttl_seconds,
            "justification": justification,
            "tool": tool,
            "params": dict(params or {}),
        }
        if approval_id is not None:
            body["approval_id"] = approval_id
        key = idempotency_key or _new_key()
        sent = False  # this key went out before without an answer
        retried = 0
        while True:
            try:
                status, answer = await self.call(
                    "POST",
                    "/v1/credentials",
                    json_body=body,
                    headers={"Idempotency-Key": key},
                    ok=(201, 202),
                )
            except ApiError as error:
                lost = sent and error.reason == "idempotency.replayed"
                if lost:
                    # Raises when asking again cannot help (approval spent, not released).
                    await self._release_lost(error, approval_id)
                if retried >= self._retries or not (lost or _transient(error)):
                    if lost:
                        raise ApiError(
                            error.status,
                            "answer_lost",
                            "client.answer_lost",
                            f"credential {error.problem.get('credential_id', '')} was minted "
                            "but its answer was lost; it was released, and no retry is left: "
                            "ask again",
                            dict(error.problem),
                        ) from error
                    raise
                if not lost:
                    await asyncio.sleep(self._delay(retried, error))
                retried += 1
                key, sent = (_new_key(), False) if lost else (key, True)
                continue
            if status == 202:
                return PendingApproval(
                    approval_id=str(answer["approval_id"]),
                    poll_url=str(answer.get("poll_url", f"/v1/approvals/{answer['approval_id']}")),
                    expires_at=str(answer.get("expires_at", "")),
                    quorum=int(answer.get("quorum", 1)),
                    detail=str(answer.get("detail", "")),
                )
            return Credential.from_json(answer)

    async def _release_lost(self, replay: ApiError, approval_id: str | None) -> None:
        """An earlier attempt minted a credential whose answer never arrived: release it
        (retrying while its mint is still in flight), then say whether asking again helps."""
        credential_id = str(replay.problem.get("credential_id", ""))
        released = False
        for attempt in range(self._retries + 2):
            try:
                report = await self.release(credential_id)
            except ApiError as error:
                raise ApiError(
                    error.status,
                    "answer_lost",
                    "client.answer_lost",
                    f"credential {credential_id} was minted but its answer was lost, and "
                    f"releasing it failed ({error.reason}); it ends at its TTL",
                    {"credential_id": credential_id},
                ) from error
            in_flight = [
                item
                for item in report.get("still_live", [])
                if item.get("reason") == "mint_in_flight"
            ]
            if not in_flight:
                released = True
                break
            await asyncio.sleep(self._backoff * (2**attempt))
        if not released or approval_id is not None:
            raise ApiError(
                replay.status,
                "answer_lost",
                "client.answer_lost",
                f"credential {credential_id} was minted but its answer was lost; "
                + (
                    "it was released, and the approval was spent on it: ask for a new approval"
                    if released
                    else "its mint is still in flight or its outcome unknown, so it could not "
                    "be released; it ends at its TTL (the broker's reconciler revokes a task "
                    "token it never recorded)"
                ),
                {"credential_id": credential_id},
            )

    async def approval(self, approval_id: str) -> dict[str, Any]:
        """The approval's current state (its requester may read it)."""
        return (await self.call_again("GET", f"/v1/approvals/{approval_id}"))[1]

    async def wait_for_approval(
        self,
        approval_id: str,
        *,
        timeout: float,  # noqa: ASYNC109 - a deadline for polling, not for one call
        poll_seconds: float = 2.0,
    ) -> dict[str, Any]:
        """Poll until the approval is approved (returned), refused (ApprovalRefusedError) or
        ``timeout`` passes (ApprovalTimeoutError)."""
        started = time.monotonic()
        while True:
            current = await self.approval(approval_id)
            state = str(current.get("state", ""))
            if state == "approved":
                return current
            if state != "pending":
                raise ApprovalRefusedError(
                    403,
                    "approval_refused",
                    f"approval.{state or 'unknown'}",
                    f"approval {approval_id} is {state or 'in an unknown state'}",
                    current,
                )
            waited = time.monotonic() - started
            if waited >= timeout:
                raise ApprovalTimeoutError(approval_id, waited)
            await asyncio.sleep(min(poll_seconds, max(0.05, timeout - waited)))

    async def release(self, credential_id: str) -> dict[str, Any]:
        """Give a credential back early; the report says whether revocation is confirmed."""
        return (await self.call_again("DELETE", f"/v1/credentials/{credential_id}"))[1]

    async def report_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Record a tool call or side effect (``POST /v1/events``) in the audit trail."""
        return (await self.call("POST", "/v1/events", json_body=dict(event)))[1]


class _RunsClient(TaskleaseClient):
    """Reading and completing a run: its orchestrator, or an admin."""

    async def run(self, run_id: str) -> dict[str, Any]:
        """The run and its credentials' metadata."""
        return (await self.call_again("GET", f"/v1/workflows/{run_id}"))[1]

    async def list_runs(
        self,
        *,
        owner: str | None = None,
        started_by: str | None = None,
        states: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/workflows``: one page of runs, latest over first, and ``next_cursor``
        (pass it back as ``cursor`` for the next page; None: no more). ``labels``: every one
        must match. An orchestrator sees only the runs it started."""
        params = [("limit", str(limit))]
        for name, value in (("owner", owner), ("started_by", started_by), ("cursor", cursor)):
            if value is not None:
                params.append((name, value))
        if states:
            params.append(("state", ",".join(states)))
        params += [("label", f"{key}={value}") for key, value in (labels or {}).items()]
        return (await self.call_again("GET", "/v1/workflows", params=params))[1]

    async def legacy_report(self, *, since: datetime | None = None) -> dict[str, Any]:
        """``GET /v1/reports/legacy``: who still gets credentials for each legacy target
        (standing static secrets), most recently used first; ``since``: issued from then."""
        params = [("since", since.isoformat())] if since is not None else []
        return (await self.call_again("GET", "/v1/reports/legacy", params=params))[1]

    async def complete_run(
        self, run_id: str, *, outcome: str = "completed", wait: bool = True
    ) -> dict[str, Any]:
        """End the run; with ``wait`` the report of what was confirmed revoked."""
        return (
            await self.call_again(
                "POST",
                f"/v1/workflows/{run_id}/complete",
                json_body={"outcome": outcome},
                params={"wait": "true" if wait else "false"},
            )
        )[1]


class OrchestratorClient(_RunsClient):
    """For workflow engines: start a run for an owner, read it, complete it."""

    async def start_run(
        self,
        run_id: str,
        *,
        owner: str,
        purpose: str,
        ttl_seconds: int | None = None,
        deadline: datetime | None = None,
        labels: Mapping[str, str] | None = None,
        participants: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``POST /v1/workflows``: the run as stored."""
        body: dict[str, Any] = {
            "id": run_id,
            "owner": owner,
            "purpose": purpose,
            "labels": dict(labels or {}),
            "participants": list(participants),
        }
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if deadline is not None:
            body["deadline"] = deadline.isoformat()
        return (await self.call("POST", "/v1/workflows", json_body=body, ok=(201,)))[1]


class AdminClient(_RunsClient):
    """For security teams: forced revocation, quarantines, approvals, the audit trail, and any
    run (read it, end it)."""

    async def revoke(self, selector: Mapping[str, Any], *, reason: str) -> dict[str, Any]:
        """``POST /v1/revocations``: the report (``complete`` false lists what is still live)."""
        return (
            await self.call_again(
                "POST", "/v1/revocations", json_body={"selector": dict(selector), "reason": reason}
            )
        )[1]

    async def credential(self, credential_id: str) -> dict[str, Any]:
        """One credential's metadata and revocation progress."""
        return (await self.call_again("GET", f"/v1/credentials/{credential_id}"))[1]

    async def quarantine(
        self, kind: str, value: str, *, reason: str, ttl_seconds: int = 3600
    ) -> dict[str, Any]:
        """Block new issuance for an identity (or prefix), a run or a target."""
        body = {"kind": kind, "value": value, "reason": reason, "ttl_seconds": ttl_seconds}
        return (await self.call("POST", "/v1/quarantines", json_body=body, ok=(201,)))[1]

    async def lift_quarantine(self, kind: str, value: str) -> dict[str, Any]:
        """Lift a quarantine before it expires."""
        body = {"kind": kind, "value": value}
        return (await self.call_again("DELETE", "/v1/quarantines", json_body=body))[1]

    async def quarantines(self) -> list[dict[str, Any]]:
        """The active quarantines."""
        return list((await self.call_again("GET", "/v1/quarantines"))[1]["quarantines"])

    async def approvals(self, state: str = "pending") -> list[dict[str, Any]]:
        """Approvals in ``state`` (approver or admin role)."""
        body = (await self.call_again("GET", "/v1/approvals", params={"state": state}))[1]
        return list(body.get("approvals", []))

    async def decide(self, approval_id: str, *, approve: bool, comment: str = "") -> dict[str, Any]:
        """Approve or deny (approver role; never your own request or your own run)."""
        body = {"decision": "approve" if approve else "deny", "comment": comment}
        return (await self.call("POST", f"/v1/approvals/{approval_id}/decision", json_body=body))[1]

    async def audit(self, **filters: str) -> dict[str, Any]:
        """``GET /v1/audit`` with filters (run, credential, actor, type, since, until, cursor)."""
        return (await self.call_again("GET", "/v1/audit", params=filters))[1]


def _new_key() -> str:
    return f"tlk-{secrets.token_hex(16)}"


# --------------------------------------------------------------------------- the context manager


class TaskCredential:
    """``async with TaskCredential(...) as cred``: a credential for one task, released on exit.

    Waits for an approval when policy asks for one (``approval_timeout`` seconds, 0 = do not
    wait: :class:`ApprovalTimeoutError` at once), then asks again with the approval. On exit
    the credential is released (revoked) even if the block raised; a failed release is raised
    unless the block's own exception is already propagating (the credential then still ends
    at its TTL, and the broker's sweeper revokes it).
    """

    def __init__(
        self,
        broker_url: str,
        source: Auth | _SourceLike,
        *,
        workflow: str,
        task: str,
        target: str,
        ttl_seconds: int = 300,
        justification: str = "",
        tool: str = "",
        params: Mapping[str, str] | None = None,
        approval_timeout: float = 0.0,
        poll_seconds: float = 2.0,
        idempotency_key: str | None = None,
        timeout: float = 30.0,
        broker_id: str | None = None,
    ) -> None:
        # A py-spiffe X509Source is used as is (mTLS with its current SVID); anything else is
        # an Auth (PemAuth, JwtSourceAuth, BearerAuth, X509SourceAuth).
        auth: Auth = (
            X509SourceAuth(source, broker_id=broker_id)
            if not hasattr(source, "ssl_context") and hasattr(source, "get_x509_context")
            else source  # type: ignore[assignment]
        )
        self._client = AgentClient(broker_url, auth, timeout=timeout)
        self._request: dict[str, Any] = {
            "workflow": workflow,
            "task": task,
            "target": target,
            "ttl_seconds": ttl_seconds,
            "justification": justification,
            "tool": tool,
            "params": params,
            "idempotency_key": idempotency_key,
        }
        self._approval_timeout = approval_timeout
        self._poll = poll_seconds
        self.credential: Credential | None = None
        self.approval_id: str | None = None

    @property
    def client(self) -> AgentClient:
        """The underlying client (e.g. to report tool calls while holding the credential)."""
        return self._client

    async def __aenter__(self) -> Credential:
        try:
            answer = await self._client.request_credential(**self._request)
            if isinstance(answer, PendingApproval):
                self.approval_id = answer.approval_id
                await self._client.wait_for_approval(
                    answer.approval_id, timeout=self._approval_timeout, poll_seconds=self._poll
                )
                answer = await self._client.request_credential(
                    **self._request, approval_id=answer.approval_id
                )
                if isinstance(answer, PendingApproval):  # pragma: no cover - broker invariant
                    raise ApiError(
                        409, "approval_pending", "approval.still_pending", answer.detail, {}
                    )
        except BaseException:
            await self._client.close()
            raise
        self.credential = answer
        return answer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self.credential is not None:
                try:
                    await self._client.release(self.credential.credential_id)
                except ApiError:
                    if exc is None:
                        raise
        finally:
            await self._client.close()
