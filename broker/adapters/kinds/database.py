"""``database``: dynamic credentials from the database secrets engine (``<mount>/creds/<role>``)."""

from __future__ import annotations

import hvac

from broker.adapters.kinds import KindSecret
from broker.core.model import TargetKind
from broker.core.ports import MintSpec


class DatabaseKind:
    """A fresh database user whose lease belongs to the task token."""

    kind = TargetKind.DATABASE

    def read(self, task: hvac.Client, spec: MintSpec, *, token: str) -> KindSecret:
        """Read ``<mount>/creds/<role>`` with the task token."""
        response = task.secrets.database.generate_credentials(
            spec.target.role, mount_point=spec.target.mount
        )
        data = response["data"]
        return KindSecret(
            secret={"username": data["username"], "password": data["password"]},
            lease_id=str(response["lease_id"]),
            lease_seconds=int(response["lease_duration"]),
            lease_renewable=bool(response.get("renewable")),
        )
