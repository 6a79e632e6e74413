"""``tasklease demo``: one workflow run on the real local stack, narrated step by step.

Each step prints what happens and why, and checks that it happened: a step that does not
behave as narrated stops the demo with :class:`~broker.errors.DemoFailedError` (exit 1).

1. An orchestrator, with its own SPIRE-minted X.509-SVID, starts a run for owner alice with a
   purpose and a ticket label.
2. An agent, with its own SVID, gets PostgreSQL credentials for a task and queries the demo
   table with them (a real login).
3. A restricted target (``prod-db``) answers 202: the agent waits; alice, the run's owner, may
   not approve her own run; bob, a person with an OIDC ID token from a local test issuer,
   approves; the agent asks again with the approval and gets the credential.
4. The agent reports a tool call and a side effect (``POST /v1/events``).
5. The orchestrator completes the run (``?wait=true``): both credentials are confirmed
   revoked, and PostgreSQL logins with them now fail.
6. The run's audit trail (``GET /v1/audit``) is told as a story by
   :func:`broker.core.audit_trace.render_trace`, as ``tasklease audit trace`` does.

Every HTTP step goes through the SDK (:mod:`broker.client`). No secret is ever printed:
usernames and ids yes, passwords masked, ID tokens and SVID keys not shown at all.

:func:`run_demo` runs the steps against a stack and a broker that are already running (the
test suite runs it on its session stack). :func:`demo_on_fresh_stack` is ``tasklease demo``:
it starts the stack in a private temporary directory and a broker on it, runs the steps, and
stops and removes everything at the end, also on failure and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import IO, Any, Final

import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from broker.client import (
    AdminClient,
    AgentClient,
    ApiError,
    ApprovalTimeoutError,
    BearerAuth,
    Credential,
    OrchestratorClient,
    PemAuth,
    PendingApproval,
)
from broker.core.audit_trace import render_trace
from broker.devstack import REPO_ROOT, DevStack, StackEndpoints
from broker.errors import DemoFailedError

DEMO_ISSUER: Final = "https://idp.demo.tasklease.test/realms/ops"
DEMO_AUDIENCE: Final = "tasklease"
APPROVER_GROUP: Final = "approvers"
OWNER: Final = "alice@example.test"
TICKET: Final = "OPS-1234"
PURPOSE: Final = f"nightly orders reconciliation and quarterly close ({TICKET})"
DEFAULT_IDENTITIES: Final = REPO_ROOT / "config" / "identities.toml"
MASK: Final = "••••••••"
_AUDIT_WAIT_SECONDS: Final = 15.0
_CLEANUP_SECONDS: Final = 20.0


# --------------------------------------------------------------------------- the people


@dataclass(frozen=True)
class LocalOidcIssuer:
    """A throwaway OIDC issuer for the demo: an ES256 key made at start, its JWK Set in a file
    the broker reads (``jwks_file``), and ID tokens signed with it for the demo's people.

    It exists so the demo can show a *person* approving without an identity provider. Trust
    it nowhere else: whoever holds this object can sign in as anyone of its issuer.
    """

    issuer: str
    kid: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def generate(cls, issuer: str = DEMO_ISSUER) -> LocalOidcIssuer:
        """A new issuer with a fresh P-256 key."""
        return cls(
            issuer=issuer,
            kid=f"demo-{secrets.token_hex(4)}",
            key=ec.generate_private_key(ec.SECP256R1()),
        )

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517 §5) the broker verifies the ID tokens with."""
        public = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    def write_identities(self, directory: Path, *, base: Path = DEFAULT_IDENTITIES) -> Path:
        """Write the JWK Set and an identities file (``base`` plus this issuer, whose
        ``groups`` claim ``approvers`` maps to the approver role) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        jwks = directory / "demo-idp-jwks.json"
        jwks.write_text(json.dumps(self.jwks()))
        identities = directory / "identities.toml"
        # json.dumps gives a valid TOML basic string for these values (quotes and escapes).
        identities.write_text(
            base.read_text()
            + "\n# `tasklease demo`: people from the demo's local test OIDC issuer.\n"
            + "[[oidc_issuer]]\n"
            + f"issuer = {json.dumps(self.issuer)}\n"
            + f"audience = {json.dumps(DEMO_AUDIENCE)}\n"
            + 'algorithms = ["ES256"]\n'
            + f"jwks_file = {json.dumps(str(jwks))}\n"
            + "\n[[human]]\n"
            + f"issuer = {json.dumps(self.issuer)}\n"
            + 'claim = "groups"\n'
            + f"value = {json.dumps(APPROVER_GROUP)}\n"
            + 'roles = ["approver"]\n'
        )
        return identities

    def id_token(
        self,
        name: str,
        *,
        now: datetime,
        groups: Sequence[str] = (APPROVER_GROUP,),
        lifetime: timedelta = timedelta(minutes=5),
    ) -> str:
        """An ID token for ``name`` (e-mail ``name@example.test``), valid ``lifetime``."""
        issued = int(now.timestamp())
        claims = {
            "iss": self.issuer,
            "aud": DEMO_AUDIENCE,
            "sub": name,
            "iat": issued,
            "exp": issued + int(lifetime.total_seconds()),
            "email": f"{name}@example.test",
            "groups": list(groups),
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})

    def principal(self, name: str) -> str:
        """How the broker names the person ``name`` of this issuer."""
        return f"oidc:{self.issuer}#{name}"


# --------------------------------------------------------------------------- narration


class _UnexpectedError(Exception):
    """A step saw something other than what it narrates (message: expected and found)."""


def _expect(condition: bool, expected: str, found: object) -> None:
    if not condition:
        raise _UnexpectedError(f"expected {expected}, found {found}")


def _clock(value: object) -> str:
    """``12:34:56Z`` for an ISO time or a datetime."""
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return moment.astimezone(UTC).strftime("%H:%M:%SZ")


def _answer(answer: Credential | PendingApproval) -> str:
    """A credential request's answer in a few words (never the secret)."""
    if isinstance(answer, PendingApproval):
        return f"202 with approval {answer.approval_id}"
    approval = answer.metadata.get("approval_id")
    return (
        f"201 with credential {answer.credential_id} for {answer.target}, allowed by "
        f"{', '.join(answer.policy_ids) or 'no policy'}"
        + (f" under approval {approval}" if approval else "")
    )


