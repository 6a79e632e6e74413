"""HTTPS clients for the running broker: trust the dev CA, present real SPIRE-minted SVIDs."""

from __future__ import annotations

import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import hvac.exceptions
import psycopg

from broker.adapters.clock import SystemClock
from broker.adapters.config_files import load_target_catalog, read_policy_dir
from broker.adapters.kinds import all_kinds
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.vault import HvacVault, VaultMinter
from broker.adapters.workload_api import WorkloadApiSource
from broker.bootstrap import RunningBroker
from broker.config import RedisSettings, VaultSettings
from broker.core.model import DelegationChain, DelegationHop, Lease
from broker.core.policy import CedarPolicyEngine, WorkingHours
from broker.core.ports import MintSpec
from broker.core.roles import parse_role_map
from broker.devstack import DevStack
from tests.conftest import remember_secret

StartBroker = Callable[..., Awaitable[RunningBroker]]


def client_context(stack: DevStack, tmp_path: Path, spiffe_id: str | None = None) -> ssl.SSLContext:
    """Trust the dev CA; with ``spiffe_id``, present a real SPIRE-minted X.509-SVID."""
    minted = stack.mint_x509_svid(spiffe_id or f"spiffe://{stack.trust_domain}/test/anonymous")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=minted["bundle"])
    context.check_hostname = False  # the broker's SVID has a URI SAN, not a DNS name
    if spiffe_id is not None:
        stem = spiffe_id.rsplit("/", 1)[-1]
        cert, key = tmp_path / f"{stem}-svid.pem", tmp_path / f"{stem}-key.pem"
        cert.write_text(minted["svid"])
        key.write_text(minted["key"])
        key.chmod(0o600)
        context.load_cert_chain(cert, key)
    return context


