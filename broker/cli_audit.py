"""``tasklease audit``: verify the hash chains, tell the story of a run, follow the trail.

Records come from JSONL files (``--file``: the audit file, or a broker log holding the stdout
sink's lines; repeat it for rotated files, oldest first), from a running broker over HTTPS
(``--remote``: ``GET /v1/audit`` with the admin identity given by the global options, see
``tasklease --help``), or otherwise from the Redis stream named by the settings
(``audit.redis.stream`` on ``redis.url``).

Exit codes: 0 ok; 1 a tasklease error; 3 configuration; 4 ``verify`` found tampering.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from broker.errors import TaskleaseError

if TYPE_CHECKING:
    from broker.adapters.audit_redis import StreamHead
    from broker.core.audit_chain import Finding

EXIT_TAMPERED = 4

audit_app = typer.Typer(
    help="The audit trail: verify its hash chains, tell a run's story, follow it.",
    no_args_is_help=True,
)

_Files = Annotated[
    list[Path] | None,
    typer.Option(
        "--file",
        "-f",
        help="JSONL audit file or broker log (repeatable, oldest first); default: Redis.",
        exists=True,
        dir_okay=False,
        readable=True,
    ),
]
_Stream = Annotated[
    str | None,
    typer.Option("--stream", help="Redis stream key (default: audit.redis.stream)."),
]
_Remote = Annotated[
    bool,
    typer.Option(
        "--remote",
        help="Read GET /v1/audit from the broker at --url (admin identity: --cert/--key/"
        "--bundle, --token, or the Workload API) instead of Redis.",
    ),
]
# Pages of GET /v1/audit read by one --remote command, at most (500 records each).
_MAX_REMOTE_PAGES = 2000


def _fail(exc: TaskleaseError) -> typer.Exit:
    from broker.cli import _fail as fail  # noqa: PLC0415 - the one error printer

    return fail(exc)


def _file_records(files: list[Path]) -> Iterator[tuple[str, object]]:
    from broker.adapters.audit_sinks import records_from_lines  # noqa: PLC0415

    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, raw in enumerate(text.split("\n"), start=1):
            for record in records_from_lines(iter([raw])):
                yield f"{path}:{number}", record


async def _redis_records(
    stream: str | None, *, run: str | None = None, last: int | None = None
) -> list[tuple[str, object]]:
    from broker.adapters.audit_redis import RedisAuditReader  # noqa: PLC0415
    from broker.adapters.redis_connection import redis_client  # noqa: PLC0415
    from broker.config import load_settings  # noqa: PLC0415

    settings = load_settings()
    key = stream or settings.audit.redis.stream
    client = redis_client(settings.redis)
    try:
        reader = RedisAuditReader(client=client, stream=key)
        if last is not None:
            return await reader.tail(last)
        source = f"{key}:run:{run}" if run is not None else None
        return [entry async for entry in reader.every_record(source)]
    except OSError as exc:
        from broker.errors import AuditUnavailableError  # noqa: PLC0415

        raise AuditUnavailableError(
            f"cannot read the audit stream from Redis ({type(exc).__name__})",
            reason="audit.redis_failed",
        ) from exc
    finally:
        await client.aclose()


async def _redis_head(stream: str | None) -> StreamHead:
    from broker.adapters.audit_redis import RedisAuditReader  # noqa: PLC0415
    from broker.adapters.redis_connection import redis_client  # noqa: PLC0415
    from broker.config import load_settings  # noqa: PLC0415

    settings = load_settings()
    client = redis_client(settings.redis)
    try:
        return await RedisAuditReader(
            client=client, stream=stream or settings.audit.redis.stream
        ).head()
    finally:
        await client.aclose()


def _trimmed_hint(stream: str | None) -> str | None:
    """Why a stream's chains may start after seq 0, and the flag that accepts it; None when
    the stream did not lose its head (or cannot be asked)."""
    import redis.exceptions  # noqa: PLC0415

    try:
        head = asyncio.run(_redis_head(stream))
    except (TaskleaseError, redis.exceptions.RedisError, OSError):
        return None  # the findings stand as they are
    if head.entries_added is None:
        return (
            f"Redis does not say whether {head.stream} was trimmed; if audit.redis."
            "retention_days or audit.redis.maxlen bounds it, verify with --allow-trimmed-head"
        )
    if not head.trimmed:
        return None
    return (
        f"{head.stream} looks trimmed: its {head.removed} oldest entries (of "
        f"{head.entries_added} ever added) are gone, none after them; if audit.redis."
        "retention_days or audit.redis.maxlen bounds it, verify with --allow-trimmed-head"
    )


def _remote_records(
    ctx: typer.Context, *, run: str | None = None, since: str | None = None
) -> list[tuple[str, object]]:
    """Every record ``GET /v1/audit`` returns for the filters, page after page."""
    from broker.cli_remote import run_admin  # noqa: PLC0415
    from broker.client import AdminClient  # noqa: PLC0415

    async def read(client: AdminClient) -> list[tuple[str, object]]:
        found: list[tuple[str, object]] = []
        filters = {"limit": "500"}
        if run is not None:
            filters["workflow_id"] = run
        if since is not None:
            filters["since"] = since
        cursor: str | None = None
        for page_number in range(_MAX_REMOTE_PAGES):
            page = await client.audit(**filters, **({"cursor": cursor} if cursor else {}))
            for index, event in enumerate(page.get("events", [])):
                found.append((f"page {page_number + 1} #{index + 1}", event))
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found

    return run_admin(ctx, read)


def _records(
    files: list[Path] | None,
    stream: str | None,
    *,
    run: str | None = None,
    last: int | None = None,
) -> list[tuple[str, object]]:
    import redis.exceptions  # noqa: PLC0415

    if files:
        found = list(_file_records(files))
        return found[-last:] if last is not None else found
    try:
        return asyncio.run(_redis_records(stream, run=run, last=last))
    except redis.exceptions.RedisError as exc:
        from broker.errors import AuditUnavailableError  # noqa: PLC0415

        raise AuditUnavailableError(
            f"cannot read the audit stream from Redis ({type(exc).__name__})",
            reason="audit.redis_failed",
        ) from exc


@audit_app.command("verify")
def audit_verify(  # noqa: PLR0917 - typer options
    ctx: typer.Context,
    files: _Files = None,
    stream: _Stream = None,
    remote: _Remote = False,
    anchor: Annotated[
        list[str] | None,
        typer.Option(
            "--anchor",
            help="writer:seq:hash known from elsewhere (repeatable): detects truncation and "
            "rewrites.",
        ),
    ] = None,
    allow_trimmed_head: Annotated[
        bool,
        typer.Option(
            help="A chain may start after seq 0: the stream is bounded by audit.redis."
            "retention_days or audit.redis.maxlen, which trim its oldest entries."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every writer's hash chain; say what was edited, deleted, inserted or reordered,
    and where. Exit 4 when anything is found."""
    from broker.core.audit_chain import FindingKind, parse_anchor, verify_records  # noqa: PLC0415

    try:
        anchors = [parse_anchor(a) for a in anchor or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        entries = _remote_records(ctx) if remote else _records(files, stream)
    except TaskleaseError as exc:
        raise _fail(exc) from None
    report = verify_records(
        (record for _, record in entries), anchors=anchors, allow_trimmed_head=allow_trimmed_head
    )
    # A chain that starts after seq 0 on a stream whose head was trimmed (retention_days,
    # maxlen) is what a bounded stream looks like: say so, and which flag accepts it. Trimming
    # removes whole entries, never a seq 0 with another prev_hash: bad_genesis gets no hint.
    hint = None
    if not (files or remote) and any(f.kind is FindingKind.HEAD_MISSING for f in report.findings):
        hint = _trimmed_hint(stream)

    def where(position: int) -> str:
        return entries[position][0] if 0 <= position < len(entries) else "-"

    def detail(finding: Finding) -> str:
        if hint is not None and finding.kind is FindingKind.HEAD_MISSING:
            return f"{finding.detail}; {hint}"
        return finding.detail

    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "writers": [
                        {
                            "writer": w.writer,
                            "records": w.records,
                            "first_seq": w.first_seq,
                            "last_seq": w.last_seq,
                            "last_hash": w.last_hash,
                        }
                        for w in report.writers
                    ],
                    "findings": [
                        {**f.as_dict(), "detail": detail(f), "where": where(f.position)}
                        for f in report.findings
                    ],
                },
                indent=2,
            )
        )
    else:
        typer.echo(f"{report.records} records, {len(report.writers)} writer chain(s)")
        for summary in report.writers:
            typer.echo(
                f"  {summary.writer}: {summary.records} records, seq {summary.first_seq}.."
                f"{summary.last_seq}, head {summary.writer}:{summary.last_seq}:"
                f"{summary.last_hash}"
            )
        for finding in report.findings:
            typer.echo(
                f"{finding.kind.value.upper()} at {where(finding.position)}: writer "
                f"{finding.writer} seq {finding.seq} event {finding.event_id or '-'}: "
                f"{detail(finding)}"
            )
        typer.echo(
            "OK: every chain verifies" if report.ok else f"{len(report.findings)} finding(s)"
        )
    if not report.ok:
        raise typer.Exit(EXIT_TAMPERED)