def _hops(chain: object) -> str:
    if not isinstance(chain, list):
        return "?"
    return " → ".join(
        f"{hop.get('principal')} ({hop.get('role')}, "
        f"{'verified' if hop.get('verified') else 'asserted'})"
        for hop in chain
        if isinstance(hop, Mapping)
    )


class _Narrator:
    """Prints the story: step headers, actions, checks passed, key/value blocks and tables.
    Everything that comes from the broker or the stack is printed as plain text, never as
    rich markup."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.passed: list[int] = []

    @contextlib.contextmanager
    def step(self, number: int, title: str, why: str) -> Iterator[None]:
        """One step: its header and why; anything unexpected inside becomes a
        :class:`DemoFailedError` naming the step."""
        self.console.print()
        self.console.rule(Text(f"Step {number}. {title}", style="bold"), align="left")
        self.console.print(Padding(Text(why, style="italic"), (0, 0, 0, 2), expand=False))
        where = f"step {number} ({title})"
        try:
            yield
        except DemoFailedError:
            raise
        except _UnexpectedError as exc:
            raise DemoFailedError(
                f"{where} did not behave as narrated: {exc}", step=number
            ) from None
        except ApprovalTimeoutError as exc:
            raise DemoFailedError(f"{where}: {exc}", step=number) from None
        except ApiError as exc:
            raise DemoFailedError(
                f"{where}: the broker answered {exc.status} {exc.code} ({exc.reason}): "
                f"{exc.detail}",
                step=number,
            ) from None
        except Exception as exc:  # noqa: BLE001 - every failure of a step is reported as one
            raise DemoFailedError(f"{where}: {type(exc).__name__}: {exc}", step=number) from None
        self.passed.append(number)

    def act(self, text: str) -> None:
        """Something a party does."""
        self._line(Text("→", "cyan"), text)

    def ok(self, text: str) -> None:
        """A check that passed."""
        self._line(Text("✓", "bold green"), text)

    def _line(self, mark: Text, text: str) -> None:
        # A hanging indent: wrapped lines stay right of the mark.
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row(mark, Text(text))
        self.console.print(Padding(grid, (0, 0, 0, 2), expand=False))

    def block(self, rows: Sequence[tuple[str, str]]) -> None:
        """Indented key/value lines."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        for key, value in rows:
            grid.add_row(key, Text(value))
        self.console.print(Padding(grid, (0, 0, 0, 6), expand=False))

    def show(self, renderable: RenderableType) -> None:
        """A table or panel, indented."""
        self.console.print(Padding(renderable, (0, 0, 0, 6), expand=False))


