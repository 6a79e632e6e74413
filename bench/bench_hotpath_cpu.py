"""The broker's own CPU per issuance on two hot paths, in process, with the real classes.

* **audit**: ``ChainingAuditTrail.record_all`` of the issuance pair (``policy.decision`` with
  the full evaluated Cedar context, ``credential.issued``), as ``CredentialBroker`` records it,
  through the real trail with the stdout sink (structlog JSON lines to a file, as a log shipper
  reads it) and the append-only JSONL file sink (``fsync = batch``); with ``--redis-url`` also
  the Redis stream sink. Each pair is one group commit, as under load with few concurrent
  issuances. The events are built outside the timed part (that is the use case's cost).
* **auth**: the authentication middleware (``broker.http.auth``) on a request whose TLS
  connection is a real in-memory mutual-TLS handshake (OpenSSL ``SSLObject``) with a
  SPIRE-shaped X.509-SVID (leaf + intermediate), against the live ``TrustStore`` and the
  repository's ``config/identities.toml``: *keep-alive* (every request on one connection) and
  *new connection* (a new handshake per request; the handshake itself is not timed).

CPU is ``time.process_time`` (user + system of every thread, so the file sink's worker thread
counts) summed over the timed operations only. Rounds of each workload; the median round is
reported, with the min and max. Bounded by ``--n`` and ``--rounds``; asserts only that the
audit file it wrote verifies.

    .venv/bin/python bench/bench_hotpath_cpu.py [--audit-n 2000] [--auth-n 5000]
                                                [--connections 200] [--rounds 5]
                                                [--fsync batch|always|never]
                                                [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import secrets
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

# The test PKI lives in tests/; this script runs from a checkout, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.adapters.audit_sinks import (
    AuditSink,
    FsyncPolicy,
    JsonlFileAuditSink,
    StructlogAuditSink,
)
from broker.adapters.audit_trail import ChainingAuditTrail
from broker.core.audit import AuditEvent, CredentialIssued, PolicyDecision
from broker.core.audit_chain import verify_records
from broker.core.authn import CallerAuthenticator
from broker.core.bundle import TrustBundle, TrustStore
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.model import DelegationChain, DelegationHop
from broker.core.roles import parse_role_map
from broker.core.spiffe_id import TrustDomain
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.devstack import REPO_ROOT
from broker.http.auth import make_auth_middleware
from tests.mtls_memory import client_context, handshake, live_pki, server_context

TRUST_DOMAIN = "tasklease.test"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/bench"
ORCHESTRATOR = f"spiffe://{TRUST_DOMAIN}/orchestrator/bench"


def out(line: str) -> None:
    """Print one line of the report."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- audit


def _decision_context() -> dict[str, Any]:
    """The evaluated context a Cedar decision carries (``Decision.context``), as
    ``broker.core.policy.cedar_input_for`` built it for a ``vault-token`` target at the time of
    writing; a literal, so the figures do not move with policy work in progress."""
    agent, orchestrator = AGENT, ORCHESTRATOR
    return {
        "principal": {
            "type": "Agent",
            "id": agent,
            "spiffe_id": agent,
            "roles": ["agent"],
            "trust_domain": TRUST_DOMAIN,
        },
        "action": {"type": "Action", "id": "request_credential"},
        "resource": {
            "type": "Target",
            "id": "demo-kv",
            "name": "demo-kv",
            "kind": "vault-token",
            "system": "demo",
            "environment": "dev",
            "sensitivity": "internal",
            "sensitivity_rank": 1,
            "legacy": False,
            "revocable": True,
            "max_ttl_seconds": 900,
        },
        "context": {
            "now": {"epoch": 1893499200, "hour_utc": 12, "weekday": 2},
            "working_hours": {"within": True, "start_hour_utc": 6, "end_hour_utc": 20},
            "ttl_seconds": 300,
            "run": {
                "id": "wf-bench-0001",
                "owner": "alice@example.test",
                "purpose": "nightly orders reconciliation (OPS-1234)",
                "started_by": orchestrator,
                "trust_domain": TRUST_DOMAIN,
                "labels": ["team=data", "ticket=OPS-1234"],
                "ticket": "OPS-1234",
                "deadline_epoch": 1893502800,
                "participants_declared": True,
                "is_participant": True,
            },
            "chain": {
                "hops": [
                    {
                        "position": 0,
                        "role": "owner",
                        "principal": "alice@example.test",
                        "verified": False,
                    },
                    {
                        "position": 1,
                        "role": "orchestrator",
                        "principal": orchestrator,
                        "verified": True,
                    },
                    {"position": 2, "role": "agent", "principal": agent, "verified": True},
                ],
                "depth": 3,
                "fully_verified": False,
                "asserted_beyond_owner": 0,
            },
            "task_id": "load-orders",
            "tool": "psql",
            "justification": "load yesterday's orders into the warehouse",
            "approval": {
                "present": False,
                "id": "",
                "approved": False,
                "approvers": [],
                "approver_count": 0,
                "expires_epoch": 0,
            },
        },
    }


