"""``vault-token``: the per-task token itself, carrying the target's policies."""

from __future__ import annotations

from broker.adapters.kinds import KindSecret
from broker.adapters.vault_http import VaultHttp
from broker.core.model import TargetKind
from broker.core.ports import MintSpec


class VaultTokenKind:
    """Hands the agent the task token (its TTL is the credential's)."""

    kind = TargetKind.VAULT_TOKEN

    async def read(self, vault: VaultHttp, spec: MintSpec, *, token: str) -> KindSecret:
        """No read: the token is the secret."""
        return KindSecret(secret={"token": token, "policies": list(spec.target.policies)})