# --------------------------------------------------------------------------- PostgreSQL


def _psycopg() -> ModuleType:
    try:
        import psycopg  # noqa: PLC0415 - a dev dependency, like the stack itself
    except ImportError as exc:
        raise DemoFailedError(
            "the demo logs into PostgreSQL with psycopg, which comes with the dev extra "
            "(pip install -e '.[dev]', or make demo)",
            reason="demo.missing_dependency",
        ) from exc
    return psycopg


def _query(port: int, secret: Mapping[str, Any], sql: str) -> list[tuple[Any, ...]]:
    psycopg = _psycopg()
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        dbname="demo",
        user=str(secret["username"]),
        password=str(secret["password"]),
        connect_timeout=5,
    ) as conn:
        return [tuple(row) for row in conn.execute(sql).fetchall()]


def _login_refused(port: int, secret: Mapping[str, Any]) -> str | None:
    """Why PostgreSQL refuses a login with ``secret`` (its message), or None if it accepts."""
    psycopg = _psycopg()
    try:
        _query(port, secret, "SELECT 1")
    except psycopg.OperationalError as exc:
        message = " ".join(str(exc).split())
        return message.split("FATAL:", 1)[-1].strip() if "FATAL:" in message else message
    return None


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class DemoReport:
    """What a passing demo did (ids only, never a secret)."""

    run_id: str
    credential_ids: tuple[str, ...]
    approval_id: str
    event_ids: tuple[str, ...]
    audit_types: tuple[str, ...]
    trace: str
    steps: tuple[int, ...]


@dataclass
class _Parties:
    """The demo's workloads (SPIRE-minted X.509-SVIDs) and what they need to reach the broker."""

    stack: DevStack
    endpoints: StackEndpoints
    observe_secret: Callable[[str], object]
    bundle: str = ""

    async def svid(self, name: str) -> tuple[PemAuth, str, datetime]:
        """A fresh X.509-SVID for workload ``name`` from the SPIRE server: the SDK auth, the
        SPIFFE ID and the expiry. The private key stays in memory and is never shown."""
        spiffe_id = self.endpoints.workload_ids[name]
        minted = await asyncio.to_thread(self.stack.mint_x509_svid, spiffe_id, ttl_seconds=900)
        self.observe_secret(minted["key"])
        self.bundle = minted["bundle"]
        leaf = x509.load_pem_x509_certificates(minted["svid"].encode())[0]
        auth = PemAuth(
            bundle=minted["bundle"],
            chain=minted["svid"],
            key=minted["key"],
            broker_id=self.endpoints.broker_spiffe_id,
        )
        return auth, spiffe_id, leaf.not_valid_after_utc


