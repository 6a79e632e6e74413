"""The one error tree of tasklease.

Every error the broker raises on purpose is a :class:`TaskleaseError`. Each class maps to one
HTTP status and a stable ``code`` used in RFC 9457 problem+json bodies; an instance may carry a
finer ``reason`` (a stable, dotted reason code such as ``x509.leaf_is_ca``) that tests and
clients can rely on. Messages (``detail``) say what was checked, what was found and what was
expected, and never contain a secret; untrusted values in them are escaped and truncated with
:func:`broker.core.untrusted.printable`.

::

    TaskleaseError                         500 internal_error
    ├── ConfigurationError                 (start-up only) configuration_error
    ├── DemoFailedError                    (`tasklease demo` only) demo_failed
    ├── BadRequestError                    400 bad_request
    │   └── InputTooLargeError             400 input_too_large
    ├── AuthenticationError                401 unauthenticated
    │   ├── SpiffeIdError                  401 invalid_spiffe_id
    │   ├── SvidRejectedError              401 svid_rejected
    │   │   ├── X509SvidRejectedError      401 x509_svid_rejected
    │   │   └── JwtSvidRejectedError       401 jwt_svid_rejected
    │   ├── UntrustedDomainError           401 untrusted_trust_domain
    │   └── OidcTokenRejectedError         401 oidc_token_rejected
    ├── ApprovalPendingError               202 approval_pending (not a failure: the request
    │                                      waits for approvers; answered as 202 JSON with the
    │                                      approval id, never as problem+json)
    ├── ForbiddenError                     403 forbidden
    │   ├── PolicyDeniedError              403 policy_denied (carries policy_ids)
    │   └── ApprovalRefusedError           403 approval_refused (approval.digest_mismatch,
    │                                      approval.sod_violation, approval.not_approver, …)
    ├── NotFoundError                      404 not_found
    ├── ConflictError                      409 conflict
    │   ├── IdempotentReplayError          409 idempotency_replayed (carries credential_id)
    │   └── ApprovalStateError             409 approval_state (approval.expired, .used, …)
    ├── LimitExceededError                 429 limit_exceeded (limit.live_per_identity,
    │                                      limit.live_per_target, limit.rate_per_identity;
    │                                      carries limit and retry_after_seconds, sent as
    │                                      Retry-After)
    └── UnavailableError                   503 unavailable
        ├── BundleUnavailableError         503 bundle_unavailable
        ├── VaultUnavailableError          503 vault_unavailable
        │   └── MintOutcomeUnknownError    503 mint_outcome_unknown (a token may exist)
        ├── LedgerUnavailableError         503 ledger_unavailable
        ├── AuditUnavailableError          503 audit_unavailable
        └── StackError                     (dev stack) stack_error

Foreign exceptions are translated at the adapter that met them and chained
(``raise VaultUnavailableError(...) from exc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar


class TaskleaseError(Exception):
    """Base of every deliberate tasklease error."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.code

    def __str__(self) -> str:
        return self.detail

    def extra(self) -> dict[str, object]:
        """Additional problem+json members a client can act on (never a secret)."""
        return {}


class ConfigurationError(TaskleaseError):
    """A setting or configuration file is invalid; start-up stops and names the key."""

    code = "configuration_error"
    title = "Invalid configuration"


class BadRequestError(TaskleaseError):
    """The request is malformed or fails validation."""

    status = 400
    code = "bad_request"
    title = "Bad request"


class InputTooLargeError(BadRequestError):
    """An input exceeds a fixed size budget and was not parsed."""

    code = "input_too_large"
    title = "Input too large"


class AuthenticationError(TaskleaseError):
    """The caller's identity could not be established."""

    status = 401
    code = "unauthenticated"
    title = "Authentication failed"


class SpiffeIdError(AuthenticationError):
    """A SPIFFE ID or trust domain name does not follow the SPIFFE-ID specification."""

    code = "invalid_spiffe_id"
    title = "Invalid SPIFFE ID"


class SvidRejectedError(AuthenticationError):
    """An SVID failed verification."""

    code = "svid_rejected"
    title = "SVID rejected"


class X509SvidRejectedError(SvidRejectedError):
    """An X.509-SVID failed verification (chain, dates or a SPIFFE leaf rule)."""

    code = "x509_svid_rejected"
    title = "X.509-SVID rejected"


class JwtSvidRejectedError(SvidRejectedError):
    """A JWT-SVID failed verification (header, signature, claims)."""

    code = "jwt_svid_rejected"
    title = "JWT-SVID rejected"


class UntrustedDomainError(AuthenticationError):
    """The SVID's trust domain is not one the broker trusts."""

    code = "untrusted_trust_domain"
    title = "Untrusted trust domain"


class OidcTokenRejectedError(AuthenticationError):
    """A human OIDC ID token failed verification."""

    code = "oidc_token_rejected"
    title = "OIDC token rejected"


class ForbiddenError(TaskleaseError):
    """The caller is authenticated but not allowed to do this."""

    status = 403
    code = "forbidden"
    title = "Forbidden"


class PolicyDeniedError(ForbiddenError):
    """The policy decided deny; carries the determining policy ids."""

    code = "policy_denied"
    title = "Denied by policy"

    def __init__(self, detail: str, *, policy_ids: Sequence[str]) -> None:
        super().__init__(detail, reason="policy.deny")
        self.policy_ids = tuple(policy_ids)

    def extra(self) -> dict[str, object]:
        """The determining policy ids."""
        return {"policy_ids": list(self.policy_ids)}