@audit_app.command("trace")
def audit_trace(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="The workflow run id.")],
    files: _Files = None,
    stream: _Stream = None,
    remote: _Remote = False,
) -> None:
    """The story of a run: owner, who started it, which agent got which credential under
    which decision, approvals, tool calls and side effects, revocations and why."""
    from broker.core.audit_trace import render_trace  # noqa: PLC0415

    try:
        entries = _remote_records(ctx, run=run) if remote else _records(files, stream, run=run)
    except TaskleaseError as exc:
        raise _fail(exc) from None
    records = [r for _, r in entries if isinstance(r, dict)]
    typer.echo(render_trace(records, run), nl=False)


@audit_app.command("tail")
def audit_tail(  # noqa: PLR0917 - typer options
    ctx: typer.Context,
    files: _Files = None,
    stream: _Stream = None,
    remote: _Remote = False,
    since: Annotated[
        str | None,
        typer.Option(help="With --remote: read from this RFC 3339 time (default: 1 hour ago)."),
    ] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, max=10_000)] = 20,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep printing new records (Redis; Ctrl-C stops).")
    ] = False,
    output: Annotated[
        str, typer.Option("--format", help="text, json (the records) or ocsf.")
    ] = "text",
) -> None:
    """The last records of the trail, oldest first."""
    from broker.core.audit_ocsf import to_ocsf  # noqa: PLC0415
    from broker.core.audit_trace import summary_line  # noqa: PLC0415

    if output not in ("text", "json", "ocsf"):
        raise typer.BadParameter("--format is text, json or ocsf")
    if follow and (files or remote):
        raise typer.BadParameter("--follow reads Redis; leave out --file and --remote")

    def show(record: object) -> None:
        if not isinstance(record, dict):
            return
        if output == "json":
            typer.echo(json.dumps(record, sort_keys=True))
        elif output == "ocsf":
            typer.echo(json.dumps(to_ocsf(record), sort_keys=True))
        else:
            typer.echo(summary_line(record))

    try:
        if remote:
            start = since or (datetime.now(UTC) - timedelta(hours=1)).isoformat()
            entries = _remote_records(ctx, since=start)[-count:]
        else:
            entries = _records(files, stream, last=count)
    except TaskleaseError as exc:
        raise _fail(exc) from None
    for _, record in entries:
        show(record)
    if follow:
        last = entries[-1][0] if entries else "$"
        try:
            asyncio.run(_follow(stream, last, show))
        except KeyboardInterrupt:
            return
        except TaskleaseError as exc:
            raise _fail(exc) from None


async def _follow(stream: str | None, after: str, show: Callable[[object], None]) -> None:
    from broker.adapters.audit_redis import RedisAuditReader  # noqa: PLC0415
    from broker.adapters.redis_connection import redis_client  # noqa: PLC0415
    from broker.config import load_settings  # noqa: PLC0415

    settings = load_settings()
    client = redis_client(settings.redis, blocking_reads=True)
    reader = RedisAuditReader(client=client, stream=stream or settings.audit.redis.stream)
    try:
        while True:
            for entry_id, record in await reader.follow(after, block_ms=5000):
                after = entry_id
                show(record)
    finally:
        await client.aclose()
