"""The stack is real: SPIRE issues SVIDs, OpenBao mints and revokes, Redis persists, and the
broker reports readiness from the live services."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from datetime import UTC, datetime

import aiohttp
import hvac
import hvac.exceptions
import psycopg
import pytest
import redis
from cryptography import x509
from spiffe import JwtSource, WorkloadApiClient, X509Source

from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.workload_api import WorkloadApiSource
from broker.config import RedisSettings
from broker.devstack import DevStack
from broker.errors import LedgerUnavailableError
from tests.conftest import remember_secret

pytestmark = pytest.mark.stack


def _endpoints(stack: DevStack):
    assert stack.endpoints is not None
    return stack.endpoints


def _root_client(stack: DevStack) -> hvac.Client:
    e = _endpoints(stack)
    return hvac.Client(url=e.openbao_addr, token=e.openbao_root_token)


def test_workload_fetches_real_x509_and_jwt_svids_from_the_spire_agent(stack: DevStack) -> None:
    """A workload (this test process, uid of the broker entry) gets both kinds of SVID."""
    e = _endpoints(stack)
    client = WorkloadApiClient(f"unix://{e.spire_agent_socket}")
    try:
        x509_source = X509Source(workload_api_client=client, timeout_in_seconds=15)
        jwt_source = JwtSource(workload_api_client=client, timeout_in_seconds=15)
        svid = x509_source.get_x509_context().default_svid
        assert str(svid.spiffe_id) == e.broker_spiffe_id
        leaf = svid.leaf
        assert leaf.not_valid_after_utc > datetime.now(UTC)
        jwt_svid = jwt_source.fetch_svid(audience={"tasklease-test"})
        assert str(jwt_svid.spiffe_id) == e.broker_spiffe_id
        assert jwt_svid.audience == {"tasklease-test"}
        assert jwt_svid.token.count(".") == 2
        x509_source.close()
        jwt_source.close()
    finally:
        client.close()


async def test_trust_bundle_adapter_gets_the_bundle_from_the_workload_api(stack: DevStack) -> None:
    """The broker's Workload API adapter yields the SPIRE CA and JWT keys of the trust domain."""
    e = _endpoints(stack)
    source = WorkloadApiSource(socket_path=f"unix://{e.spire_agent_socket}")
    await source.start()
    try:
        bundles = source.bundles()
        roots = bundles.x509_authorities[e.trust_domain]
        assert len(roots) >= 1
        own = source.own_svid()
        # The broker's own leaf is signed by one of the bundle's roots.
        leaf = own.chain[0]
        assert any(leaf.issuer == root.subject for root in roots)
        assert len(bundles.jwt_authorities[e.trust_domain]) >= 1
        # And it can fetch a JWT-SVID for OpenBao's audience (how it logs in).
        token = await source.fetch_jwt_svid("openbao")
        assert token.count(".") == 2
    finally:
        source.close()


def test_per_task_child_token_reads_database_creds_and_revocation_ends_the_login(
    stack: DevStack,
) -> None:
    """A per-task token (ttl 30 s) reads PostgreSQL creds; revoking it by accessor revokes them."""
    e = _endpoints(stack)
    root = _root_client(stack)
    created = root.auth.token.create(
        role_name="tasklease-task",
        policies=["target-demo-db"],
        ttl="30s",
        explicit_max_ttl="30s",
        renewable=False,
        meta={"credential_id": "test-cred", "workflow_id": "wf-1", "task_id": "t-1"},
    )["auth"]
    assert created["renewable"] is False
    assert created["lease_duration"] <= 30
    assert created["orphan"] is True
    task = hvac.Client(url=e.openbao_addr, token=remember_secret(created["client_token"]))
    creds = task.secrets.database.generate_credentials("demo-readonly")
    lease_id = creds["lease_id"]
    user, password = creds["data"]["username"], remember_secret(creds["data"]["password"])

    def login() -> int:
        with psycopg.connect(
            host="127.0.0.1",
            port=e.postgres_port,
            dbname="demo",
            user=user,
            password=password,
            connect_timeout=5,
        ) as conn:
            row = conn.execute("SELECT count(*) FROM orders").fetchone()
            assert row is not None
            return int(row[0])

    assert login() == 3
    assert root.sys.read_lease(lease_id)["data"]["id"] == lease_id

    root.auth.token.revoke_accessor(created["accessor"])

    with pytest.raises(psycopg.OperationalError):
        login()
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
        root.sys.read_lease(lease_id)


