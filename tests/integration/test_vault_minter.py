"""Minting and revoking per-task credentials against the real OpenBao (and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import hvac.exceptions
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.adapters.clock import SystemClock
from broker.adapters.kinds import KindSecret, all_kinds
from broker.adapters.kinds.pki import PkiKind
from broker.adapters.vault import HvacVault, VaultMinter
from broker.adapters.vault_http import VaultHttp
from broker.adapters.workload_api import WorkloadApiSource
from broker.config import VaultSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Sensitivity,
    Target,
    TargetKind,
)
from broker.core.ports import MintSpec
from broker.devstack import DevStack
from broker.errors import BadRequestError, ConfigurationError, VaultUnavailableError
from tests.conftest import remember_secret
from tests.integration.clients import openbao_root as _root
from tests.integration.clients import orders_as as _pg_login
from tests.integration.clients import token_accessors

pytestmark = pytest.mark.stack

CHAIN = DelegationChain(
    (
        DelegationHop("owner", "alice", verified=False),
        DelegationHop("orchestrator", "spiffe://tasklease.test/orchestrator/demo", verified=True),
        DelegationHop("agent", "spiffe://tasklease.test/agent/demo", verified=True),
    )
)


def _target(kind: TargetKind, **overrides: object) -> Target:
    defaults: dict[str, object] = {
        TargetKind.DATABASE: {
            "mount": "database",
            "role": "demo-readonly",
            "policies": ("target-demo-db",),
        },
        TargetKind.PKI: {"mount": "pki", "role": "agent-cert", "policies": ("target-demo-pki",)},
        TargetKind.SSH: {
            "mount": "ssh",
            "role": "agent-ssh",
            "policies": ("target-demo-ssh",),
            "revocable": False,
            "params": {"valid_principals": "demo"},
        },
        TargetKind.VAULT_TOKEN: {"policies": ("target-demo-kv",)},
    }[kind]  # type: ignore[assignment]
    fields = {
        "name": f"t-{kind.value}",
        "kind": kind,
        "system": "demo",
        "environment": "dev",
        "sensitivity": Sensitivity.INTERNAL,
        "max_ttl": timedelta(minutes=15),
        **defaults,
        **overrides,
    }
    return Target(**fields)  # type: ignore[arg-type]


def _spec(target: Target, ttl: int = 60, **params: str) -> MintSpec:
    return MintSpec(
        credential_id=f"cred_test_{target.kind.value}_{ttl}",
        workflow_id="wf-minter",
        task_id="task-1",
        holder="spiffe://tasklease.test/agent/demo",
        owner="alice",
        chain=CHAIN,
        target=target,
        ttl=timedelta(seconds=ttl),
        params=params,
    )


@pytest.fixture
async def minter(stack: DevStack) -> AsyncIterator[VaultMinter]:
    """A minter logged in as the broker (its own JWT-SVID through OpenBao JWT auth)."""
    assert stack.endpoints is not None
    source = WorkloadApiSource(socket_path=f"unix://{stack.endpoints.spire_agent_socket}")
    await source.start()
    vault = HvacVault(
        settings=VaultSettings(addr=stack.endpoints.openbao_addr),
        jwt_svid=source.fetch_jwt_svid,
        now=SystemClock().now,
    )
    session = await vault.login()
    assert "tasklease-broker" in session.policies
    minter = VaultMinter(vault=vault, kinds=all_kinds(), now=SystemClock().now)
    try:
        yield minter
    finally:
        await minter.close()
        vault.close()
        source.close()


async def test_database_credential_is_bound_to_the_task_token_and_revoked_with_it(
    stack: DevStack, minter: VaultMinter
) -> None:
    minted = await minter.mint(_spec(_target(TargetKind.DATABASE), ttl=45))
    user, password = minted.secret["username"], remember_secret(minted.secret["password"])
    assert _pg_login(stack, user, password) == 3
    root = _root(stack)
    token = root.auth.token.lookup_accessor(minted.token_accessor)["data"]
    assert 0 < token["ttl"] <= 45
    assert token["renewable"] is False
    assert token["orphan"] is True
    assert sorted(token["policies"]) == ["target-demo-db"]
    assert token["meta"]["credential_id"] == "cred_test_database_45"
    assert token["meta"]["holder"] == "spiffe://tasklease.test/agent/demo"
    assert token["meta"]["owner"] == "alice"
    (lease_id,) = minted.vault_lease_ids
    # The engine's default TTL (1 h) is shortened to the task's by the step the minter leaves
    # to its caller (run alongside the record of the credential).
    assert root.sys.read_lease(lease_id)["data"]["ttl"] > 45
    assert minted.finish is not None
    await minted.finish()
    assert root.sys.read_lease(lease_id)["data"]["ttl"] <= 45
    assert minted.expires_at <= datetime.now(UTC) + timedelta(seconds=45)

    outcome = await minter.revoke(
        token_accessor=minted.token_accessor, vault_lease_ids=minted.vault_lease_ids
    )
    assert (outcome.confirmed, outcome.still_live) == (True, ())
    with pytest.raises(psycopg.OperationalError):
        _pg_login(stack, user, password)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
        root.sys.read_lease(lease_id)
    # Revocation is idempotent.
    again = await minter.revoke(
        token_accessor=minted.token_accessor, vault_lease_ids=minted.vault_lease_ids
    )
    assert again.confirmed is True


async def test_pki_certificate_ends_with_the_task_and_is_revoked_with_it(
    stack: DevStack, minter: VaultMinter
) -> None:
    minted = await minter.mint(_spec(_target(TargetKind.PKI), ttl=90))
    cert = x509.load_pem_x509_certificate(minted.secret["certificate"].encode())
    assert cert.not_valid_after_utc <= minted.expires_at + timedelta(seconds=2)
    assert cert.not_valid_after_utc <= datetime.now(UTC) + timedelta(seconds=92)
    assert "BEGIN" in minted.secret["private_key"]
    remember_secret(minted.secret["private_key"].splitlines()[1])
    await minter.revoke(
        token_accessor=minted.token_accessor, vault_lease_ids=minted.vault_lease_ids
    )
    serial = minted.secret["serial_number"]
    record = _root(stack).read(f"pki/cert/{serial}")["data"]
    assert record["revocation_time"] > 0


async def test_ssh_certificate_is_clamped_to_the_task_ttl(
    stack: DevStack, minter: VaultMinter, tmp_path: Path
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    minted = await minter.mint(_spec(_target(TargetKind.SSH), ttl=120, public_key=public))
    assert minted.vault_lease_ids == ()
    cert = serialization.load_ssh_public_identity(minted.secret["signed_key"].encode())
    assert isinstance(cert, serialization.SSHCertificate)
    assert cert.valid_before - int(datetime.now(UTC).timestamp()) <= 121
    assert cert.valid_principals == [b"demo"]
    keygen = shutil.which("ssh-keygen")
    assert keygen is not None, "ssh-keygen (openssh-client) is part of the stack prerequisites"
    cert_file = tmp_path / "id-cert.pub"
    cert_file.write_text(minted.secret["signed_key"])
    keygen_run = await asyncio.to_thread(
        subprocess.run,
        [keygen, "-L", "-f", str(cert_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    listing = keygen_run.stdout
    assert "Type: ssh-ed25519-cert-v01@openssh.com user certificate" in listing
    assert "demo" in listing
    await minter.revoke(token_accessor=minted.token_accessor, vault_lease_ids=())


async def test_ssh_needs_a_public_key(minter: VaultMinter, stack: DevStack) -> None:
    with pytest.raises(BadRequestError) as caught:
        await minter.mint(_spec(_target(TargetKind.SSH), public_key="not a key"))
    assert caught.value.reason == "ssh.public_key_required"


async def test_vault_token_kind_hands_out_the_task_token(
    stack: DevStack, minter: VaultMinter
) -> None:
    minted = await minter.mint(_spec(_target(TargetKind.VAULT_TOKEN), ttl=30))
    assert stack.endpoints is not None
    task = hvac.Client(
        url=stack.endpoints.openbao_addr, token=remember_secret(minted.secret["token"])
    )
    secret = task.secrets.kv.v2.read_secret_version(
        path="demo/app", mount_point="kv", raise_on_deleted_version=True
    )
    assert secret["data"]["data"]["note"] == "demo value, not a credential"
    await minter.revoke(token_accessor=minted.token_accessor, vault_lease_ids=())
    with pytest.raises(hvac.exceptions.Forbidden):
        task.secrets.kv.v2.read_secret_version(
            path="demo/app", mount_point="kv", raise_on_deleted_version=True
        )


class OverlongPki(PkiKind):
    """A PKI kind asking for three times the task TTL: what a misconfigured role or engine
    default would produce. The minter must notice the NotAfter, revoke, and refuse."""

    async def read(self, vault: VaultHttp, spec: MintSpec, *, token: str) -> KindSecret:
        return await super().read(vault, dataclasses.replace(spec, ttl=spec.ttl * 3), token=token)


async def test_a_certificate_outliving_the_task_is_revoked_and_refused(
    stack: DevStack, minter: VaultMinter
) -> None:
    """SECURITY 22: a certificate whose NotAfter passes the task token → nothing handed out,
    the task token (and the certificate's lease) revoked."""
    before = token_accessors(stack)
    overlong = VaultMinter(
        vault=minter._vault,
        kinds={TargetKind.PKI: OverlongPki()},
        now=SystemClock().now,
    )
    with pytest.raises(VaultUnavailableError) as caught:
        await overlong.mint(_spec(_target(TargetKind.PKI), ttl=60))
    assert caught.value.reason == "vault.outlives_task"
    assert token_accessors(stack) - before == set()  # the task token did not survive


@contextlib.contextmanager
def _task_role_changed(stack: DevStack, **changes: object) -> Iterator[None]:
    root = _root(stack)
    path = "auth/token/roles/tasklease-task"
    saved = root.read(path)["data"]
    keep = (
        "allowed_policies",
        "disallowed_policies",
        "orphan",
        "renewable",
        "token_type",
        "token_no_default_policy",
        "token_explicit_max_ttl",
        "token_period",
    )
    root.write(path, **{**{k: saved[k] for k in keep if k in saved}, **changes})
    try:
        yield
    finally:
        root.write(path, **{k: saved[k] for k in keep if k in saved})


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"renewable": True}, "renewable must be false"),
        ({"orphan": False}, "orphan must be true"),
        ({"token_type": "batch", "token_explicit_max_ttl": 0}, "token_type must be"),
        ({"token_period": "1h"}, "token_period must be unset"),
    ],
)
async def test_an_unsafe_task_token_role_stops_start_up(
    stack: DevStack, minter: VaultMinter, changes: dict[str, object], problem: str
) -> None:
    """SECURITY 28: batch, periodic, renewable or non-orphan task tokens → refused at start."""
    await minter.check_task_token_role()
    with _task_role_changed(stack, **changes), pytest.raises(ConfigurationError, match=problem):
        await minter.check_task_token_role()


