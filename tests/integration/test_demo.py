"""``tasklease demo`` end to end on the session stack (the steps of ``broker.demo.run_demo``,
which the command runs on a stack of its own): every step behaves as narrated and no secret
reaches the output; a step that does not behave stops the demo, names the step, and the demo
ends the run so nothing stays live."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from rich.console import Console

from broker.client import PemAuth, TaskleaseClient
from broker.demo import LocalOidcIssuer, run_demo
from broker.devstack import DevStack
from broker.errors import DemoFailedError
from tests.conftest import LOG_DIR, remember_secret
from tests.integration.clients import StartBroker, workload_id
from tests.secret_scan import scan_text

pytestmark = pytest.mark.stack

# The whole story takes a few seconds on the session stack; this bounds a hung step.
DEMO_TIMEOUT = 120


def _auth(stack: DevStack, spiffe_id: str) -> PemAuth:
    minted = stack.mint_x509_svid(spiffe_id, ttl_seconds=300)
    return PemAuth(
        bundle=minted["bundle"], chain=minted["svid"], key=remember_secret(minted["key"])
    )


def _console() -> tuple[Console, io.StringIO]:
    output = io.StringIO()
    return Console(file=output, width=120, color_system=None), output


async def test_the_demo_narrates_one_run_and_every_step_behaves(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    issuer = LocalOidcIssuer.generate()
    broker = await start(TASKLEASE_IDENTITIES_FILE=str(issuer.write_identities(tmp_path)))
    console, output = _console()
    handled: list[str] = []

    def observe(secret: str) -> None:
        handled.append(remember_secret(secret))

    report = await asyncio.wait_for(
        run_demo(stack, broker.url, issuer, console=console, observe_secret=observe),
        timeout=DEMO_TIMEOUT,
    )
    text = output.getvalue()
    # The session's secret scan reads this too (with every secret the demo handled).
    (LOG_DIR / "demo-output.txt").write_text(text)

    assert report.steps == (1, 2, 3, 4, 5, 6)
    assert len(set(report.credential_ids)) == 2
    for expected in (
        "Step 1. An orchestrator starts a run for alice",
        f"201 Created: run {report.run_id} is active",
        "Step 2. An agent gets PostgreSQL credentials",
        "Step 3. A restricted target waits for a human approval",
        f"202 Accepted: approval {report.approval_id} is pending",
        "403 approval.sod_violation",
        'bob approves ("checked OPS-1234")',
        "Step 4. The agent reports a tool call and a side effect",
        "Step 5. The run completes; its credentials are revoked",
        "run completed: 2 confirmed revoked, 0 still live",
        "now fails",
        "Step 6. The audit trace of the run",
        f"tasklease audit trace {report.run_id}",
        "Demo passed: all 6 steps behaved as narrated",
    ):
        assert expected in text, expected
    # The trace printed is the audit renderer's story of this run.
    assert report.trace in text + "\n"
    for credential_id in report.credential_ids:
        assert f"credential {credential_id} revoked (run_completed" in report.trace
    assert f"approval {report.approval_id}: approve by oidc:{issuer.issuer}#bob" in report.trace
    assert "agent.tool_call" in report.audit_types
    assert "agent.side_effect" in report.audit_types

    # Never a secret: 3 SVID keys, 2 database passwords, 2 ID tokens went through the demo.
    assert len(handled) == 7
    assert [i for i, secret in enumerate(handled) if secret in text] == []
    assert scan_text(text, path=Path("demo-output"), known=handled) == []
    assert "•••••••• (returned once; never stored, logged or shown)" in text


async def test_a_step_that_does_not_behave_stops_the_demo_and_ends_the_run(
    stack: DevStack, start: StartBroker
) -> None:
    """A broker that does not trust the demo's OIDC issuer: the person cannot act, so step 3
    fails with DemoFailedError naming it; the demo then ends the run (outcome failed) and the
    first credential is revoked."""
    issuer = LocalOidcIssuer.generate()
    broker = await start()  # the repository's identities: no OIDC issuer
    console, output = _console()
    run_id = "wf-demo-untrusted-idp"
    with pytest.raises(DemoFailedError) as failed:
        await asyncio.wait_for(
            run_demo(
                stack,
                broker.url,
                issuer,
                console=console,
                run_id=run_id,
                approval_timeout=10,
                observe_secret=remember_secret,
            ),
            timeout=DEMO_TIMEOUT,
        )
    assert failed.value.step == 3
    assert failed.value.reason == "demo.step_failed"
    assert "expected 403 approval.sod_violation" in failed.value.detail
    assert "found 401" in failed.value.detail
    assert f"cleanup: run {run_id} ended (failed)" in output.getvalue()

    async with TaskleaseClient(broker.url, _auth(stack, workload_id(stack, "admin"))) as client:
        _, run = await client.call("GET", f"/v1/workflows/{run_id}")
    assert run["state"] == "failed"
    assert [c["state"] for c in run["credentials"]] == ["revoked"]
