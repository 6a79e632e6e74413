"""Who is calling: one verified identity per request, and the roles it has.

A caller proves its identity in exactly one way:

* **mTLS with an X.509-SVID** — the TLS handshake proved possession of the leaf's key; the
  chain is then verified against the bundle of the leaf's *own* trust domain;
* **``Authorization: Bearer`` with a JWT-SVID** — verified against the bundle of the ``sub``'s
  trust domain;
* **``Authorization: Bearer`` with an OIDC ID token** from a configured issuer (people).

Presenting both a client certificate and a bearer token is refused (``auth.ambiguous``): two
identities on one request would make "who did this" a guess. A certificate pasted into a header
is never read: only the TLS layer's peer certificate counts. An identity with no role is
refused with 403 (``auth.no_role``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from broker.core.identity import HumanIdentity, WorkloadIdentity
from broker.core.roles import Role, RoleMap
from broker.core.untrusted import printable
from broker.errors import AuthenticationError, ForbiddenError

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9\-._~+/]+=*)")
MAX_AUTHORIZATION_CHARS = 16 * 1024


class X509Authenticating(Protocol):
    """Verifies a peer's certificate chain (leaf first) from a completed mTLS handshake."""

    def authenticate(self, chain: Sequence[x509.Certificate], *, now: datetime) -> WorkloadIdentity:
        """The workload the chain proves, or raise an AuthenticationError."""
        ...


class JwtSvidVerifying(Protocol):
    """Verifies a JWT-SVID."""

    def verify(self, token: str, *, now: datetime) -> WorkloadIdentity:
        """The workload the token proves, or raise an AuthenticationError."""
        ...


class OidcVerifying(Protocol):
    """Verifies OIDC ID tokens of configured issuers."""

    def issuer_of(self, token: str) -> str | None:
        """The configured issuer a token claims to be from (unverified; for routing only)."""
        ...

    def verify(self, token: str, *, now: datetime) -> tuple[HumanIdentity, Mapping[str, Any]]:
        """The person and their verified claims, or raise an AuthenticationError."""
        ...


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller and its roles."""

    identity: WorkloadIdentity | HumanIdentity
    roles: frozenset[Role]

    @property
    def principal_id(self) -> str:
        """The SPIFFE ID of a workload, ``oidc:<issuer>#<sub>`` of a person."""
        if isinstance(self.identity, WorkloadIdentity):
            return str(self.identity.spiffe_id)
        return self.identity.principal_id

    @property
    def is_workload(self) -> bool:
        """True for an SVID-authenticated workload."""
        return isinstance(self.identity, WorkloadIdentity)

    def has_any(self, roles: Sequence[Role]) -> bool:
        """True when the caller holds at least one of ``roles``."""
        return not self.roles.isdisjoint(roles)

    def require(self, role: Role, what: str) -> None:
        """Raise ``403 auth.role_required`` unless the caller holds ``role`` (``what`` it
        needs it for, in the message)."""
        if role not in self.roles:
            raise ForbiddenError(
                f"{self.principal_id} needs the {role.value} role to {what} "
                f"(has {sorted(r.value for r in self.roles)})",
                reason="auth.role_required",
            )


class CallerAuthenticator:
    """Turns what a request presented into a :class:`Caller`, or a typed 401/403."""

    def __init__(
        self,
        *,
        x509_svids: X509Authenticating,
        jwt_svids: JwtSvidVerifying,
        oidc: OidcVerifying | None,
        roles: RoleMap,
    ) -> None:
        self._x509 = x509_svids
        self._jwt = jwt_svids
        self._oidc = oidc
        self._roles = roles

    def authenticate(
        self,
        *,
        peer_chain: Sequence[x509.Certificate],
        authorization: str | None,
        now: datetime,
    ) -> Caller:
        """Authenticate exactly one presented identity and map it to roles."""
        if peer_chain and authorization is not None:
            raise AuthenticationError(
                "the request presents both a client certificate and an Authorization header; "
                "present exactly one identity",
                reason="auth.ambiguous",
            )
        if peer_chain:
            workload = self._x509.authenticate(peer_chain, now=now)
            return self._workload_caller(workload)
        if authorization is None:
            raise AuthenticationError(
                "no identity presented: use mTLS with an X.509-SVID, or "
                "'Authorization: Bearer' with a JWT-SVID or an OIDC ID token",
                reason="auth.missing",
            )
        token = _bearer_token(authorization)
        if self._oidc is not None and self._oidc.issuer_of(token) is not None:
            human, claims = self._oidc.verify(token, now=now)
            roles = self._roles.roles_for_human(human, claims)
            if not roles:
                raise ForbiddenError(
                    f"{printable(human.display)} ({printable(human.principal_id)}) has no "
                    "tasklease role (see config/identities.toml)",
                    reason="auth.no_role",
                )
            return Caller(human, roles)
        return self._workload_caller(self._jwt.verify(token, now=now))

    def _workload_caller(self, workload: WorkloadIdentity) -> Caller:
        roles = self._roles.roles_for_workload(workload)
        if not roles:
            raise ForbiddenError(
                f"{printable(str(workload.spiffe_id))} has no tasklease role "
                "(see config/identities.toml)",
                reason="auth.no_role",
            )
        return Caller(workload, roles)


def _bearer_token(authorization: str) -> str:
    if len(authorization) > MAX_AUTHORIZATION_CHARS:
        raise AuthenticationError(
            f"Authorization header is {len(authorization)} characters, the limit is "
            f"{MAX_AUTHORIZATION_CHARS}",
            reason="auth.header_too_large",
        )
    match = _BEARER.fullmatch(authorization)
    if match is None:
        scheme = authorization.split(" ", 1)[0]
        raise AuthenticationError(
            f"Authorization header must be 'Bearer <token>' (got scheme {printable(scheme, 20)})",
            reason="auth.bad_authorization_header",
        )
    return match.group(1)