async def run_demo(
    stack: DevStack,
    broker_url: str,
    issuer: LocalOidcIssuer,
    *,
    console: Console,
    run_id: str | None = None,
    approval_timeout: float = 60.0,
    observe_secret: Callable[[str], object] | None = None,
) -> DemoReport:
    """Narrate and check the six steps against a running ``stack`` and the broker at
    ``broker_url``, which must trust ``issuer`` (its identities file from
    :meth:`LocalOidcIssuer.write_identities`). ``observe_secret`` is called with every secret
    the demo handles (tests check none of them was printed). Raises
    :class:`DemoFailedError` at the first step that does not behave as narrated; the run is
    then ended (outcome ``failed``) so its credentials do not outlive the demo."""
    endpoints = stack.endpoints
    if endpoints is None:
        raise DemoFailedError("the stack is not running", reason="demo.no_stack")
    _psycopg()  # fail before the story starts when it is missing
    parties = _Parties(stack, endpoints, observe_secret or (lambda _secret: None))
    port = endpoints.postgres_port
    run_id = run_id or f"wf-demo-{secrets.token_hex(3)}"
    agent_id = endpoints.workload_ids["agent"]
    say = _Narrator(console)
    _introduce(console, endpoints, broker_url, issuer)

    clients = contextlib.AsyncExitStack()
    orchestrator: OrchestratorClient | None = None
    run_active = False
    try:
        # ---------------------------------------------------------------- 1
        with say.step(
            1,
            "An orchestrator starts a run for alice",
            "Every credential belongs to one task of one workflow run, and every run has an "
            "accountable human owner. The orchestrator proves what it is with an X.509-SVID "
            "from SPIRE, never a shared secret.",
        ):
            auth, orchestrator_id, expires = await parties.svid("orchestrator")
            say.act(
                f"SPIRE mints an X.509-SVID for {orchestrator_id} (until {_clock(expires)}; "
                "its private key stays in memory)"
            )
            orchestrator = await clients.enter_async_context(OrchestratorClient(broker_url, auth))
            whoami = await orchestrator.whoami()
            _expect(
                whoami.get("principal") == orchestrator_id
                and "orchestrator" in whoami.get("roles", []),
                f"the broker to see {orchestrator_id} with the orchestrator role",
                whoami,
            )
            say.ok(
                f"mTLS both ways: the SDK checked the broker is {endpoints.broker_spiffe_id}; "
                f"the broker verified {orchestrator_id} (role orchestrator)"
            )
            say.act(
                f"POST /v1/workflows: owner {OWNER}, ticket={TICKET}, participants [{agent_id}]"
            )
            run = await orchestrator.start_run(
                run_id,
                owner=OWNER,
                purpose=PURPOSE,
                ttl_seconds=900,
                labels={"ticket": TICKET},
                participants=[agent_id],
            )
            run_active = True
            found = {k: run.get(k) for k in ("id", "state", "owner", "started_by")}
            _expect(
                found
                == {"id": run_id, "state": "active", "owner": OWNER, "started_by": orchestrator_id},
                "an active run owned by alice and started by the orchestrator",
                found,
            )
            say.ok(f"201 Created: run {run_id} is active until {_clock(run.get('deadline'))}")
            say.block(
                [
                    ("purpose", str(run.get("purpose"))),
                    ("labels", ", ".join(f"{k}={v}" for k, v in run.get("labels", {}).items())),
                    ("chain", _hops(run.get("delegation_chain"))),
                ]
            )

        # ---------------------------------------------------------------- 2
        with say.step(
            2,
            "An agent gets PostgreSQL credentials for one task, and queries",
            "The agent asks for exactly what one task needs: target demo-db, task load-orders, "
            "5 minutes. Cedar policy decides at request time; OpenBao creates a PostgreSQL role "
            "for this task under a per-task token, so the credential dies with the task even "
            "if the broker is down.",
        ):
            auth, _, expires = await parties.svid("agent")
            say.act(f"SPIRE mints an X.509-SVID for {agent_id} (until {_clock(expires)})")
            agent = await clients.enter_async_context(AgentClient(broker_url, auth))
            say.act(f"POST /v1/credentials: run {run_id}, task load-orders, target demo-db")
            first = await agent.request_credential(
                workflow=run_id,
                task="load-orders",
                target="demo-db",
                ttl_seconds=300,
                justification="read yesterday's orders for the reconciliation",
                tool="psql",
            )
            if not isinstance(first, Credential):
                raise _UnexpectedError(f"expected 201 with a credential, found {_answer(first)}")
            parties.observe_secret(str(first.secret.get("password", "")))
            say.ok(
                f"201 Created: {first.credential_id} ({first.kind}), {first.ttl_seconds} s "
                f"until {_clock(first.expires_at)}, allowed by {', '.join(first.policy_ids)}"
            )
            say.block(
                [
                    ("username", str(first.secret.get("username"))),
                    ("password", f"{MASK} (returned once; never stored, logged or shown)"),
                    ("chain", _hops(first.metadata.get("delegation_chain"))),
                ]
            )
            sql = "SELECT id, customer, amount FROM orders ORDER BY id"
            rows = await asyncio.to_thread(_query, port, first.secret, sql)
            _expect(len(rows) > 0, "rows from the orders table", rows)
            say.ok(f"logged into PostgreSQL as {first.secret.get('username')}: {sql}")
            table = Table("id", "customer", "amount", box=None, header_style="dim")
            for row in rows:
                table.add_row(*(str(value) for value in row))
            say.show(table)

        # ---------------------------------------------------------------- 3
        with say.step(
            3,
            "A restricted target waits for a human approval",
            "prod-db is restricted and in production: policy lets it through only with an "
            "approval by someone other than the agent and the run's owner. The broker answers "
            "202 with an approval bound to this exact request; the agent waits, a person "
            "decides, the agent asks again, and policy decides again with the approval.",
        ):

            async def close_books(approval: str | None = None) -> Credential | PendingApproval:
                return await agent.request_credential(
                    workflow=run_id,
                    task="close-books",
                    target="prod-db",
                    ttl_seconds=300,
                    justification="sum the quarter's orders for the close",
                    tool="psql",
                    approval_id=approval,
                )

            say.act(f"POST /v1/credentials: run {run_id}, task close-books, target prod-db")
            pending = await close_books()
            if not isinstance(pending, PendingApproval):
                raise _UnexpectedError(
                    f"expected 202 with an approval to wait for, found {_answer(pending)}"
                )
            approval_id = pending.approval_id
            view = await agent.approval(approval_id)
            say.ok(
                f"202 Accepted: approval {approval_id} is {view.get('state')} (quorum "
                f"{view.get('quorum')}), asked by {', '.join(view.get('policy_ids', []))}"
            )
            say.act(f"the agent waits, polling GET /v1/approvals/{approval_id}")
            waiting = asyncio.create_task(
                agent.wait_for_approval(approval_id, timeout=approval_timeout, poll_seconds=0.5)
            )
            try:
                say.act(
                    f"the demo's OIDC issuer ({issuer.issuer}) signs ID tokens for alice and "
                    f"bob, group {APPROVER_GROUP} (the tokens are not shown)"
                )
                alice_token = issuer.id_token("alice", now=datetime.now(UTC))
                parties.observe_secret(alice_token)
                alice = await clients.enter_async_context(
                    AdminClient(broker_url, _bearer(alice_token, parties))
                )
                refusal: ApiError | None = None
                try:
                    await alice.decide(approval_id, approve=True, comment="my run, fine by me")
                except ApiError as exc:
                    refusal = exc
                if refusal is None or refusal.reason != "approval.sod_violation":
                    raise _UnexpectedError(
                        "expected 403 approval.sod_violation when the run's owner approves, "
                        "found "
                        + ("approved" if refusal is None else f"{refusal.status} {refusal.reason}")
                    )
                say.ok(
                    f"alice, the run's owner, tries to approve: {refusal.status} "
                    f"{refusal.reason} (separation of duties)"
                )
                bob_token = issuer.id_token("bob", now=datetime.now(UTC))
                parties.observe_secret(bob_token)
                bob = await clients.enter_async_context(
                    AdminClient(broker_url, _bearer(bob_token, parties))
                )
                listed = {a.get("id"): a for a in await bob.approvals()}
                _expect(approval_id in listed, f"{approval_id} among bob's pending", list(listed))
                seen = listed[approval_id]
                say.ok(f"bob lists what waits for him: {approval_id}")
                say.block(
                    [
                        ("who", str(seen.get("holder"))),
                        ("wants", f"{seen.get('target')} for {seen.get('ttl_seconds')} s"),
                        ("for", f"task {seen.get('task_id')} of run {seen.get('workflow_id')}"),
                        ("owner", str(seen.get("owner"))),
                        ("why", str(seen.get("justification"))),
                    ]
                )
                decided = await bob.decide(approval_id, approve=True, comment=f"checked {TICKET}")
                _expect(
                    decided.get("state") == "approved"
                    and decided.get("approvers") == [issuer.principal("bob")],
                    "the approval approved by bob",
                    {k: decided.get(k) for k in ("state", "approvers")},
                )
                say.ok(f'bob approves ("checked {TICKET}"): the approval is approved')
                polled = await asyncio.wait_for(waiting, timeout=approval_timeout + 5)
                _expect(polled.get("state") == "approved", "the agent to see it approved", polled)
                say.ok("the agent's poll sees it approved")
            finally:
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
            say.act(f"POST /v1/credentials again, the same request with approval {approval_id}")
            second = await close_books(approval_id)
            if not (
                isinstance(second, Credential) and second.metadata.get("approval_id") == approval_id
            ):
                raise _UnexpectedError(
                    f"expected 201 with a credential issued under {approval_id}, found "
                    f"{_answer(second)}"
                )
            parties.observe_secret(str(second.secret.get("password", "")))
            say.ok(
                f"201 Created: {second.credential_id} ({second.kind}) under {approval_id}, "
                f"{second.ttl_seconds} s until {_clock(second.expires_at)}"
            )
            sql = "SELECT count(*), sum(amount) FROM orders"
            ((count, total),) = await asyncio.to_thread(_query, port, second.secret, sql)
            say.ok(
                f"logged in as {second.secret.get('username')} (password {MASK}): {sql} → "
                f"{count} orders, {total} in total"
            )

        # ---------------------------------------------------------------- 4
        with say.step(
            4,
            "The agent reports a tool call and a side effect",
            "What an agent did with a credential belongs in the record. Each report is bound "
            "to a credential the agent holds, so the broker stamps it with the run, the task, "
            "the approval and the delegation chain.",
        ):
            say.act(f"POST /v1/events: agent.tool_call psql with {first.credential_id}")
            call = await agent.report_event(
                {
                    "type": "agent.tool_call",
                    "tool": "psql",
                    "credential_id": first.credential_id,
                    "summary": "SELECT id, customer, amount FROM orders ORDER BY id",
                    "details": {"rows": str(len(rows))},
                }
            )
            _expect(
                call.get("type") == "agent.tool_call"
                and (call.get("workflow_id"), call.get("task_id")) == (run_id, "load-orders"),
                f"an agent.tool_call event bound to run {run_id}, task load-orders",
                call,
            )
            say.ok(f"201 Created: {call.get('event_id')} (run {run_id}, task load-orders)")
            say.act(
                f"POST /v1/events: agent.side_effect ticket.comment with {second.credential_id}"
            )
            effect = await agent.report_event(
                {
                    "type": "agent.side_effect",
                    "effect": "ticket.comment",
                    "credential_id": second.credential_id,
                    "summary": f"posted the quarter's order total to {TICKET}",
                    "details": {"ticket": TICKET},
                }
            )
            _expect(
                effect.get("type") == "agent.side_effect"
                and (effect.get("workflow_id"), effect.get("task_id")) == (run_id, "close-books"),
                f"an agent.side_effect event bound to run {run_id}, task close-books",
                effect,
            )
            say.ok(f"201 Created: {effect.get('event_id')} (run {run_id}, task close-books)")

        # ---------------------------------------------------------------- 5
        credential_ids = (first.credential_id, second.credential_id)
        with say.step(
            5,
            "The run completes; its credentials are revoked",
            "Completion revokes every credential of the run in OpenBao (the task token by "
            "accessor, every database lease) and confirms each with a lookup; ?wait=true "
            "returns the report. OpenBao drops the PostgreSQL roles: the passwords stop working.",
        ):
            if orchestrator is None:  # step 1 made it
                raise _UnexpectedError("expected the orchestrator's client, found none")
            say.act(f"POST /v1/workflows/{run_id}/complete?wait=true (outcome completed)")
            completed = await orchestrator.complete_run(run_id, outcome="completed", wait=True)
            run_active = False
            report = completed.get("report", {})
            confirmed = sorted(r.get("credential_id") for r in report.get("confirmed_revoked", []))
            _expect(
                report.get("complete") is True and confirmed == sorted(credential_ids),
                f"a complete report confirming {sorted(credential_ids)} revoked",
                {
                    "complete": report.get("complete"),
                    "confirmed": confirmed,
                    "still_live": report.get("still_live"),
                },
            )
            workflow = completed.get("workflow", {})
            say.ok(
                f"run {workflow.get('state')}: {len(confirmed)} confirmed revoked, "
                f"{len(report.get('still_live', []))} still live"
            )
            after = await orchestrator.run(run_id)
            states = {c.get("credential_id"): c for c in after.get("credentials", [])}
            _expect(
                all(states.get(cid, {}).get("state") == "revoked" for cid in credential_ids),
                "every credential of the run in state revoked",
                {cid: states.get(cid, {}).get("state") for cid in credential_ids},
            )
            table = Table(
                "credential", "task", "target", "state", "reason", box=None, header_style="dim"
            )
            for cid in credential_ids:
                lease = states[cid]
                table.add_row(
                    cid,
                    str(lease.get("task_id")),
                    str(lease.get("target")),
                    str(lease.get("state")),
                    str(lease.get("revoke_reason")),
                )
            say.ok(f"GET /v1/workflows/{run_id}: the ledger agrees")
            say.show(table)
            for credential in (first, second):
                refused = await asyncio.to_thread(_login_refused, port, credential.secret)
                _expect(
                    refused is not None,
                    f"PostgreSQL to refuse {credential.secret.get('username')}",
                    "the login still works",
                )
                say.ok(f"PostgreSQL login as {credential.secret.get('username')} now fails:")
                say.block([("PostgreSQL", str(refused))])

        # ---------------------------------------------------------------- 6
        with say.step(
            6,
            "The audit trace of the run",
            "Every step above is a separate, hash-chained audit event: who approved, who "
            "executed, on whose behalf, and why. An admin reads them back through "
            "GET /v1/audit; the story is rendered as `tasklease audit trace` renders it.",
        ):
            auth, admin_id, _ = await parties.svid("admin")
            admin = await clients.enter_async_context(AdminClient(broker_url, auth))
            say.act(f"GET /v1/audit?workflow_id={run_id} as {admin_id}")
            records = await _audit_of_run(admin, run_id, credential_ids, issuer.principal("bob"))
            trace = render_trace(records, run_id)
            types = tuple(sorted({str(r.get("type")) for r in records}))
            say.ok(f"{len(records)} audit events: {', '.join(types)}")
            # As `tasklease audit trace` prints it: one record per line, wrapped by the terminal.
            console.print()
            console.rule(Text(f"tasklease audit trace {run_id}", "dim"), align="left", style="dim")
            console.print(Text(trace.rstrip("\n")), soft_wrap=True)
            console.rule(style="dim")
    except BaseException:
        if run_active and orchestrator is not None:
            # Leave nothing live behind a failed or interrupted demo.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    orchestrator.complete_run(run_id, outcome="failed", wait=True),
                    timeout=_CLEANUP_SECONDS,
                )
                console.print(
                    Text(f"cleanup: run {run_id} ended (failed), its credentials revoked", "dim")
                )
        raise
    finally:
        await clients.aclose()

    console.print()
    console.print(
        Panel(
            Text.assemble(
                ("Demo passed: ", "bold green"),
                f"all {len(say.passed)} steps behaved as narrated. Run {run_id}: "
                f"{len(credential_ids)} credentials issued, used, reported and revoked.",
            ),
            border_style="green",
        )
    )
    return DemoReport(
        run_id=run_id,
        credential_ids=credential_ids,
        approval_id=approval_id,
        event_ids=(str(call.get("event_id")), str(effect.get("event_id"))),
        audit_types=types,
        trace=trace,
        steps=tuple(say.passed),
    )