async def test_an_unsafe_task_token_is_refused_and_revoked_at_mint(
    stack: DevStack, minter: VaultMinter
) -> None:
    """If the role is changed under a running broker, the minted token itself is checked."""
    before = token_accessors(stack)
    with _task_role_changed(stack, orphan=False), pytest.raises(VaultUnavailableError) as caught:
        await minter.mint(_spec(_target(TargetKind.VAULT_TOKEN)))
    assert caught.value.reason == "vault.unsafe_task_token"
    assert "not an orphan" in caught.value.detail
    assert token_accessors(stack) - before == set()  # the task token did not survive


async def test_a_malformed_lease_id_is_never_counted_as_revoked(minter: VaultMinter) -> None:
    """SECURITY 25: sys/leases/revoke says success for anything; a malformed id stays live."""
    outcome = await minter.revoke(token_accessor="", vault_lease_ids=("../../sys/x",))
    assert outcome.confirmed is False
    assert outcome.still_live == ("../../sys/x",)


async def test_a_sealed_openbao_is_a_clear_503_and_nothing_is_left(
    stack: DevStack, minter: VaultMinter
) -> None:
    """SECURITY 24: sealed → VaultUnavailableError(vault.sealed)."""
    root = _root(stack)
    root.sys.seal()
    try:
        with pytest.raises(VaultUnavailableError) as caught:
            await minter.mint(_spec(_target(TargetKind.DATABASE)))
        assert caught.value.reason == "vault.sealed"
        assert caught.value.status == 503
    finally:
        stack.unseal_openbao()
