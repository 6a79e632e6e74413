"""``pki``: a short-lived certificate from ``<mount>/issue/<role>`` (role: generate_lease=true).

Relying parties that do not check CRL/OCSP accept a certificate until its NotAfter, so the
NotAfter must not pass the task's end: it is checked, not assumed.
"""

from __future__ import annotations

import re

from cryptography import x509

from broker.adapters.kinds import KindSecret
from broker.adapters.vault_http import VaultHttp
from broker.core.model import TargetKind
from broker.core.ports import MintSpec

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def _label(value: str) -> str:
    return _NOT_DNS.sub("-", value.lower()).strip("-")[:63] or "x"


class PkiKind:
    """A client certificate for ``<task>.<workflow>.<domain>`` with TTL = the task TTL."""

    kind = TargetKind.PKI

    async def read(self, vault: VaultHttp, spec: MintSpec, *, token: str) -> KindSecret:
        """Issue a certificate with the task token."""
        domain = spec.target.params.get("domain", "agents.tasklease.test")
        common_name = f"{_label(spec.task_id)}.{_label(spec.workflow_id)}.{domain}"
        response = await vault.call(
            "issuing a certificate",
            "POST",
            f"{spec.target.mount}/issue/{spec.target.role}",
            token=token,
            body={"common_name": common_name, "ttl": f"{int(spec.ttl.total_seconds())}s"},
        )
        data = response["data"]
        cert = x509.load_pem_x509_certificate(data["certificate"].encode("ascii"))
        return KindSecret(
            secret={
                "certificate": data["certificate"],
                "private_key": data["private_key"],
                "private_key_type": data.get("private_key_type", ""),
                "issuing_ca": data.get("issuing_ca", ""),
                "ca_chain": list(data.get("ca_chain") or []),
                "serial_number": data["serial_number"],
            },
            lease_id=str(response.get("lease_id") or ""),
            lease_seconds=int(response.get("lease_duration") or 0),
            not_after=cert.not_valid_after_utc,
        )