def _bearer(token: str, parties: _Parties) -> BearerAuth:
    return BearerAuth(token, bundle=parties.bundle, broker_id=parties.endpoints.broker_spiffe_id)


async def _audit_of_run(
    admin: AdminClient, run_id: str, credential_ids: Sequence[str], approver: str
) -> list[dict[str, Any]]:
    """Every audit record of the run, once it holds what the steps did (the trail writes in
    the background, so wait a little for the last events)."""
    deadline = asyncio.get_running_loop().time() + _AUDIT_WAIT_SECONDS
    while True:
        records: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            filters = {"workflow_id": run_id, "limit": "500"}
            if cursor:
                filters["cursor"] = cursor
            page = await admin.audit(**filters)
            records.extend(r for r in page.get("events", []) if isinstance(r, dict))
            cursor = page.get("next_cursor")
            if not cursor:
                break
        missing = _missing_from_trail(records, credential_ids, approver)
        if not missing:
            return records
        if asyncio.get_running_loop().time() >= deadline:
            _expect(False, "the audit trail to hold every step", f"missing {missing}")
        await asyncio.sleep(0.25)


def _missing_from_trail(
    records: Sequence[Mapping[str, Any]], credential_ids: Sequence[str], approver: str
) -> list[str]:
    types = {r.get("type") for r in records}
    missing = [
        t
        for t in (
            "workflow.started",
            "policy.decision",
            "approval.requested",
            "approval.decided",
            "credential.issued",
            "agent.tool_call",
            "agent.side_effect",
            "workflow.completed",
            "credential.revoked",
        )
        if t not in types
    ]
    for kind in ("credential.issued", "credential.revoked"):
        have = {r.get("credential_id") for r in records if r.get("type") == kind}
        missing.extend(f"{kind} {cid}" for cid in credential_ids if cid not in have)
    approvals = [
        r
        for r in records
        if r.get("type") == "approval.decided"
        and r.get("actor") == approver
        and isinstance(r.get("payload"), Mapping)
        and r["payload"].get("decision") == "approve"
    ]
    if not approvals:
        missing.append(f"approval.decided approve by {approver}")
    return missing


