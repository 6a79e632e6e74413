"""The ``tasklease`` command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Annotated

import typer
from rich.console import Console

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
    _err.print(f"[bold red]error[/] ({exc.reason}): {exc.detail}", highlight=False, markup=True)
    from broker.errors import ConfigurationError  # noqa: PLC0415

    return typer.Exit(EXIT_CONFIG if isinstance(exc, ConfigurationError) else EXIT_ERROR)


@app.command()
def serve() -> None:
    """Run the broker (HTTPS with its own X.509-SVID) until SIGINT/SIGTERM."""
    from broker.bootstrap import configure_logging, serve_until_signalled  # noqa: PLC0415
    from broker.config import load_settings  # noqa: PLC0415

    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        asyncio.run(serve_until_signalled(settings))
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
    from broker.bootstrap import configure_logging, serve_until_signalled  # noqa: PLC0415
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
            "TASKLEASE_VAULT__ADDR": endpoints.openbao_addr,
            "TASKLEASE_REDIS__URL": endpoints.redis_url,
            "TASKLEASE_SERVER__PORT": str(port),
        }
        os.environ.update(env)
        _out.print("\n[bold]tasklease dev stack[/]")
        for name, where in [
            ("OpenBao", endpoints.openbao_addr),
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

        asyncio.run(serve_until_signalled(settings, on_ready=ready))
    except TaskleaseError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        pass
    finally:
        _out.print("stopping the stack…")
        stack.stop()


def main() -> None:
    """Entry point of the ``tasklease`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