class ApprovalRefusedError(ForbiddenError):
    """An approval step is not allowed for this caller or this request: the approval is bound
    to another request, the caller would approve their own request or one of a run they own,
    the caller is no approver, or the approval does not satisfy the policy."""

    code = "approval_refused"
    title = "Approval refused"


class NotFoundError(TaskleaseError):
    """The named resource does not exist (or the caller may not know it exists)."""

    status = 404
    code = "not_found"
    title = "Not found"


class ConflictError(TaskleaseError):
    """The request conflicts with the current state."""

    status = 409
    code = "conflict"
    title = "Conflict"


class IdempotentReplayError(ConflictError):
    """The Idempotency-Key was used before: the credential exists, its secret was sent once."""

    code = "idempotency_replayed"
    title = "Request already processed"

    def __init__(self, credential_id: str) -> None:
        super().__init__(
            f"this Idempotency-Key already produced credential {credential_id}; its secret was "
            "returned once and is not stored. If that response was lost, release the credential "
            "(DELETE /v1/credentials/{id}) and ask again with a new key",
            reason="idempotency.replayed",
        )
        self.credential_id = credential_id

    def extra(self) -> dict[str, object]:
        """The credential the key produced."""
        return {"credential_id": self.credential_id}


class ApprovalStateError(ConflictError):
    """The approval is in no state for this step (expired, withdrawn, denied, used, not
    pending, quorum not reached, or this approver decided it already)."""

    code = "approval_state"
    title = "Approval not in a usable state"


class LimitExceededError(TaskleaseError):
    """A quota is full: the caller holds as many live credentials as it may (per identity, or
    per identity and target), or was issued credentials faster than it may. Nothing was
    minted; ``retry_after`` says when a slot frees by itself (a live credential may also be
    released)."""

    status = 429
    code = "limit_exceeded"
    title = "Limit exceeded"

    def __init__(self, detail: str, *, reason: str, limit: int, retry_after: int) -> None:
        super().__init__(detail, reason=reason)
        self.limit = limit
        self.retry_after = max(1, retry_after)

    def extra(self) -> dict[str, object]:
        """The limit and the seconds until a slot frees by itself."""
        return {"limit": self.limit, "retry_after_seconds": self.retry_after}


class ApprovalPendingError(TaskleaseError):
    """Not a failure: the request needs a human decision first. The HTTP layer answers 202
    with the approval id and a poll URL (JSON, not problem+json); the agent retries the same
    request with ``approval_id`` once the approval is granted."""

    status = 202
    code = "approval_pending"
    title = "Approval pending"

    def __init__(
        self,
        detail: str,
        *,
        approval_id: str,
        state: str,
        quorum: int,
        approver_count: int,
        expires_at: str,
        policy_ids: Sequence[str],
        reused: bool,
    ) -> None:
        super().__init__(detail, reason="approval.pending")
        self.approval_id = approval_id
        self.state = state
        self.quorum = quorum
        self.approver_count = approver_count
        self.expires_at = expires_at
        self.policy_ids = tuple(policy_ids)
        self.reused = reused

    def extra(self) -> dict[str, object]:
        """What the agent needs to wait and retry."""
        return {
            "approval_id": self.approval_id,
            "state": self.state,
            "quorum": self.quorum,
            "approver_count": self.approver_count,
            "expires_at": self.expires_at,
            "policy_ids": list(self.policy_ids),
            "reused": self.reused,
        }


class UnavailableError(TaskleaseError):
    """A dependency is unavailable; nothing was issued."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"


class BundleUnavailableError(UnavailableError):
    """No fresh trust bundle is available for a trust domain: fail closed."""

    code = "bundle_unavailable"
    title = "Trust bundle unavailable"


class VaultUnavailableError(UnavailableError):
    """OpenBao/Vault is sealed, unreachable, rate limiting or refused the broker."""

    code = "vault_unavailable"
    title = "Vault unavailable"


class MintOutcomeUnknownError(VaultUnavailableError):
    """Minting failed in a way that may have left a task token behind (a timeout while it was
    being created, or a failed revoke). The write-ahead record stays so the sweeper and the
    reconciler find and revoke it; every other mint error means nothing was left behind."""

    code = "mint_outcome_unknown"
    title = "Mint outcome unknown"


class LedgerUnavailableError(UnavailableError):
    """The Redis ledger is unreachable or misconfigured."""

    code = "ledger_unavailable"
    title = "Ledger unavailable"


class AuditUnavailableError(UnavailableError):
    """A durable audit sink could not take an event: issuance fails closed."""

    code = "audit_unavailable"
    title = "Audit trail unavailable"


class StackError(UnavailableError):
    """A part of the local development stack failed to start or answer."""

    code = "stack_error"
    title = "Local stack error"


class DemoFailedError(TaskleaseError):
    """A step of ``tasklease demo`` did not behave as narrated (``step`` names which)."""

    code = "demo_failed"
    title = "Demo step failed"

    def __init__(self, detail: str, *, step: int | None = None, reason: str | None = None) -> None:
        super().__init__(detail, reason=reason or "demo.step_failed")
        self.step = step