def _introduce(
    console: Console, endpoints: StackEndpoints, broker_url: str, issuer: LocalOidcIssuer
) -> None:
    console.print(
        Panel(
            Text.assemble(
                ("tasklease demo", "bold"),
                ": one workflow run on the real local stack, step by step. Every step is "
                "checked; the demo stops with an error if one does not behave as told.",
            ),
            border_style="cyan",
        )
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in (
        ("OpenBao", f"{endpoints.openbao_tls_addr} (TLS, the stack's own CA)"),
        ("SPIRE", f"trust domain {endpoints.trust_domain}"),
        ("Redis", f"127.0.0.1:{endpoints.redis_port} (the ledger and the audit stream)"),
        ("PostgreSQL", f"127.0.0.1:{endpoints.postgres_port}, database demo, table orders"),
        ("broker", f"{broker_url} (its own X.509-SVID {endpoints.broker_spiffe_id})"),
        (
            "people",
            f"a local test OIDC issuer {issuer.issuer} (an ES256 key made for this demo); "
            f"group {APPROVER_GROUP} → role approver",
        ),
    ):
        grid.add_row(key, Text(value))
    console.print(Padding(grid, (0, 0, 0, 2), expand=False))


# --------------------------------------------------------------------------- tasklease demo


def _log_into(path: Path) -> IO[str]:
    """Send the in-process broker's logs (structlog JSON and the standard library's) to
    ``path``, so the terminal shows only the story."""
    from broker.bootstrap import log_processors  # noqa: PLC0415 - the composition root

    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open("a", encoding="utf-8")
    structlog.configure(
        processors=log_processors(),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return stream


def _broker_environment(endpoints: StackEndpoints, identities: Path) -> dict[str, str]:
    """What points the broker's settings at the stack (as ``tasklease dev`` does), on a free
    port, with the demo's identities (its OIDC issuer)."""
    env = {
        "SPIFFE_ENDPOINT_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_SPIFFE__TRUST_DOMAIN": endpoints.trust_domain,
        "TASKLEASE_SPIFFE__WORKLOAD_API_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_VAULT__ADDR": endpoints.openbao_tls_addr,
        "TASKLEASE_VAULT__CA_FILE": endpoints.openbao_ca_file,
        "TASKLEASE_REDIS__URL": endpoints.redis_url,
        "TASKLEASE_SERVER__PORT": "0",
        "TASKLEASE_IDENTITIES_FILE": str(identities),
    }
    # The repository's configuration, wherever the command is run from (unless overridden).
    for name, path in (
        ("TASKLEASE_CONFIG", REPO_ROOT / "config" / "broker.toml"),
        ("TASKLEASE_POLICY_DIR", REPO_ROOT / "config" / "policies"),
        ("TASKLEASE_TARGETS_FILE", REPO_ROOT / "config" / "targets.toml"),
    ):
        if name not in os.environ and path.exists():
            env[name] = str(path)
    return env


async def _serve_and_narrate(
    stack: DevStack, issuer: LocalOidcIssuer, console: Console
) -> DemoReport:
    from broker.bootstrap import start_broker  # noqa: PLC0415 - the composition root
    from broker.config import load_settings  # noqa: PLC0415

    broker = await start_broker(load_settings())
    try:
        return await run_demo(stack, broker.url, issuer, console=console)
    finally:
        await broker.stop()


def demo_on_fresh_stack(*, console: Console, logs: Path | None = None) -> DemoReport:
    """``tasklease demo``: start the stack in a private temporary directory and a broker on
    it, narrate the run, then stop and remove everything (also on failure and Ctrl-C).
    ``logs``: copy the stack's and the broker's logs there first."""
    from broker.devstack import build_spire  # noqa: PLC0415

    def echo(message: str) -> None:
        console.print(Text.assemble(("stack: ", "dim"), message))

    build_spire(echo=echo)
    echo("starting OpenBao, SPIRE server and agent, Redis, PostgreSQL…")
    stack = DevStack(echo=echo)
    log_stream: IO[str] | None = None
    try:
        endpoints = stack.start()
        log_stream = _log_into(stack.logs_dir / "broker.jsonl")
        issuer = LocalOidcIssuer.generate()
        identities = issuer.write_identities(stack.runtime_dir / "demo")
        os.environ.update(_broker_environment(endpoints, identities))
        return asyncio.run(_serve_and_narrate(stack, issuer, console))
    finally:
        if log_stream is not None:
            log_stream.close()
        if logs is not None and stack.logs_dir.exists():
            shutil.copytree(stack.logs_dir, logs, dirs_exist_ok=True)
        echo("stopping the stack and removing its directory…")
        stack.stop()
