"""``tasklease`` commands that talk to a running broker over HTTPS (through ``broker.client``).

Who you are comes from, in this order: ``--cert``/``--key`` (an X.509-SVID as PEM files) with
``--bundle``; ``--token`` (a person's OIDC ID token) with ``--bundle``; else the SPIFFE
Workload API (``SPIFFE_ENDPOINT_SOCKET``). Each option has an environment variable
(``TASKLEASE_URL``, ``TASKLEASE_CERT``, ``TASKLEASE_KEY``, ``TASKLEASE_BUNDLE``,
``TASKLEASE_TOKEN``, ``TASKLEASE_BROKER_ID``). ``--output json`` prints machine-readable JSON.

Exit codes: 0 done; 1 the broker refused or could not be reached (code and reason printed);
2 usage; 3 configuration (no identity, unreadable files); 4 a revocation left credentials
live (listed).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker.client import AdminClient, ApiError, Auth, BearerAuth, PemAuth, X509SourceAuth
from broker.core.model import aware_time

EXIT_ERROR = 1
EXIT_CONFIG = 3
EXIT_STILL_LIVE = 4

_out = Console()
_err = Console(stderr=True)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the broker is and how to authenticate to it (from the global options)."""

    url: str
    cert: Path | None
    key: Path | None
    bundle: Path | None
    token: str | None
    broker_id: str | None
    output: str

    @property
    def json(self) -> bool:
        """``--output json``."""
        return self.output == "json"


def connection_options(  # noqa: PLR0917 - typer options
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="TASKLEASE_URL", help="Broker URL.")
    ] = "https://127.0.0.1:8443",
    cert: Annotated[
        Path | None, typer.Option(envvar="TASKLEASE_CERT", help="X.509-SVID chain (PEM).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(envvar="TASKLEASE_KEY", help="Its private key (PEM).")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(envvar="TASKLEASE_BUNDLE", help="Trust bundle to verify the broker (PEM)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="TASKLEASE_TOKEN", help="OIDC ID token (people)", show_default=False),
    ] = None,
    broker_id: Annotated[
        str | None,
        typer.Option(envvar="TASKLEASE_BROKER_ID", help="The broker's expected SPIFFE ID."),
    ] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="table or json.", case_sensitive=False)
    ] = "table",
) -> None:
    """Just-in-time credential broker for AI-agent and machine workflows."""
    if output not in ("table", "json"):
        raise typer.BadParameter("--output must be table or json")
    ctx.obj = Connection(url, cert, key, bundle, token, broker_id, output.lower())


@contextmanager
def _auth(conn: Connection) -> Iterator[Auth]:
    if conn.cert is not None or conn.key is not None:
        if conn.cert is None or conn.key is None or conn.bundle is None:
            _fail_config("--cert, --key and --bundle go together")
        yield PemAuth(bundle=conn.bundle, chain=conn.cert, key=conn.key, broker_id=conn.broker_id)
        return
    if conn.token is not None:
        if conn.bundle is None:
            _fail_config("--token needs --bundle (to verify the broker's certificate)")
        yield BearerAuth(conn.token, bundle=conn.bundle, broker_id=conn.broker_id)
        return
    socket = os.environ.get("SPIFFE_ENDPOINT_SOCKET")
    if not socket:
        _fail_config(
            "no identity: give --cert/--key/--bundle, --token/--bundle, or set "
            "SPIFFE_ENDPOINT_SOCKET to use the SPIFFE Workload API"
        )
    from spiffe import X509Source  # noqa: PLC0415 - only when the Workload API is used

    try:
        source = X509Source(socket_path=socket, timeout_in_seconds=15)
    except Exception as exc:  # noqa: BLE001 - py-spiffe raises several types
        _fail_config(f"the Workload API at {socket} gave no SVID ({type(exc).__name__})")
    try:
        yield X509SourceAuth(source, broker_id=conn.broker_id)
    finally:
        source.close()


def _fail_config(message: str) -> NoReturn:
    _err.print(f"[bold red]error[/] (configuration): {message}", highlight=False)
    raise typer.Exit(EXIT_CONFIG)


def run_admin(ctx: typer.Context, work: Callable[[AdminClient], Awaitable[_T]]) -> _T:
    """Run ``work`` with an admin client built from the global options; a refusal prints its
    code and reason and exits 1, a configuration problem exits 3."""
    return _run(ctx, work)


