"""``ssh``: the agent's SSH public key signed by the SSH CA (``<mount>/sign/<role>``).

SSH certificates cannot be revoked early by Vault (there is no lease), so the target is
configured ``revocable = false`` and the TTL is clamped hard: ValidBefore is the task's end.
The agent sends its public key; its private key never leaves it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization

from broker.adapters.kinds import KindSecret
from broker.adapters.vault_http import VaultHttp
from broker.core.model import TargetKind
from broker.core.ports import MintSpec
from broker.errors import BadRequestError, VaultUnavailableError

_KEY_TYPES = ("ssh-ed25519 ", "ecdsa-sha2-nistp256 ", "ecdsa-sha2-nistp384 ", "ssh-rsa ")


class SshKind:
    """A signed SSH user certificate; not revocable, TTL clamped to the task."""

    kind = TargetKind.SSH

    async def read(self, vault: VaultHttp, spec: MintSpec, *, token: str) -> KindSecret:
        """Sign the request's ``public_key`` with the task token."""
        public_key = spec.params.get("public_key", "")
        if not public_key.startswith(_KEY_TYPES) or len(public_key) > 16 * 1024:
            raise BadRequestError(
                "an ssh target needs params.public_key: one OpenSSH public key "
                "(ssh-ed25519, ecdsa-sha2-nistp256/384 or ssh-rsa)",
                reason="ssh.public_key_required",
            )
        response = await vault.call(
            "signing an SSH key",
            "POST",
            f"{spec.target.mount}/sign/{spec.target.role}",
            token=token,
            body={
                "public_key": public_key,
                "valid_principals": spec.target.params.get("valid_principals", ""),
                "ttl": f"{int(spec.ttl.total_seconds())}s",
                "cert_type": "user",
            },
        )
        data = response["data"]
        certificate = serialization.load_ssh_public_identity(data["signed_key"].encode("ascii"))
        if not isinstance(certificate, serialization.SSHCertificate):
            raise VaultUnavailableError(
                "the SSH CA returned something that is not an SSH certificate",
                reason="vault.bad_ssh_certificate",
            )
        return KindSecret(
            secret={"signed_key": data["signed_key"], "serial_number": data["serial_number"]},
            not_after=datetime.fromtimestamp(certificate.valid_before, UTC),
            revocable=False,
        )
