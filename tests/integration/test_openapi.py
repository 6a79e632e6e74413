"""The OpenAPI document against the live broker on the real stack: it lists exactly the routes
the broker registers, its security matches what the broker enforces, and schemathesis finds no
5xx and no answer that breaks the document.

The schemathesis run is the CLI (``schemathesis run``, as a developer would run it against
``make dev``) in a subprocess, so this test's event loop keeps serving the in-process broker.
It presents real SPIRE-minted X.509-SVIDs over mutual TLS — the identity each operation needs
(orchestrator, agent, approval bot, admin) — and is bounded and reproducible: a fixed number of
examples per operation, deterministic (derandomized) generation, no example database or cache,
and a hard time limit. Its broker uses its own Redis database, so what the fuzzer creates
(quarantines, forced revocations, approvals) never reaches the other tests' ledger.

Server verification: the broker's X.509-SVID names it by SPIFFE ID only (no DNS or IP SAN), which
no generic HTTPS client can check, so the schemathesis run is told ``tls-verify = false`` for
the broker this test started on loopback; the SDK (``broker.client``) checks the SPIFFE ID.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.bootstrap import RunningBroker
from broker.client import (
    AdminClient,
    AgentClient,
    Credential,
    OrchestratorClient,
    PemAuth,
    PendingApproval,
)
from broker.devstack import DevStack
from broker.http.openapi import OPENAPI_PATH, OPERATIONS, build_openapi
from tests.audit_dump import dump_audit_streams
from tests.conftest import AUDIT_DIR, LOG_DIR, remember_secret
from tests.integration.clients import StartBroker, workload_id

pytestmark = pytest.mark.stack

# Examples per operation and phase (TASKLEASE_SCHEMATHESIS_EXAMPLES for a longer local run).
MAX_EXAMPLES = int(os.environ.get("TASKLEASE_SCHEMATHESIS_EXAMPLES", "25"))
# The run's wall-clock limit: past it the run is killed and the test fails.
TIME_LIMIT_SECONDS = 240
# The schemathesis broker's ledger: a Redis database of its own (the stack's Redis has 16).
FUZZ_REDIS_DB = 7

# Who calls each operation (public ones need nobody; the admin's certificate goes along).
_CALLER = {
    "startWorkflow": "orchestrator",
    "getWorkflow": "orchestrator",
    "completeWorkflow": "orchestrator",
    "requestCredential": "agent",
    "getCredential": "agent",
    "releaseCredential": "agent",
    "reportEvent": "agent",
    "getApproval": "agent",
    "withdrawApproval": "agent",
    "whoami": "agent",
    "listTargets": "agent",
    "listApprovals": "approval-bot",
    "decideApproval": "approval-bot",
}


def _http_routes(broker: RunningBroker) -> set[tuple[str, str]]:
    """(method, path template) of every route the app registered; HEAD, which aiohttp adds
    for every GET, is the GET without a body and is not listed separately."""
    return {
        (route.method.lower(), route.resource.canonical)
        for route in broker.runtime.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def _server_context(stack: DevStack) -> ssl.SSLContext:
    minted = stack.mint_x509_svid(f"spiffe://{stack.trust_domain}/test/anonymous")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=minted["bundle"])
    context.check_hostname = False  # the broker's SVID has a URI SAN, not a DNS name
    return context


async def test_the_document_lists_exactly_the_routes_the_broker_registers(
    running_broker: RunningBroker,
) -> None:
    """Every registered route is documented and every documented operation is registered."""
    documented = {(op.method, op.path) for op in OPERATIONS}
    assert _http_routes(running_broker) == documented
    document = build_openapi()
    served = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == documented


async def test_the_document_is_served_without_authentication(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    """GET /v1/openapi.json needs no identity and answers the generated document."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running_broker.url}{OPENAPI_PATH}", ssl=_server_context(stack)) as response,
    ):
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == build_openapi()