def _run(ctx: typer.Context, work: Callable[[AdminClient], Awaitable[_T]]) -> _T:
    conn: Connection = ctx.obj
    try:
        with _auth(conn) as auth:

            async def go() -> _T:
                async with AdminClient(conn.url, auth) as client:
                    return await work(client)

            return asyncio.run(go())
    except ApiError as exc:
        _err.print(
            f"[bold red]error[/] {exc.status or ''} {exc.code} ({exc.reason}): {exc.detail}",
            highlight=False,
            markup=True,
        )
        raise typer.Exit(EXIT_ERROR) from None
    except OSError as exc:
        _fail_config(f"cannot read {getattr(exc, 'filename', '') or 'a file'}: {exc.strerror}")


def _emit(conn: Connection, data: Any, table: Callable[[], RenderableType]) -> None:
    if conn.json:
        _out.print_json(json.dumps(data, default=str))
        return
    rendered = table()
    _out.print(rendered, highlight=False, soft_wrap=True)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    return table


# --------------------------------------------------------------------------- targets, leases

targets_app = typer.Typer(help="The target catalog.", no_args_is_help=True)
leases_app = typer.Typer(help="The lease ledger (admin).", no_args_is_help=True)
quarantine_app = typer.Typer(help="Block issuance for an identity, a run or a target (admin).")
approvals_app = typer.Typer(help="Human approvals (approver role).", no_args_is_help=True)
runs_app = typer.Typer(
    help="Workflow runs: list them, read one, or end it and revoke its credentials (its "
    "orchestrator, or admin).",
    no_args_is_help=True,
)
quarantine_app.info.no_args_is_help = True


@targets_app.command("ls")
def targets_ls(ctx: typer.Context) -> None:
    """List the targets agents may ask credentials for."""
    body = _run(ctx, lambda c: c.call("GET", "/v1/targets"))[1]
    targets = body["targets"]
    _emit(
        ctx.obj,
        targets,
        lambda: _table(
            f"{len(targets)} targets",
            ["name", "kind", "system", "env", "sensitivity", "max ttl", "revocable"],
            [
                [
                    t["name"],
                    t["kind"],
                    t["system"],
                    t["environment"],
                    t["sensitivity"],
                    f"{t['max_ttl_seconds']}s",
                    "yes" if t["revocable"] else "no (clamped)",
                ]
                for t in targets
            ],
        ),
    )


def _selector(
    *,
    run: str | None,
    task: str | None,
    holder: str | None,
    holder_prefix: str | None,
    owner: str | None,
    target: str | None,
    sensitivity: str | None,
) -> dict[str, str]:
    given = {
        "workflow_id": run,
        "task_id": task,
        "holder": holder,
        "holder_prefix": holder_prefix,
        "owner": owner,
        "target": target,
        "sensitivity": sensitivity,
    }
    return {k: v for k, v in given.items() if v is not None}


_Run = Annotated[str | None, typer.Option("--run", help="Workflow run id.")]
_Task = Annotated[str | None, typer.Option(help="Task id.")]
_Holder = Annotated[str | None, typer.Option(help="Holder SPIFFE ID (exact).")]
_HolderPrefix = Annotated[str | None, typer.Option(help="Holder SPIFFE ID prefix.")]
_Owner = Annotated[str | None, typer.Option(help="The run owner (a person).")]
_Target = Annotated[str | None, typer.Option(help="Target name.")]
_Sensitivity = Annotated[str | None, typer.Option(help="public|internal|confidential|restricted")]
_LIVE = "issuing,active,revoking,revoke_failed"


async def _leases(client: AdminClient, query: dict[str, str]) -> list[dict[str, Any]]:
    body = (await client.call("GET", "/v1/leases", params=query))[1]
    return list(body["leases"])


