"""The ``tasklease`` command."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from broker.cli_audit import audit_app
from broker.cli_remote import register as register_remote_commands
from broker.errors import TaskleaseError

app = typer.Typer(
    name="tasklease",
    help="Just-in-time credential broker for AI-agent and machine workflows.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)
_out = Console()

# Exit codes: 0 ok, 1 a tasklease error (message printed), 2 usage (typer), 3 configuration.
EXIT_ERROR = 1
EXIT_CONFIG = 3


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _fail(exc: TaskleaseError) -> typer.Exit:
    # The detail is plain text (it may hold "[policy-id]"), never rich markup.
    _err.print(
        f"[bold red]error[/] ({escape(exc.reason)}): {escape(exc.detail)}",
        highlight=False,
        markup=True,
        soft_wrap=True,
    )
    from broker.errors import ConfigurationError  # noqa: PLC0415

    return typer.Exit(EXIT_CONFIG if isinstance(exc, ConfigurationError) else EXIT_ERROR)


@app.command()
def serve() -> None:
    """Run the broker (HTTPS with its own X.509-SVID) until SIGINT/SIGTERM."""
    from broker.bootstrap import (  # noqa: PLC0415
        configure_logging,
        run_on_event_loop,
        serve_until_signalled,
    )
    from broker.config import load_settings  # noqa: PLC0415

    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        run_on_event_loop(serve_until_signalled(settings), settings.server.event_loop)
    except TaskleaseError as exc:
        raise _fail(exc) from None


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Port for the broker (0 = any free port).")] = 8443,
    stack_only: Annotated[
        bool, typer.Option("--stack-only", help="Start the stack without the broker.")
    ] = False,
) -> None:
    """Start the real local stack (OpenBao, SPIRE, Redis, PostgreSQL) and the broker on it."""
    from broker.bootstrap import (  # noqa: PLC0415
        configure_logging,
        run_on_event_loop,
        serve_until_signalled,
    )
    from broker.config import load_settings  # noqa: PLC0415
    from broker.devstack import DevStack, build_spire  # noqa: PLC0415

    def echo(message: str) -> None:
        _out.print(f"[dim]stack:[/] {message}", highlight=False)

    try:
        build_spire(echo=echo)
        echo("starting OpenBao, SPIRE server and agent, Redis, PostgreSQL…")
        stack = DevStack(echo=echo)
        # Ctrl-C while starting must still stop what was started.
        signal.signal(signal.SIGTERM, _interrupt)
        endpoints = stack.start()
    except TaskleaseError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    try:
        env = {
            "SPIFFE_ENDPOINT_SOCKET": f"unix://{endpoints.spire_agent_socket}",
            "TASKLEASE_SPIFFE__TRUST_DOMAIN": endpoints.trust_domain,
            "TASKLEASE_SPIFFE__WORKLOAD_API_SOCKET": f"unix://{endpoints.spire_agent_socket}",
            # The broker reaches OpenBao over TLS, as it would anywhere else.
            "TASKLEASE_VAULT__ADDR": endpoints.openbao_tls_addr,
            "TASKLEASE_VAULT__CA_FILE": endpoints.openbao_ca_file,
            "TASKLEASE_REDIS__URL": endpoints.redis_url,
            "TASKLEASE_SERVER__PORT": str(port),
        }
        os.environ.update(env)
        _out.print("\n[bold]tasklease dev stack[/]")
        for name, where in [
            ("OpenBao (the broker's)", endpoints.openbao_tls_addr),
            ("OpenBao's CA", endpoints.openbao_ca_file),
            ("OpenBao, plain HTTP", endpoints.openbao_addr),
            ("Redis", f"127.0.0.1:{endpoints.redis_port} (AOF fsync always, noeviction)"),
            ("PostgreSQL", f"127.0.0.1:{endpoints.postgres_port} (database demo)"),
            ("SPIRE server", endpoints.spire_server_socket),
            ("SPIRE agent (Workload API)", endpoints.spire_agent_socket),
            ("Trust domain", endpoints.trust_domain),
            ("Logs", f"{endpoints.runtime_dir}/logs"),
            ("Secrets (0600)", f"{endpoints.runtime_dir}/stack.json"),
        ]:
            _out.print(f"  {name:<28} {where}", highlight=False)
        if stack_only:
            _out.print("\nStack only. Stop with Ctrl-C.")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return
        settings = load_settings()
        configure_logging(settings.log_level)

        def ready(broker: object) -> None:
            url = getattr(broker, "url", "")
            _out.print(f"  {'Broker (HTTPS, own SVID)':<28} {url}", highlight=False)
            _out.print(f"  {'Broker identity':<28} {endpoints.broker_spiffe_id}", highlight=False)
            _out.print(f"\nReady: curl -k {url}/readyz   Stop with Ctrl-C.\n", highlight=False)

        run_on_event_loop(
            serve_until_signalled(settings, on_ready=ready), settings.server.event_loop
        )
    except TaskleaseError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        pass
    finally:
        _out.print("stopping the stack…")
        stack.stop()


@app.command()
def demo(
    logs: Annotated[
        Path | None,
        typer.Option(
            "--logs",
            file_okay=False,
            help="Copy the stack's and the broker's logs into this directory at the end.",
        ),
    ] = None,
) -> None:
    """Narrate one workflow run on a fresh local stack, step by step (broker/demo.py).

    Starts its own stack and broker in a temporary directory and removes them at the end.
    Exit 0 when every step behaved as narrated, 1 when one did not (the step is named)."""
    from broker.demo import demo_on_fresh_stack  # noqa: PLC0415

    # Ctrl-C or SIGTERM, also while the stack starts, still stops what was started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo_on_fresh_stack(console=_out, logs=logs)
    except TaskleaseError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        _err.print("interrupted: the demo's stack was stopped and removed")
        raise typer.Exit(130) from None


policy_app = typer.Typer(
    help="Check the Cedar policy set: validate it, run its declarative test cases.",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")

_PolicyDir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Policy directory (*.cedar + schema.cedarschema); default: the policy_dir setting.",
    ),
]


def _policy_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    from broker.config import load_settings  # noqa: PLC0415

    return load_settings().policy_dir


@policy_app.command("validate")
def policy_validate(
    policy_dir: _PolicyDir = None,
    targets: Annotated[
        Path | None,
        typer.Option(
            help="Also validate this targets catalog (default: with no --dir, the "
            "targets_file setting)."
        ),
    ] = None,
) -> None:
    """Parse the policy set and validate it against its schema (exit 0 valid, 3 invalid)."""
    from broker.adapters.config_files import read_policy_dir, read_targets_file  # noqa: PLC0415

    try:
        directory = _policy_dir(policy_dir)
        files = read_policy_dir(directory)
        engine = files.engine()
        _out.print(
            f"[green]valid[/]: {len(engine.policies)} policies in {len(files.policies)} files "
            f"of {directory}, against {files.schema_source} (sha256 {files.digest[:12]})",
            highlight=False,
            soft_wrap=True,
        )
        for info in engine.policies:
            notes = [info.effect]
            if info.approval_gate:
                notes.append("approval gate")
            if info.max_ttl is not None:
                notes.append(f"max_ttl {int(info.max_ttl.total_seconds())}s")
            _out.print(
                f"  {Path(info.source).name}: {info.id} ({', '.join(notes)})",
                highlight=False,
                soft_wrap=True,
            )
        if targets is None and policy_dir is None:
            from broker.config import load_settings  # noqa: PLC0415

            targets = load_settings().targets_file
        if targets is not None:
            catalog = read_targets_file(targets)
            _out.print(
                f"[green]valid[/]: {len(catalog.catalog)} targets in {targets} "
                f"(sha256 {catalog.digest[:12]})",
                highlight=False,
                soft_wrap=True,
            )
    except TaskleaseError as exc:
        raise _fail(exc) from None


@policy_app.command("test")
def policy_test(
    policy_dir: _PolicyDir = None,
    cases: Annotated[
        Path | None,
        typer.Option(help="Directory of *.toml cases (default: <policy dir>/tests)."),
    ] = None,
) -> None:
    """Run the declarative cases (request → expected decision); exit 0 when all pass, 1 when
    one fails, 3 when the policy set or a case file is invalid."""
    from broker.policy_cases import CASES_DIR, load_cases, run_cases  # noqa: PLC0415

    try:
        directory = _policy_dir(policy_dir)
        run = run_cases(directory, load_cases(cases or directory / CASES_DIR))
    except TaskleaseError as exc:
        raise _fail(exc) from None
    current = ""
    for result in run.results:
        if result.case.source != current:
            current = result.case.source
            _out.print(current, highlight=False, soft_wrap=True)
        mark = "[green]pass[/]" if result.passed else "[bold red]FAIL[/]"
        _out.print(f"  {mark} {result.case.name}", highlight=False, soft_wrap=True)
        for problem in result.problems:
            _out.print(f"       {problem}", highlight=False, soft_wrap=True, markup=False)
    failed = len(run.failed)
    summary = f"{len(run.results) - failed} passed, {failed} failed"
    if failed:
        _err.print(f"[bold red]{summary}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_ERROR)
    _out.print(f"[green]{summary}[/]", highlight=False, soft_wrap=True)


# `tasklease audit verify|trace|tail` (broker/cli_audit.py).
app.add_typer(audit_app, name="audit")


# `tasklease targets|leases|revoke|quarantine|approvals` and the connection options
# (broker/cli_remote.py).
register_remote_commands(app)


def main() -> None:
    """Entry point of the ``tasklease`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
