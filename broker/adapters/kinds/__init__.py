"""Secret kinds: one class per Vault secrets engine, all behind :class:`SecretKind`.

Each kind reads its secret *with the per-task token* (so every lease belongs to that token and
dies with it) and says what it got: the secret for the caller, the lease id if any, and the
certificate's NotAfter if any, so the minter can refuse anything that would outlive the task.
A new secrets engine is one new module here and one entry in :data:`KINDS`.

Kinds are async and speak to Vault through :class:`~broker.adapters.vault_http.VaultHttp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from broker.adapters.vault_http import VaultHttp
from broker.core.model import TargetKind
from broker.core.ports import MintSpec


@dataclass(frozen=True, slots=True)
class KindSecret:
    """What a kind read. ``secret`` goes to the caller once; nothing else of it is kept."""

    secret: Mapping[str, Any] = field(repr=False)
    lease_id: str = ""
    lease_seconds: int = 0
    lease_renewable: bool = False
    not_after: datetime | None = None
    revocable: bool = True


class SecretKind(Protocol):
    """Reads one kind of secret with the task token."""

    kind: TargetKind

    async def read(self, vault: VaultHttp, spec: MintSpec, *, token: str) -> KindSecret:
        """Read the secret for ``spec`` from ``vault`` with the task ``token``."""
        ...


def all_kinds() -> Mapping[TargetKind, SecretKind]:
    """Every supported kind by its name."""
    from broker.adapters.kinds.database import DatabaseKind  # noqa: PLC0415
    from broker.adapters.kinds.pki import PkiKind  # noqa: PLC0415
    from broker.adapters.kinds.ssh import SshKind  # noqa: PLC0415
    from broker.adapters.kinds.vault_token import VaultTokenKind  # noqa: PLC0415

    kinds: list[SecretKind] = [VaultTokenKind(), DatabaseKind(), PkiKind(), SshKind()]
    return {k.kind: k for k in kinds}