@leases_app.command("ls")
def leases_ls(  # noqa: PLR0917 - typer options
    ctx: typer.Context,
    run: _Run = None,
    task: _Task = None,
    holder: _Holder = None,
    holder_prefix: _HolderPrefix = None,
    owner: _Owner = None,
    target: _Target = None,
    sensitivity: _Sensitivity = None,
    state: Annotated[
        str | None, typer.Option(help=f"Comma-separated states (live ones: {_LIVE}).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    all_leases: Annotated[bool, typer.Option("--all", help="Every lease (no filter).")] = False,
) -> None:
    """List leases (metadata only; a secret is never stored)."""
    query = _selector(
        run=run,
        task=task,
        holder=holder,
        holder_prefix=holder_prefix,
        owner=owner,
        target=target,
        sensitivity=sensitivity,
    )
    if state:
        query["state"] = state
    query["limit"] = str(limit)
    if all_leases:
        query["all"] = "true"
    leases = _run(ctx, lambda c: _leases(c, query))
    _emit(
        ctx.obj,
        leases,
        lambda: _table(
            f"{len(leases)} leases",
            ["credential", "run", "task", "target", "holder", "state", "expires"],
            [
                [
                    x["credential_id"],
                    x["workflow_id"],
                    x["task_id"],
                    x["target"],
                    x["holder"],
                    x["state"],
                    x["expires_at"],
                ]
                for x in leases
            ],
        ),
    )


# --------------------------------------------------------------------------- revoke


def revoke(  # noqa: PLR0917 - typer options
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (an incident or ticket reference).")],
    run: _Run = None,
    task: _Task = None,
    holder: _Holder = None,
    holder_prefix: _HolderPrefix = None,
    owner: _Owner = None,
    target: _Target = None,
    sensitivity: _Sensitivity = None,
    everything: Annotated[
        bool, typer.Option("--everything", help="Every live credential (needs no filter).")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Force revocation of what matches a selector: prints what OpenBao confirmed revoked and
    what is still live (exit 4 if anything is)."""
    conn: Connection = ctx.obj
    selector: dict[str, Any] = _selector(
        run=run,
        task=task,
        holder=holder,
        holder_prefix=holder_prefix,
        owner=owner,
        target=target,
        sensitivity=sensitivity,
    )
    if everything == bool(selector):
        raise typer.BadParameter("give at least one selector, or --everything alone")
    if everything:
        selector = {"everything": True}
    query = {**{k: str(v) for k, v in selector.items() if k != "everything"}, "state": _LIVE}
    if everything:
        query["all"] = "true"
    query["limit"] = "1000"

    async def work(client: AdminClient) -> dict[str, Any]:
        matched = len(await _leases(client, query))
        if not yes and not conn.json:
            shown = "1000+" if matched >= 1000 else str(matched)
            prompt = f"Revoke {shown} live credential(s) matching {selector}?"
            if not await asyncio.to_thread(typer.confirm, prompt):
                raise typer.Exit(EXIT_ERROR)
        call = asyncio.create_task(client.revoke(selector, reason=reason))
        if conn.json or matched == 0:
            return await call
        with Progress(
            TextColumn("revoking"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=_err,
            transient=True,
        ) as progress:
            bar = progress.add_task("revoke", total=matched)
            while not call.done():
                await asyncio.wait({call}, timeout=0.5)
                if not call.done():
                    live = len(await _leases(client, query))
                    progress.update(bar, completed=max(0, matched - live))
            progress.update(bar, completed=matched)
        return await call

    report = _run(ctx, work)
    _emit(conn, report, lambda: _report_table(report))
    if not report.get("complete", False):
        raise typer.Exit(EXIT_STILL_LIVE)


def _report_table(report: dict[str, Any]) -> Table:
    rows = [
        [r["credential_id"], r.get("target", ""), r.get("holder", ""), "revoked", r.get("reason")]
        for r in report["confirmed_revoked"]
    ] + [
        [
            r["credential_id"],
            r.get("target", ""),
            r.get("holder", ""),
            "STILL LIVE",
            r.get("detail"),
        ]
        for r in report["still_live"]
    ]
    counts = report["counts"]
    title = f"{counts['confirmed_revoked']} confirmed revoked, {counts['still_live']} still live"
    if report.get("truncated"):
        title += (
            f"; {report.get('scheduled', 'more')} made due in all: the ones not listed are "
            "revoked by the sweeper"
        )
    return _table(title, ["credential", "target", "holder", "result", "reason"], rows)


# --------------------------------------------------------------------------- runs


@runs_app.command("ls")
def runs_ls(  # noqa: PLR0917 - typer options
    ctx: typer.Context,
    owner: _Owner = None,
    started_by: Annotated[
        str | None, typer.Option(help="Only runs this orchestrator (SPIFFE ID) started.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(help="Comma-separated states: active,completed,failed,cancelled,…"),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="key=value, e.g. ticket=OPS-1234 (repeat it: all must match)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Runs to list in all.")] = 100,
) -> None:
    """List runs, latest over first (an orchestrator: the runs it started), following the
    pages until LIMIT runs or the end."""
    conn: Connection = ctx.obj
    states = tuple(s for s in (state or "").split(",") if s)
    labels: dict[str, str] = {}
    for pair in label or ():
        key, equals, value = pair.partition("=")
        if not equals:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--label")
        labels[key] = value

    async def every_page(client: AdminClient) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(runs) < limit:
            page = await client.list_runs(
                owner=owner,
                started_by=started_by,
                states=states,
                labels=labels,
                limit=limit - len(runs),
                cursor=cursor,
            )
            runs += page["runs"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return runs

    runs = _run(ctx, every_page)
    _emit(
        conn,
        runs,
        lambda: _table(
            f"{len(runs)} runs",
            ["run", "state", "owner", "started by", "deadline", "ended", "purpose"],
            [
                [
                    r["id"],
                    r["state"],
                    r["owner"],
                    r["started_by"],
                    r["deadline"],
                    r["ended_at"] or "",
                    r["purpose"],
                ]
                for r in runs
            ],
        ),
    )


@runs_app.command("show")
def runs_show(
    ctx: typer.Context, run_id: Annotated[str, typer.Argument(help="The run's id.")]
) -> None:
    """A run: owner, purpose, deadline, state, and its credentials' metadata."""
    conn: Connection = ctx.obj
    view = _run(ctx, lambda client: client.run(run_id))

    def table() -> Table:
        credentials = view.get("credentials", [])
        title = (
            f"run {view['id']} ({view['state']}): owner {view['owner']}, "
            f"purpose {view['purpose']!r}, started by {view['started_by']}, "
            f"deadline {view['deadline']}; {len(credentials)} credential(s)"
        )
        return _table(
            title,
            ["credential", "task", "target", "holder", "state", "expires"],
            [
                [
                    x[key]
                    for key in (
                        "credential_id",
                        "task_id",
                        "target",
                        "holder",
                        "state",
                        "expires_at",
                    )
                ]
                for x in credentials
            ],
        )

    _emit(conn, view, table)


@runs_app.command("complete")
def runs_complete(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    outcome: Annotated[
        str, typer.Option(help="completed|failed|cancelled (what the audit trail records).")
    ] = "completed",
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait", help="Wait for OpenBao to confirm the revocations (the report)."
        ),
    ] = True,
) -> None:
    """End a run and revoke every credential of it: with --wait (default) prints what was
    confirmed revoked and what is still live (exit 4 if anything is)."""
    conn: Connection = ctx.obj
    answer = _run(ctx, lambda client: client.complete_run(run_id, outcome=outcome, wait=wait))
    report = answer.get("report")
    if report is None:
        scheduled = answer.get("scheduled", [])
        _emit(conn, answer, lambda: f"run {run_id} ended; {len(scheduled)} credential(s) made due")
        return
    _emit(conn, answer, lambda: _report_table(report))
    if not report.get("complete", False):
        raise typer.Exit(EXIT_STILL_LIVE)


# --------------------------------------------------------------------------- quarantine


@quarantine_app.command("set")
def quarantine_set(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="identity|identity_prefix|workflow|target")],
    value: Annotated[str, typer.Argument(help="SPIFFE ID (prefix), run id or target name.")],
    reason: Annotated[str, typer.Option(help="Why.")],
    ttl: Annotated[int, typer.Option(help="Seconds until it lifts by itself.", min=1)] = 3600,
) -> None:
    """Block new issuance (live credentials are re-checked and revoked if now denied)."""
    body = _run(ctx, lambda c: c.quarantine(kind, value, reason=reason, ttl_seconds=ttl))
    _emit(
        ctx.obj,
        body,
        lambda: f"quarantined {body['kind']} {body['value']} until {body['expires_at']}",
    )