async def call(
    broker: RunningBroker,
    context: ssl.SSLContext,
    method: str,
    path: str,
    *,
    json_body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request; the status and the JSON body."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"{broker.url}{path}", ssl=context, json=json_body, headers=headers or {}
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


async def start_run(
    stack: DevStack,
    broker: RunningBroker,
    orchestrator: ssl.SSLContext,
    run_id: str,
    *,
    owner: str,
    purpose: str,
    ttl_seconds: int = 600,
    participant: str | None = None,
) -> dict[str, Any]:
    """POST /v1/workflows as the orchestrator, with ``participant`` (default: the demo agent)
    as the one participant; asserts 201 and returns the run."""
    status, body = await call(
        broker,
        orchestrator,
        "POST",
        "/v1/workflows",
        json_body={
            "id": run_id,
            "owner": owner,
            "purpose": purpose,
            "ttl_seconds": ttl_seconds,
            "participants": [participant or workload_id(stack, "agent")],
        },
    )
    assert status == 201, body
    return body


async def ready_then_issue(
    stack: DevStack, broker: RunningBroker, tmp_path: Path, target: str
) -> dict[str, Any]:
    """The broker answers /readyz 200; the demo orchestrator starts a run of alice's and the
    demo agent gets a ``target`` credential in it (60 s): the 201 body, its secret remembered
    for the secret scan."""
    agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    status, ready = await call(broker, agent, "GET", "/readyz")
    assert status == 200, ready
    run_id = f"wf-{uuid.uuid4().hex[:12]}"
    await start_run(stack, broker, orchestrator, run_id, owner="alice@example.test", purpose="TLS")
    status, issued = await call(
        broker,
        agent,
        "POST",
        "/v1/credentials",
        json_body={"workflow_id": run_id, "task_id": "t1", "target": target, "ttl_seconds": 60},
        headers={"Idempotency-Key": f"tlk-{uuid.uuid4().hex}"},
    )
    assert status == 201, issued
    for name in ("token", "password"):
        if name in issued["secret"]:
            remember_secret(issued["secret"][name])
    return issued


def workload_id(stack: DevStack, name: str) -> str:
    """The SPIFFE ID of a demo workload (agent, orchestrator, admin) in the dev trust domain."""
    return f"spiffe://{stack.trust_domain}/{name}/demo"


# --------------------------------------------------------------------------- the stack's own view


def openbao_root(stack: DevStack) -> hvac.Client:
    """An hvac client with the dev stack's root token (tests only: the broker never has it)."""
    assert stack.endpoints is not None
    return hvac.Client(url=stack.endpoints.openbao_addr, token=stack.endpoints.openbao_root_token)


def token_accessors(stack: DevStack) -> set[str]:
    """Every token accessor OpenBao holds now. Tests compare these sets ("no new token"),
    never their sizes: a token an earlier test issued may expire in between, which a count
    would take for a change."""
    return set(openbao_root(stack).list("auth/token/accessors")["data"]["keys"])


def orders_as(stack: DevStack, user: str, password: str) -> int:
    """Log into the demo PostgreSQL database as ``user`` and count the orders (raises
    ``psycopg.OperationalError`` when the login is refused)."""
    assert stack.endpoints is not None
    with psycopg.connect(
        host="127.0.0.1",
        port=stack.endpoints.postgres_port,
        dbname="demo",
        user=user,
        password=password,
        connect_timeout=5,
    ) as conn:
        row = conn.execute("SELECT count(*) FROM orders").fetchone()
        assert row is not None
        return int(row[0])


def token_alive(stack: DevStack, accessor: str) -> bool:
    """Whether OpenBao still knows the token behind ``accessor``. OpenBao answers 403 for a
    token in the middle of its revocation: asked again until it says one or the other."""
    for _ in range(50):
        try:
            openbao_root(stack).auth.token.lookup_accessor(accessor)
        except hvac.exceptions.InvalidRequest as exc:
            assert "invalid accessor" in str(exc)
            return False
        except hvac.exceptions.Forbidden:
            time.sleep(0.1)
            continue
        return True
    raise AssertionError(f"OpenBao kept answering 403 for accessor {accessor}")


def lease_alive(stack: DevStack, lease_id: str) -> bool:
    """Whether OpenBao still knows the lease ``lease_id``."""
    try:
        openbao_root(stack).sys.read_lease(lease_id)
    except hvac.exceptions.InvalidRequest as exc:
        assert "invalid lease" in str(exc)
        return False
    return True


@contextlib.asynccontextmanager
async def broker_minter_and_ledger(
    stack: DevStack, namespace_prefix: str
) -> AsyncIterator[tuple[VaultMinter, RedisLedger]]:
    """The broker's minter logged into OpenBao with its own JWT-SVID, and a Redis ledger in a
    namespace of its own (``<prefix><random>``); everything closed afterwards."""
    assert stack.endpoints is not None
    source = WorkloadApiSource(socket_path=f"unix://{stack.endpoints.spire_agent_socket}")
    await source.start()
    vault = HvacVault(
        settings=VaultSettings(addr=stack.endpoints.openbao_addr),
        jwt_svid=source.fetch_jwt_svid,
        now=SystemClock().now,
    )
    ledger: RedisLedger | None = None
    minter: VaultMinter | None = None
    try:
        await vault.login()
        ledger = RedisLedger(
            settings=RedisSettings(url=stack.endpoints.redis_url),
            namespace=f"{namespace_prefix}{uuid.uuid4().hex[:10]}",
        )
        minter = VaultMinter(vault=vault, kinds=all_kinds(), now=SystemClock().now)
        yield minter, ledger
    finally:
        if minter is not None:
            await minter.close()
        if ledger is not None:
            await ledger.close()
        vault.close()
        source.close()


DEMO_KV = load_target_catalog(Path("config/targets.toml"))["demo-kv"]
DEMO_ORCHESTRATOR = "spiffe://tasklease.test/orchestrator/demo"
# The workload roles of the demo identities, for authorizers built outside a broker.
DEMO_ROLES = parse_role_map(
    {
        "workload": [
            {"pattern": "spiffe://tasklease.test/agent/*", "roles": ["agent"]},
            {"pattern": "spiffe://tasklease.test/orchestrator/*", "roles": ["orchestrator"]},
        ]
    }
)


def demo_kv_lease(
    credential_id: str,
    *,
    workflow_id: str,
    task_id: str,
    holder: str,
    now: datetime,
    justification: str = "read the demo settings",
) -> Lease:
    """A five-minute ``demo-kv`` lease of ``holder`` (owner alice, the demo orchestrator),
    as the broker would write it ahead."""
    return Lease(
        credential_id=credential_id,
        workflow_id=workflow_id,
        task_id=task_id,
        target=DEMO_KV.name,
        kind=DEMO_KV.kind,
        sensitivity=DEMO_KV.sensitivity,
        holder=holder,
        owner="alice@example.test",
        chain=DelegationChain(
            (
                DelegationHop("owner", "alice@example.test", verified=False),
                DelegationHop("orchestrator", DEMO_ORCHESTRATOR, verified=True),
                DelegationHop("agent", holder, verified=True),
            )
        ),
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
        tool="vault",
        justification=justification,
    )


async def mint_task_token(minter: VaultMinter, lease: Lease) -> str:
    """A real OpenBao task token for ``lease`` (a demo-kv lease; not recorded): its accessor."""
    minted = await minter.mint(
        MintSpec(
            credential_id=lease.credential_id,
            workflow_id=lease.workflow_id,
            task_id=lease.task_id,
            holder=lease.holder,
            owner=lease.owner,
            chain=lease.chain,
            target=DEMO_KV,
            ttl=lease.expires_at - lease.issued_at,
        )
    )
    remember_secret(str(minted.secret["token"]))
    return minted.token_accessor


async def issue_recorded(
    ledger: RedisLedger, minter: VaultMinter, lease: Lease, *, real: bool = True
) -> Lease:
    """``lease`` written ahead, minted (a real task token; with ``real=False`` an accessor
    OpenBao never issued) and activated, as the broker issues it: the active lease."""
    await ledger.write_ahead(lease)
    accessor = await mint_task_token(minter, lease) if real else f"never-issued-{uuid.uuid4().hex}"
    return await ledger.activate(lease.credential_id, token_accessor=accessor, vault_lease_ids=())


def demo_policy_engine(extra: str = "") -> CedarPolicyEngine:
    """The shipped policy set (config/policies), plus ``extra`` (Cedar text) when given, with
    every hour a working hour (stack tests run at any time)."""
    files = read_policy_dir(Path("config/policies"))
    policies = dict(files.policies)
    if extra:
        policies["extra.cedar"] = extra
    return CedarPolicyEngine(
        policies=policies,
        schema=files.schema,
        hours=WorkingHours(start_hour_utc=0, end_hour_utc=24),
    )
