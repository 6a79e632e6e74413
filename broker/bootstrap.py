"""The single composition root: settings → adapters → service → app.

Only this module knows every concrete class. Start-up fails closed: no Workload API SVID,
a Redis that could lose lease records, or no OpenBao session → the broker does not start,
with an error that says which and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from broker.adapters.clock import SystemClock
from broker.adapters.redis_ledger import RedisLedger, RedisReadiness
from broker.adapters.tls import RotatingServerTls, build_server_context
from broker.adapters.vault import HvacVault, VaultReadiness
from broker.adapters.workload_api import WorkloadApiReadiness, WorkloadApiSource
from broker.config import Settings
from broker.http.app import create_app
from broker.service import Readiness

_log = structlog.get_logger("broker")


def configure_logging(level: str = "info") -> None:
    """structlog JSON lines on stdout; the standard library's records go the same way."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, stream=sys.stdout, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


@dataclass
class BrokerRuntime:
    """Everything a running broker holds; :meth:`close` releases it in reverse order."""

    settings: Settings
    app: web.Application
    tls: RotatingServerTls
    workload: WorkloadApiSource
    vault: HvacVault
    ledger: RedisLedger
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        """Stop background work and close every connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.ledger.close()
        self.vault.close()
        self.workload.close()


def _server_context(workload: WorkloadApiSource) -> ssl.SSLContext:
    svid = workload.own_svid()
    bundles = workload.bundles()
    roots = [cert for certs in bundles.x509_authorities.values() for cert in certs]
    return build_server_context(chain=svid.chain, private_key=svid.private_key, client_roots=roots)


async def build_runtime(settings: Settings) -> BrokerRuntime:
    """Connect every adapter and build the app; raise a TaskleaseError if a part is unfit."""
    clock = SystemClock()
    workload = WorkloadApiSource(socket_path=settings.spiffe.workload_api_socket)
    await workload.start()
    ledger: RedisLedger | None = None
    vault: HvacVault | None = None
    try:
        tls = RotatingServerTls(_server_context(workload))
        rotate: Callable[[], None] = lambda: tls.replace(_server_context(workload))  # noqa: E731
        workload.subscribe(rotate)

        ledger = RedisLedger(settings=settings.redis)
        await ledger.ping()
        durability = await ledger.check_durability()
        if durability.problems:
            _log.warning("redis.degraded_durability", problems=durability.problems)

        vault = HvacVault(settings=settings.vault, jwt_svid=workload.fetch_jwt_svid, now=clock.now)
        session = await vault.login()
        _log.info(
            "vault.session",
            accessor=session.accessor,
            policies=list(session.policies),
            expires_at=session.expires_at.isoformat(),
        )
        readiness = Readiness(
            checks=[
                RedisReadiness(ledger),
                VaultReadiness(vault),
                WorkloadApiReadiness(
                    workload, max_age_seconds=settings.spiffe.bundle_max_age_seconds
                ),
            ],
            clock=clock,
            timeout_seconds=settings.server.readiness_timeout_seconds,
        )
        app = create_app(readiness=readiness)
    except BaseException:
        if ledger is not None:
            await ledger.close()
        if vault is not None:
            vault.close()
        workload.close()
        raise
    runtime = BrokerRuntime(
        settings=settings, app=app, tls=tls, workload=workload, vault=vault, ledger=ledger
    )
    runtime._tasks.append(asyncio.create_task(vault.keep_session()))
    return runtime


@dataclass
class RunningBroker:
    """A broker listening on a socket (from :func:`start_broker`)."""

    runtime: BrokerRuntime
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        """Base URL of the broker."""
        return f"https://{self.runtime.settings.server.host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening and release everything."""
        await self.runner.cleanup()
        await self.runtime.close()


async def start_broker(settings: Settings) -> RunningBroker:
    """Build the runtime and start serving HTTPS on ``settings.server``."""
    runtime = await build_runtime(settings)
    runner = web.AppRunner(runtime.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.server.host,
        settings.server.port,
        ssl_context=runtime.tls.listener_context,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await runtime.close()
        raise
    # aiohttp exposes the bound port (needed for port 0) only through the site's server.
    sockets = getattr(site._server, "sockets", None) or ()
    port = sockets[0].getsockname()[1] if sockets else settings.server.port
    _log.info("broker.listening", url=f"https://{settings.server.host}:{port}")
    return RunningBroker(runtime=runtime, runner=runner, port=port)


async def serve_until_signalled(
    settings: Settings, *, on_ready: Callable[[RunningBroker], None] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    broker = await start_broker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_ready is not None:
            on_ready(broker)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await broker.stop()