@quarantine_app.command("lift")
def quarantine_lift(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="identity|identity_prefix|workflow|target")],
    value: Annotated[str, typer.Argument()],
) -> None:
    """Lift a quarantine before it expires."""
    body = _run(ctx, lambda c: c.lift_quarantine(kind, value))
    _emit(ctx.obj, body, lambda: f"lifted {kind} {value}")


@quarantine_app.command("ls")
def quarantine_ls(ctx: typer.Context) -> None:
    """The active quarantines."""
    found = _run(ctx, lambda c: c.quarantines())
    _emit(
        ctx.obj,
        found,
        lambda: _table(
            f"{len(found)} active quarantines",
            ["kind", "value", "reason", "by", "until"],
            [[q["kind"], q["value"], q["reason"], q["created_by"], q["expires_at"]] for q in found],
        ),
    )


# --------------------------------------------------------------------------- approvals


@approvals_app.command("ls")
def approvals_ls(
    ctx: typer.Context,
    state: Annotated[
        str, typer.Option(help="pending|approved|denied|withdrawn|used|expired|all")
    ] = "pending",
) -> None:
    """Approvals waiting for (or past) a decision."""
    found = _run(ctx, lambda c: c.approvals(state))
    _emit(
        ctx.obj,
        found,
        lambda: _table(
            f"{len(found)} {state} approvals",
            ["id", "run", "task", "target", "requester", "ttl", "quorum", "state", "expires"],
            [
                [
                    a.get("id"),
                    a.get("workflow_id"),
                    a.get("task_id"),
                    a.get("target"),
                    a.get("requester"),
                    a.get("ttl_seconds"),
                    f"{len(a.get('approvers', []))}/{a.get('quorum')}",
                    a.get("state"),
                    a.get("expires_at"),
                ]
                for a in found
            ],
        ),
    )