async def test_secured_operations_refuse_a_caller_without_identity(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    """What the document says about security is what the broker enforces: every operation
    with a security requirement answers 401 problem+json without an identity, every public
    one answers without."""
    document = build_openapi()
    context = _server_context(stack)
    seen: dict[tuple[str, str], int] = {}
    async with aiohttp.ClientSession() as session:
        for path, item in document["paths"].items():
            for method, operation in item.items():
                concrete = path.replace("{", "x-").replace("}", "")
                async with session.request(
                    method, f"{running_broker.url}{concrete}", ssl=context, json={}
                ) as response:
                    seen[(method, path)] = response.status
                    if operation.get("security") == []:
                        assert response.status == 200, (method, path)
                    else:
                        assert response.status == 401, (method, path)
                        assert response.content_type == "application/problem+json"
                        assert (await response.json())["code"] == "unauthenticated"
    assert len(seen) == len(OPERATIONS)


# ----------------------------------------------------------------------------- schemathesis


def _identity(stack: DevStack, tmp_path: Path, name: str) -> tuple[Path, Path]:
    minted = stack.mint_x509_svid(workload_id(stack, name), ttl_seconds=900)
    remember_secret(minted["key"])
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    cert.write_text(minted["svid"])
    key.write_text(minted["key"])
    key.chmod(0o600)
    return cert, key


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(type(value))


def _config(
    identities: Mapping[str, tuple[Path, Path]],
    *,
    junit: Path,
    parameters: Mapping[str, Mapping[str, str]] | None = None,
    only: list[str] | None = None,
) -> str:
    """schemathesis.toml: bounded and deterministic; each operation with its caller's SVID,
    ``parameters`` fixed per operation id, only the ``only`` operations' callers set."""
    admin_cert, admin_key = identities["admin"]
    lines = [
        f"tls-verify = {_toml(False)}",
        f"request-cert = {_toml(str(admin_cert))}",
        f"request-cert-key = {_toml(str(admin_key))}",
        "request-timeout = 30",
        "workers = 1",
        "",
        "[generation]",
        f"max-examples = {MAX_EXAMPLES}",
        # The same cases every run (schemathesis then ignores any seed).
        "deterministic = true",
        'database = "none"',
        # The identity is the client certificate: no generated Authorization header (it would
        # make every request ambiguous, 401; test_identity covers bad bearers).
        "with-security-parameters = false",
        "",
        "[cache]",
        "enabled = false",
        "",
        "[checks]",
        # ignored_auth probes by removing the declared credentials from a request; the
        # certificate is in the TLS layer, which a probe cannot remove, so it would report
        # every success as "auth ignored". test_secured_operations_refuse_a_caller_without_
        # identity checks the same property directly.
        "ignored_auth.enabled = false",
        # positive_data_acceptance wants 2xx for every schema-valid request. The broker also
        # refuses, with a typed 400, input JSON Schema cannot describe: text that is not
        # printable (Unicode categories), identifiers the domain rules out inside a body,
        # rules across fields (exactly one of deadline and ttl_seconds; a selector needs a
        # field). status_code_conformance still requires that 400 to be documented, and
        # response_schema_conformance that it is a problem with its stable code.
        "positive_data_acceptance.enabled = false",
        "",
        "[reports.junit]",
        f"path = {_toml(str(junit))}",
    ]
    by_caller: dict[str, list[str]] = {}
    for operation_id, caller in _CALLER.items():
        if only is None or operation_id in only:
            by_caller.setdefault(caller, []).append(operation_id)
    for caller, operation_ids in by_caller.items():
        cert, key = identities[caller]
        for operation_id in operation_ids:
            lines += [
                "",
                "[[operations]]",
                f"include-operation-id = {_toml(operation_id)}",
                f"request-cert = {_toml(str(cert))}",
                f"request-cert-key = {_toml(str(key))}",
            ]
            for name, value in (parameters or {}).get(operation_id, {}).items():
                lines.append(f"parameters.{_toml(name)} = {_toml(value)}")
    return "\n".join(lines) + "\n"


async def _schemathesis(broker: RunningBroker, config: Path, schema: Path, *extra: str) -> str:
    """Run ``schemathesis run`` against the broker: its output (kept with the test logs);
    the test fails unless it exits 0."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "run",
        str(schema),
        "--url",
        broker.url,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=config.parent,
        # Only this file configures the run: no SCHEMATHESIS_* setting from the environment.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS_")},
            "NO_COLOR": "1",
        },
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), TIME_LIMIT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"schemathesis ran longer than {TIME_LIMIT_SECONDS} s")
    text = out.decode(errors="replace")
    (LOG_DIR / f"schemathesis-{config.stem}.log").write_text(text)
    assert process.returncode == 0, text[-20000:]
    return text


def _tested_operations(junit: Path) -> dict[str, int]:
    """operation label → test cases that failed or errored, from the JUnit report."""
    root = ET.parse(junit).getroot()  # noqa: S314 - the report schemathesis just wrote
    return {
        case.get("name", ""): len(case.findall("failure")) + len(case.findall("error"))
        for case in root.iter("testcase")
    }


async def _seed(
    stack: DevStack, broker: RunningBroker, identities: Mapping[str, tuple[Path, Path]]
) -> dict[str, str]:
    """A run with the agent as participant, a credential in it and an approval waiting."""
    bundle = stack.mint_x509_svid(f"spiffe://{stack.trust_domain}/test/anonymous")["bundle"]

    def auth(name: str) -> PemAuth:
        cert, key = identities[name]
        return PemAuth(bundle=bundle, chain=cert, key=key)

    run_id = f"wf-openapi-{secrets.token_hex(3)}"
    async with OrchestratorClient(broker.url, auth("orchestrator")) as orchestrator:
        await orchestrator.start_run(
            run_id,
            owner="alice@example.test",
            purpose="schemathesis OPS-1234",
            ttl_seconds=900,
            labels={"ticket": "OPS-1234"},
            participants=[workload_id(stack, "agent")],
        )
    async with AgentClient(broker.url, auth("agent")) as agent:
        issued = await agent.request_credential(workflow=run_id, task="fuzz", target="demo-db")
        assert isinstance(issued, Credential)
        for value in issued.secret.values():
            if isinstance(value, str) and len(value) >= 8:
                remember_secret(value)
        pending = await agent.request_credential(workflow=run_id, task="fuzz", target="prod-db")
        assert isinstance(pending, PendingApproval)
    return {
        "workflow_id": run_id,
        "credential_id": issued.credential_id,
        "approval_id": pending.approval_id,
    }


async def _states(
    stack: DevStack,
    broker: RunningBroker,
    identities: Mapping[str, tuple[Path, Path]],
    known: Mapping[str, str],
) -> dict[str, Any]:
    bundle = stack.mint_x509_svid(f"spiffe://{stack.trust_domain}/test/anonymous")["bundle"]
    cert, key = identities["admin"]
    async with AdminClient(broker.url, PemAuth(bundle=bundle, chain=cert, key=key)) as admin:
        _, run = await admin.call("GET", f"/v1/workflows/{known['workflow_id']}")
        credential = await admin.credential(known["credential_id"])
        _, approval = await admin.call("GET", f"/v1/approvals/{known['approval_id']}")
    return {
        "run_ended": run["state"] in {"completed", "failed", "cancelled"},
        "credential": credential["state"],
        "approval_closed": approval["state"] != "pending",
    }


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    """Every operation, fuzzed with real SVIDs: no 5xx, statuses, content types, headers and
    bodies as the document says; typed 4xx for input the document rules out."""
    assert stack.endpoints is not None
    redis_url = stack.endpoints.redis_url.rsplit("/", 1)[0] + f"/{FUZZ_REDIS_DB}"
    broker = await start(
        TASKLEASE_REDIS__URL=redis_url,
        # Its ledger is its own: it must not take the other tests' task tokens for orphans.
        TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS="86400",
    )
    identities = {
        name: _identity(stack, tmp_path, name)
        for name in ("admin", "agent", "orchestrator", "approval-bot")
    }
    schema = tmp_path / "openapi.json"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}{OPENAPI_PATH}", ssl=_server_context(stack)) as response,
    ):
        schema.write_bytes(await response.read())
    known = await _seed(stack, broker, identities)
    try:
        # 1. Every operation, every value generated.
        junit = tmp_path / "fuzz.xml"
        config = tmp_path / "fuzz.toml"
        config.write_text(_config(identities, junit=junit))
        await _schemathesis(broker, config, schema)
        tested = _tested_operations(junit)
        labels = {f"{op.method.upper()} {op.path}" for op in OPERATIONS}
        # One test case per operation, and the stateful phase (sequences along links).
        assert set(tested) == {*labels, "Stateful tests"}
        assert not any(tested.values()), tested
        # 2. The operations on one resource, with the ids of real ones (found, decided,
        #    released, completed), so their success answers are checked too.
        pinned = {
            "getWorkflow": {"workflow_id": known["workflow_id"]},
            "completeWorkflow": {"workflow_id": known["workflow_id"]},
            "getCredential": {"credential_id": known["credential_id"]},
            "releaseCredential": {"credential_id": known["credential_id"]},
            "getApproval": {"approval_id": known["approval_id"]},
            "decideApproval": {"approval_id": known["approval_id"]},
            "withdrawApproval": {"approval_id": known["approval_id"]},
        }
        junit = tmp_path / "known.xml"
        config = tmp_path / "known.toml"
        config.write_text(_config(identities, junit=junit, parameters=pinned, only=list(pinned)))
        only = [arg for name in pinned for arg in ("--include-operation-id", name)]
        await _schemathesis(broker, config, schema, *only)
        tested = _tested_operations(junit)
        assert set(tested) == {
            *(f"{op.method.upper()} {op.path}" for op in OPERATIONS if op.operation_id in pinned),
            "Stateful tests",
        }
        assert not any(tested.values()), tested
        # The resources were reached, not only refused: the run ended, the credential was
        # released, the approval decided or withdrawn.
        assert await _states(stack, broker, identities, known) == {
            "run_ended": True,
            "credential": "revoked",
            "approval_closed": True,
        }
    finally:
        dump_audit_streams(redis_url, AUDIT_DIR / f"redis-db{FUZZ_REDIS_DB}")
