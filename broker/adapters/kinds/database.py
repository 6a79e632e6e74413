"""``database``: dynamic credentials from the database secrets engine (``<mount>/creds/<role>``)."""

from __future__ import annotations

from broker.adapters.kinds import KindSecret
from broker.adapters.vault_http import VaultHttp
from broker.core.model import TargetKind
from broker.core.ports import MintSpec


class DatabaseKind:
    """A fresh database user whose lease belongs to the task token."""

    kind = TargetKind.DATABASE

    async def read(self, vault: VaultHttp, spec: MintSpec, *, token: str) -> KindSecret:
        """Read ``<mount>/creds/<role>`` with the task token."""
        response = await vault.call(
            "reading database credentials",
            "GET",
            f"{spec.target.mount}/creds/{spec.target.role}",
            token=token,
        )
        data = response["data"]
        return KindSecret(
            secret={"username": data["username"], "password": data["password"]},
            lease_id=str(response["lease_id"]),
            lease_seconds=int(response["lease_duration"]),
            lease_renewable=bool(response.get("renewable")),
        )