def test_task_token_expiry_is_enforced_by_openbao(stack: DevStack) -> None:
    """A task token dies at its TTL on its own: Vault, not the broker, enforces the bound."""
    e = _endpoints(stack)
    root = _root_client(stack)
    created = root.auth.token.create(
        role_name="tasklease-task",
        policies=["target-demo-kv"],
        ttl="2s",
        explicit_max_ttl="2s",
        renewable=False,
    )["auth"]
    task = hvac.Client(url=e.openbao_addr, token=created["client_token"])
    assert task.secrets.kv.v2.read_secret_version(
        path="demo/app", mount_point="kv", raise_on_deleted_version=True
    )
    time.sleep(3)
    with pytest.raises(hvac.exceptions.Forbidden):
        task.secrets.kv.v2.read_secret_version(
            path="demo/app", mount_point="kv", raise_on_deleted_version=True
        )


def test_redis_round_trip_with_aof_and_durability_settings(stack: DevStack) -> None:
    """Redis answers, and CONFIG GET shows AOF on, fsync on every write, noeviction."""
    e = _endpoints(stack)
    client = redis.Redis.from_url(e.redis_url, decode_responses=True)
    try:
        client.set("tasklease:test:roundtrip", "value")
        assert client.get("tasklease:test:roundtrip") == "value"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        client.delete("tasklease:test:roundtrip")
        client.close()


async def test_ledger_refuses_a_redis_that_may_evict(stack: DevStack) -> None:
    """SECURITY 33: maxmemory-policy other than noeviction → the broker refuses it."""
    e = _endpoints(stack)
    admin = redis.Redis.from_url(e.redis_url, decode_responses=True)
    ledger = RedisLedger(settings=RedisSettings(url=e.redis_url))
    try:
        admin.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(LedgerUnavailableError, match="maxmemory-policy") as caught:
            await ledger.check_durability()
        assert caught.value.reason == "ledger.not_durable"
        degraded = RedisLedger(
            settings=RedisSettings(url=e.redis_url, insecure_allow_degraded_durability=True)
        )
        assert (await degraded.check_durability()).problems
        await degraded.close()
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.close()
        await ledger.close()


def _client_tls(stack: DevStack) -> ssl.SSLContext:
    """Trust the dev trust domain's CA; check the broker's SPIFFE ID, not a host name."""
    files = stack.mint_x509_svid(f"spiffe://{_endpoints(stack).trust_domain}/test/client")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=files["bundle"])
    context.check_hostname = False  # SVIDs carry a URI SAN, checked by the test itself
    return context


async def test_broker_serves_tls_with_its_own_spire_svid(stack: DevStack, running_broker) -> None:
    """The broker's server certificate is its X.509-SVID from the Workload API."""
    e = _endpoints(stack)
    context = _client_tls(stack)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running_broker.url}/healthz", ssl=context) as response,
    ):
        assert response.status == 200

    def peer_certificate() -> bytes | None:
        with (
            socket.create_connection(("127.0.0.1", running_broker.port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            return tls.getpeercert(binary_form=True)

    # A blocking handshake from the loop's thread would stall the server on the same loop.
    der = await asyncio.to_thread(peer_certificate)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in uris.get_values_for_type(x509.UniformResourceIdentifier)] == [
        e.broker_spiffe_id
    ]


async def test_readyz_is_503_while_openbao_is_down_and_200_when_it_is_back(
    stack: DevStack, running_broker
) -> None:
    """/readyz follows OpenBao: 503 with a reason while stopped, 200 once restarted+unsealed."""
    context = _client_tls(stack)
    url = f"{running_broker.url}/readyz"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=context) as response:
            body = await response.json()
            assert (response.status, body["status"]) == (200, "ready"), body
        stack.stop_openbao()
        try:
            async with session.get(url, ssl=context) as response:
                body = await response.json()
                assert response.status == 503
                assert body["checks"]["openbao"]["ok"] is False
                assert "unreachable" in body["checks"]["openbao"]["detail"]
                assert body["checks"]["redis"]["ok"] is True
        finally:
            stack.start_openbao_again()
        async with session.get(url, ssl=context) as response:
            body = await response.json()
            assert (response.status, body["status"]) == (200, "ready"), body


async def test_readyz_reports_a_sealed_openbao(stack: DevStack, running_broker) -> None:
    """A sealed OpenBao is not ready, and says so."""
    context = _client_tls(stack)
    root = _root_client(stack)
    url = f"{running_broker.url}/readyz"
    async with aiohttp.ClientSession() as session:
        root.sys.seal()
        try:
            async with session.get(url, ssl=context) as response:
                body = await response.json()
                assert response.status == 503
                assert body["checks"]["openbao"]["detail"] == "OpenBao is sealed"
        finally:
            stack.unseal_openbao()
        async with session.get(url, ssl=context) as response:
            assert response.status == 200