def _chain() -> DelegationChain:
    return DelegationChain(
        (
            DelegationHop("owner", "alice@example.test", False),
            DelegationHop("orchestrator", ORCHESTRATOR, True),
            DelegationHop("agent", AGENT, True),
        )
    )


def _rebuilt(value: Any) -> Any:
    """A fresh copy of JSON-shaped data (each issuance has its own context objects)."""
    if isinstance(value, dict):
        return {key: _rebuilt(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rebuilt(item) for item in value]
    return value


def _issuance_pair(context: dict[str, Any], chain: DelegationChain) -> tuple[AuditEvent, ...]:
    """``policy.decision`` and ``credential.issued`` as ``CredentialBroker`` builds them."""
    now = datetime.now(UTC)
    credential_id = f"cred_{secrets.token_hex(12)}"
    request_id = secrets.token_hex(16)
    common: dict[str, Any] = {
        "actor": AGENT,
        "chain": chain,
        "workflow_id": "wf-bench-0001",
        "task_id": "load-orders",
        "request_id": request_id,
    }
    decided = AuditEvent(
        event_id=f"evt_{secrets.token_hex(12)}",
        time=now,
        payload=PolicyDecision(
            action="request_credential",
            target="demo-kv",
            outcome="allow",
            policy_ids=("agent-request", "participants-only"),
            context=_rebuilt(context),
            max_ttl_seconds=None,
        ),
        **common,
    )
    issued = AuditEvent(
        event_id=f"evt_{secrets.token_hex(12)}",
        time=now,
        payload=CredentialIssued(
            target="demo-kv",
            kind="vault-token",
            expires_at=now + timedelta(minutes=5),
            ttl_seconds=300,
            token_accessor=secrets.token_urlsafe(18)[:24],
            vault_lease_count=0,
            policy_ids=("agent-request", "participants-only"),
        ),
        credential_id=credential_id,
        **common,
    )
    return decided, issued


def _audit_trails(
    workdir: Path, fsync: FsyncPolicy, redis: Any | None
) -> dict[str, ChainingAuditTrail]:
    """The sink sets measured: none (chaining and the writer alone), stdout, stdout + file
    (the default deployment without Redis), and all three with a Redis client."""
    sets: dict[str, list[AuditSink]] = {
        "no sink": [],
        "stdout": [StructlogAuditSink()],
        f"stdout + file (fsync {fsync})": [
            StructlogAuditSink(),
            JsonlFileAuditSink(path=workdir / "audit.jsonl", fsync=fsync),
        ],
    }
    if redis is not None:
        from broker.adapters.audit_redis import RedisStreamAuditSink

        sets[f"stdout + file (fsync {fsync}) + redis"] = [
            StructlogAuditSink(),
            JsonlFileAuditSink(path=workdir / "audit-redis.jsonl", fsync=fsync),
            RedisStreamAuditSink(client=redis, stream=f"bench:hotpath:{secrets.token_hex(3)}"),
        ]
    return {
        name: ChainingAuditTrail(sinks=sinks, writer_id=f"bench-{secrets.token_hex(3)}")
        for name, sinks in sets.items()
    }


async def _audit_rounds(
    workdir: Path, n: int, rounds: int, redis_url: str | None, fsync: FsyncPolicy
) -> dict[str, list[float]]:
    redis = None
    if redis_url:
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(redis_url)
    trails = _audit_trails(workdir, fsync, redis)
    context = _decision_context()
    chain = _chain()
    for trail in trails.values():
        for _ in range(50):  # warm-up: writer task, file open, first-use caches
            await trail.record_all(_issuance_pair(context, chain))
    results: dict[str, list[float]] = {name: [] for name in trails}
    for _ in range(rounds):
        # Interleaved, so load from elsewhere on the machine hits every sink set alike.
        for name, trail in trails.items():
            spent = 0.0
            for _ in range(n):
                pair = _issuance_pair(context, chain)
                started = time.process_time()
                await trail.record_all(pair)
                spent += time.process_time() - started
            results[name].append(spent / n * 1e6)
    for trail in trails.values():
        await trail.close()
    if redis is not None:
        await redis.aclose()
    return results


def _verify_audit_files(workdir: Path) -> int:
    """How many records the audit files hold; SystemExit unless each verifies."""
    written = 0
    for path in sorted(workdir.glob("audit*.jsonl")):
        lines = path.read_text().splitlines()
        report = verify_records(json.loads(line) for line in lines)
        if not report.ok:
            raise SystemExit(f"{path.name} does not verify: {report.findings[:3]}")
        written += len(lines)
    return written


# --------------------------------------------------------------------------- auth


class _TlsTransport:
    """What the middleware reads from an asyncio SSL transport: ``get_extra_info``."""

    def __init__(self, ssl_object: object) -> None:
        self._ssl_object = ssl_object

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._ssl_object if name == "ssl_object" else default

    def is_closing(self) -> bool:
        return False


def _authenticator(store: TrustStore) -> CallerAuthenticator:
    data = tomllib.loads((REPO_ROOT / "config" / "identities.toml").read_text())
    roles = parse_role_map({key: value for key, value in data.items() if key != "oidc_issuer"})
    return CallerAuthenticator(
        x509_svids=TrustStoreX509Authenticator(trust_store=store),
        jwt_svids=JwtSvidVerifier(audience="tasklease", trust_store=store),
        oidc=None,
        roles=roles,
    )


async def _auth_rounds(n: int, connections: int, rounds: int) -> dict[str, list[float]]:
    pki = live_pki(TRUST_DOMAIN)
    store = TrustStore(max_staleness=timedelta(hours=1))
    store.replace(
        TrustBundle.from_authorities(TrustDomain(TRUST_DOMAIN), x509_authorities=[pki.root.cert]),
        datetime.now(UTC),
    )
    server = server_context(pki.svid(f"spiffe://{TRUST_DOMAIN}/broker"), [pki.root.cert])
    client = client_context(pki.svid(AGENT), [pki.root.cert])
    # The trust store lets keep-alive connections reuse their verified caller; a tree from
    # before that option existed is measured without it (same script, both trees).
    extra: dict[str, Any] = (
        {"trust_store": store}
        if "trust_store" in inspect.signature(make_auth_middleware).parameters
        else {}
    )
    middleware = make_auth_middleware(
        authenticator=_authenticator(store), now=lambda: datetime.now(UTC), **extra
    )
    answer = web.Response(status=204)

    async def handler(_request: web.Request) -> web.StreamResponse:
        return answer

    def request_on(ssl_object: object) -> web.Request:
        return make_mocked_request("GET", "/v1/whoami", transport=_TlsTransport(ssl_object))

    async def timed(request: web.Request, mw: Callable[..., Awaitable[Any]]) -> float:
        started = time.process_time()
        response = await mw(request, handler)
        spent = time.process_time() - started
        if response.status != 204:
            raise SystemExit(f"authentication failed: {response.status}")
        return spent

    keep_alive = handshake(server, client)
    await timed(request_on(keep_alive), middleware)  # fails loudly if the SVID is refused
    results: dict[str, list[float]] = {"keep-alive": [], "new connection": []}
    for _ in range(rounds):
        requests = [request_on(keep_alive) for _ in range(n)]
        spent = sum([await timed(request, middleware) for request in requests])
        results["keep-alive"].append(spent / n * 1e6)
        fresh = [request_on(handshake(server, client)) for _ in range(connections)]
        spent = sum([await timed(request, middleware) for request in fresh])
        results["new connection"].append(spent / connections * 1e6)
    return results


# --------------------------------------------------------------------------- report


def _row(name: str, values: list[float]) -> str:
    return (
        f"{name:<46} {statistics.median(values):>8.1f} µs  "
        f"(min {min(values):.1f}, max {max(values):.1f})"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="tl-bench-hotpath-") as tmp:
        workdir = Path(tmp)
        stdout_log = (workdir / "stdout.log").open("w")
        structlog.configure(
            processors=[structlog.processors.JSONRenderer(sort_keys=True)],
            logger_factory=structlog.PrintLoggerFactory(file=stdout_log),
            cache_logger_on_first_use=True,
        )
        audit = await _audit_rounds(workdir, args.audit_n, args.rounds, args.redis_url, args.fsync)
        stdout_log.close()
        written = _verify_audit_files(workdir)
        auth = await _auth_rounds(args.auth_n, args.connections, args.rounds)
    out(f"CPU per operation (time.process_time), median of {args.rounds} rounds")
    out(
        f"audit: record_all(policy.decision, credential.issued), n={args.audit_n}/round; "
        f"{written} file records written and verified"
    )
    for name, values in audit.items():
        out(_row(f"audit pair, {name}", values))
    out("auth: middleware, X.509-SVID leaf + intermediate, in-memory mTLS (TLS 1.3)")
    out(_row(f"auth keep-alive (n={args.auth_n}/round)", auth["keep-alive"]))
    out(_row(f"auth new connection (n={args.connections})", auth["new connection"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audit-n", type=int, default=2000, help="issuance pairs per round")
    parser.add_argument("--auth-n", type=int, default=5000, help="keep-alive requests per round")
    parser.add_argument("--connections", type=int, default=200, help="new connections per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default=None, help="also the Redis stream sink")
    parser.add_argument(
        "--fsync", choices=["always", "batch", "never"], default="batch", help="file sink"
    )
    asyncio.run(main(parser.parse_args()))
