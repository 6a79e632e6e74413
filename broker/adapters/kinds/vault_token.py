"""``vault-token``: the per-task token itself, carrying the target's policies."""

from __future__ import annotations

import hvac

from broker.adapters.kinds import KindSecret
from broker.core.model import TargetKind
from broker.core.ports import MintSpec


class VaultTokenKind:
    """Hands the agent the task token (its TTL is the credential's)."""

    kind = TargetKind.VAULT_TOKEN

    def read(self, task: hvac.Client, spec: MintSpec, *, token: str) -> KindSecret:
        """No read: the token is the secret."""
        return KindSecret(secret={"token": token, "policies": list(spec.target.policies)})
