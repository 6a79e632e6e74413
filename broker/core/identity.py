"""Authenticated identities: what a verified SVID or OIDC token proves about a caller."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from broker.core.spiffe_id import SpiffeId


class AuthMethod(StrEnum):
    """How a caller proved its identity."""

    X509_SVID = "x509-svid"
    JWT_SVID = "jwt-svid"


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A workload whose SVID was verified against the bundle of its own trust domain.

    ``expires_at`` is the SVID's expiry (timezone-aware UTC): a credential issued to this
    identity never outlives it when the SVID is a JWT-SVID.
    """

    spiffe_id: SpiffeId
    expires_at: datetime
    method: AuthMethod


@dataclass(frozen=True, slots=True)
class HumanIdentity:
    """A person (approver or admin) whose OIDC ID token was verified against its issuer.

    ``subject`` is the issuer's stable ``sub``; ``display`` is a readable name (email or
    preferred username) for audit and logs, never used for authorisation.
    """

    issuer: str
    subject: str
    display: str
    expires_at: datetime
    groups: tuple[str, ...] = ()

    @property
    def principal_id(self) -> str:
        """A stable identifier that cannot collide with a SPIFFE ID: ``oidc:<issuer>#<sub>``."""
        return f"oidc:{self.issuer}#{self.subject}"