def _decide(ctx: typer.Context, approval_id: str, approve: bool, comment: str) -> None:
    body = _run(ctx, lambda c: c.decide(approval_id, approve=approve, comment=comment))
    _emit(ctx.obj, body, lambda: f"approval {approval_id}: {body.get('state')}")


@approvals_app.command("approve")
def approvals_approve(
    ctx: typer.Context,
    approval_id: Annotated[str, typer.Argument()],
    comment: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")] = "",
) -> None:
    """Approve a pending request (never your own, nor one of a run you own)."""
    _decide(ctx, approval_id, True, comment)


@approvals_app.command("deny")
def approvals_deny(
    ctx: typer.Context,
    approval_id: Annotated[str, typer.Argument()],
    comment: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")] = "",
) -> None:
    """Deny a pending request (final)."""
    _decide(ctx, approval_id, False, comment)


# --------------------------------------------------------------------------- reports

report_app = typer.Typer(help="Reports for the security team (admin).", no_args_is_help=True)


def _since(since: str | None, days: int | None) -> datetime | None:
    if since is not None and days is not None:
        raise typer.BadParameter("give --since or --days, not both", param_hint="--days")
    if days is not None:
        return datetime.now(UTC).replace(microsecond=0) - timedelta(days=days)
    if since is None:
        return None
    moment = aware_time(since)
    if moment is None:
        raise typer.BadParameter(
            f"{since!r} is not an RFC 3339 time with an offset", param_hint="--since"
        )
    return moment


def _minute(stamp: str | None) -> str:
    """An RFC 3339 time as ``YYYY-MM-DD HH:MM`` in UTC (empty for None)."""
    if stamp is None:
        return ""
    return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _who(usages: Sequence[dict[str, Any]], count: int, shown: int = 3) -> str:
    named = ", ".join(f"{u['who']} ({u['credentials']})" for u in usages[:shown])
    more = count - min(len(usages), shown)
    return f"{named}, +{more} more" if more > 0 else named


@report_app.command("legacy")
def report_legacy(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="Only credentials issued from this RFC 3339 time.")
    ] = None,
    days: Annotated[
        int | None, typer.Option(min=1, max=3650, help="Only the last DAYS days.")
    ] = None,
) -> None:
    """Burn-down of legacy targets (standing static secrets): who still gets credentials for
    each, most recently used first; unused ones are candidates to retire."""
    moment = _since(since, days)
    report = _run(ctx, lambda c: c.legacy_report(since=moment))
    window = (
        f"the last {report['ledger_retention_days']} days the ledger keeps"
        if report["ledger_retention_days"]
        else "everything the ledger keeps"
    )
    if report["since"]:
        window = f"since {report['since']}"
    targets = report["targets"]

    def rendered() -> Group:
        table = _table(
            f"{len(targets)} legacy target{'' if len(targets) == 1 else 's'} ({window})",
            ["target", "issued", "live", "runs", "holders", "owners", "last issued (UTC)"],
            [
                [
                    t["target"]["name"],
                    ("" if t["complete"] else "≥ ") + str(t["credentials"]),
                    t["live"],
                    t["runs"],
                    t["holder_count"],
                    t["owner_count"],
                    _minute(t["last_issued_at"]) or "unused: retire it?",
                ]
                for t in targets
            ],
        )
        lines = [
            f"{t['target']['name']}: held by {_who(t['holders'], t['holder_count'])}; "
            f"for {_who(t['owners'], t['owner_count'])}"
            for t in targets
            if not t["unused"]
        ]
        return Group(table, *lines)

    _emit(ctx.obj, report, rendered)


def register(app: typer.Typer) -> None:
    """Add the remote commands and the connection options to the ``tasklease`` app."""
    app.callback()(connection_options)
    app.add_typer(targets_app, name="targets")
    app.add_typer(leases_app, name="leases")
    app.command("revoke")(revoke)
    app.add_typer(quarantine_app, name="quarantine")
    app.add_typer(approvals_app, name="approvals")
    app.add_typer(runs_app, name="runs")
    app.add_typer(report_app, name="report")
