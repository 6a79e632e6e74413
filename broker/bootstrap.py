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
import tomllib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from broker.adapters.audit_redis import RedisAuditReader, RedisStreamAuditSink, run_copy_ttl
from broker.adapters.audit_sinks import AuditSink, JsonlFileAuditSink, StructlogAuditSink
from broker.adapters.audit_trail import AuditReadiness, ChainingAuditTrail
from broker.adapters.bundle_sources import (
    FederationEndpointSource,
    StaticBundleFile,
    WorkloadApiBundleFeed,
)
from broker.adapters.clock import SystemClock
from broker.adapters.kinds import all_kinds
from broker.adapters.metrics_sources import (
    RetentionCollector,
    register_metrics_sources,
    watch_redis_memory,
)
from broker.adapters.oidc_jwks import OidcJwksSource
from broker.adapters.redis_approvals import RedisApprovalStore
from broker.adapters.redis_ledger import RedisLedger, RedisReadiness
from broker.adapters.redis_reevaluation import (
    RedisPendingScopeRecords,
    RedisReevaluationMarkers,
)
from broker.adapters.redis_webhook_outbox import RedisWebhookOutbox
from broker.adapters.scheduler import RevocationSweeper
from broker.adapters.tls import RotatingServerTls, build_server_context
from broker.adapters.vault import HvacVault, VaultMinter, VaultReadiness
from broker.adapters.webhook_notifier import WebhookNotifier
from broker.adapters.workload_api import WorkloadApiReadiness, WorkloadApiSource
from broker.approvals import Approvals
from broker.audit import AuditService, new_event_id
from broker.config import AuditSettings, PolicySettings, RevocationConfig, Settings
from broker.continuous import (
    ApprovalStoreStates,
    ContinuousAuthorizer,
    ContinuousMetrics,
    ContinuousReadiness,
    DecisionInputs,
    ReevaluatingQuarantines,
    ReevaluatingWithdrawals,
)
from broker.core.authn import CallerAuthenticator
from broker.core.bundle import TrustStore
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.oidc import OidcIssuerConfig, OidcVerifier, parse_oidc_issuers
from broker.core.policy import WorkingHours
from broker.core.roles import RoleMap, parse_role_map
from broker.core.spiffe_id import TrustDomain
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import ConfigurationError, TaskleaseError
from broker.http.app import create_app
from broker.http.approval_routes import register_approval_routes
from broker.http.audit_rejections import RejectionAuditor
from broker.http.audit_routes import register_audit_routes
from broker.http.metrics_routes import register_metrics_routes
from broker.http.openapi import register_openapi_route
from broker.http.query_routes import register_query_routes
from broker.http.report_routes import register_report_routes
from broker.http.revocation_routes import register_revocation_routes
from broker.legacy import LegacyReporter
from broker.metrics import BrokerMetrics, CountingPolicyEngine
from broker.policy_reload import PolicyReadiness, PolicyReloader
from broker.reconciler import Reconciler
from broker.retention import RunRetentionJob
from broker.revocation import RevocationMetrics, RevocationSettings, Revoker
from broker.service import CredentialBroker, Readiness
from broker.superseded import SupersededInputsWatch, SupersededReadiness

_T = TypeVar("_T")
_log = structlog.get_logger("broker")


def log_processors() -> list[structlog.typing.Processor]:
    """The broker's structlog chain: context, level, UTC ISO time, exceptions, sorted JSON."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(sort_keys=True),
    ]


class _JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's records (APScheduler, aiohttp, …) as the same JSON lines."""


def configure_logging(level: str = "info") -> None:
    """structlog JSON lines on stdout; the standard library's records go the same way, one
    JSON object per line with ``event`` (the message), ``level``, ``logger`` and
    ``timestamp``, so every line the broker prints parses as JSON."""
    numeric = logging.getLevelName(level.upper())
    handler = _JsonLinesHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=True),
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _JsonLinesHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(numeric)
    structlog.configure(
        processors=log_processors(),
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
    minter: VaultMinter
    revoker: Revoker
    sweeper: RevocationSweeper
    trust_store: TrustStore
    http_session: aiohttp.ClientSession
    # Hot reload of policies and targets; re-evaluation of live leases (continuous authz).
    reloader: PolicyReloader | None = None
    continuous: ContinuousAuthorizer | None = None
    # The audit trail: closed after background work stops (it delivers what is queued) and
    # before the ledger (its Redis sink shares the ledger's connections).
    audit: ChainingAuditTrail | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` until :meth:`close`."""
        self._tasks.append(asyncio.create_task(work))

    async def close(self) -> None:
        """Stop background work and close every connection."""
        pending = {task for task in self._tasks if not task.done()}
        # A library may swallow one cancellation (a client cleaning up a cancelled command);
        # cancel again until every task has ended, and never wait forever on one.
        for _ in range(5):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            _log.error("runtime.task_did_not_stop", task=task.get_name())
        if self.reloader is not None:
            await self.reloader.close()
        if self.continuous is not None:
            await self.continuous.close()
        if self.audit is not None:
            await self.audit.close()
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                _log.error(
                    "runtime.task_failed",
                    task=task.get_name(),
                    error=type(task.exception()).__name__,
                )
        await self.http_session.close()
        await self.minter.close()
        await self.ledger.close()
        self.vault.close()
        self.workload.close()


def _server_context(workload: WorkloadApiSource, store: TrustStore) -> ssl.SSLContext:
    svid = workload.own_svid()
    return build_server_context(
        chain=svid.chain, private_key=svid.private_key, client_roots=_all_roots(store)
    )


def _all_roots(store: TrustStore) -> list[x509.Certificate]:
    # The TLS layer only checks proof of possession and that *some* trusted root signed the
    # chain; the per-trust-domain verification happens in TrustStoreX509Authenticator.
    roots: list[x509.Certificate] = []
    for trust_domain in sorted(store.trust_domains, key=lambda td: td.name):
        with contextlib.suppress(TaskleaseError):
            roots.extend(store.bundle_for(trust_domain, datetime.now(UTC)).x509_authorities)
    return roots


async def _follow_roots(
    tls: RotatingServerTls, workload: WorkloadApiSource, store: TrustStore
) -> None:
    """Rebuild the TLS context when the set of trusted roots changes (federation refreshes)."""
    current = {cert.fingerprint(hashes.SHA256()) for cert in _all_roots(store)}
    while True:
        await asyncio.sleep(5)
        roots = {cert.fingerprint(hashes.SHA256()) for cert in _all_roots(store)}
        if roots != current:
            tls.replace(_server_context(workload, store))
            current = roots
            _log.info("tls.client_roots_changed", roots=len(roots))


def _identities(path: Path) -> tuple[RoleMap, list[OidcIssuerConfig]]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(
            f"identities_file {str(path)!r} cannot be read: {type(exc).__name__}: {exc}"
        ) from None
    roles = parse_role_map({k: v for k, v in data.items() if k != "oidc_issuer"})
    return roles, parse_oidc_issuers(data.get("oidc_issuer", []))


def _working_hours(config: PolicySettings) -> WorkingHours:
    try:
        return WorkingHours(
            start_hour_utc=config.working_hours_start_utc,
            end_hour_utc=config.working_hours_end_utc,
            days=frozenset(config.working_days),
        )
    except ValueError as exc:
        raise ConfigurationError(f"invalid [policy] settings: {exc}") from None


async def _audit_trail(
    config: AuditSettings, ledger: RedisLedger, clock: SystemClock
) -> tuple[ChainingAuditTrail, RedisAuditReader | None]:
    """The audit trail with the configured sinks (each probed: a durable sink that cannot take
    records stops start-up), and the reader of its Redis stream (None without one)."""
    sinks: list[AuditSink] = []
    if config.stdout.enabled:
        sinks.append(StructlogAuditSink(durable=config.stdout.durable))
    if config.file.path:
        sinks.append(
            JsonlFileAuditSink(
                path=Path(config.file.path), fsync=config.file.fsync, durable=config.file.durable
            )
        )
    reader = None
    if config.redis.enabled:
        stream_sink = RedisStreamAuditSink(
            client=ledger.client,
            stream=config.redis.stream,
            durable=config.redis.durable,
            maxlen=config.redis.maxlen,
            retention=timedelta(days=config.redis.retention_days),  # 0: kept forever
            index_ttl=timedelta(days=config.redis.index_ttl_days),
            now=clock.now,
        )
        sinks.append(stream_sink)
        reader = RedisAuditReader(client=ledger.client, stream=config.redis.stream)
        _log.info(
            "audit.redis.configured",
            stream=config.redis.stream,
            keeps=stream_sink.bounds,
            retention_days=config.redis.retention_days,
            maxlen=config.redis.maxlen,
            run_ttl_days=stream_sink.run_ttl.days,
        )
    for sink in sinks:
        if sink.durable:
            await sink.probe()
    trail = ChainingAuditTrail(
        sinks=sinks,
        writer_id=config.writer_id or None,
        batch_max=config.batch_max,
        queue_size=config.queue_size,
        record_timeout_seconds=config.record_timeout_seconds,
    )
    if not any(sink.durable for sink in sinks):
        _log.warning("audit.insecure_no_durable_sink", sinks=[sink.name for sink in sinks])
    _log.info(
        "audit.trail",
        writer=trail.writer,
        sinks=[f"{sink.name}{' (durable)' if sink.durable else ''}" for sink in sinks],
    )
    return trail, reader


def _revocation_settings(config: RevocationConfig) -> RevocationSettings:
    try:
        return RevocationSettings(
            max_attempts=config.max_attempts,
            backoff_base=timedelta(seconds=config.backoff_base_seconds),
            backoff_cap=timedelta(seconds=config.backoff_cap_seconds),
            failed_retry_interval=timedelta(seconds=config.failed_retry_interval_seconds),
            sweep_batch=config.sweep_batch,
            visibility=timedelta(seconds=config.visibility_seconds),
            concurrency=config.concurrency,
            revoke_timeout=timedelta(seconds=config.revoke_timeout_seconds),
        )
    except ValueError as exc:
        raise ConfigurationError(f"invalid [revocation] settings: {exc}") from None


def _bundle_sources(
    settings: Settings, store: TrustStore, clock: SystemClock
) -> tuple[list[StaticBundleFile], list[FederationEndpointSource]]:
    files: list[StaticBundleFile] = []
    endpoints: list[FederationEndpointSource] = []
    for entry in settings.spiffe.federation:
        trust_domain = TrustDomain(entry.trust_domain)
        if entry.bundle_file:
            source = StaticBundleFile(
                trust_domain=trust_domain, path=Path(entry.bundle_file), store=store, now=clock.now
            )
            source.load()
            files.append(source)
        else:
            context = None
            if entry.endpoint_ca_file:
                context = ssl.create_default_context(cafile=entry.endpoint_ca_file)
            endpoints.append(
                FederationEndpointSource(
                    trust_domain=trust_domain,
                    url=entry.endpoint_url,
                    store=store,
                    now=clock.now,
                    ssl_context=context,
                )
            )
    return files, endpoints


async def build_runtime(
    settings: Settings, *, revocation: RevocationSettings | None = None
) -> BrokerRuntime:
    """Connect every adapter and build the app; raise a TaskleaseError if a part is unfit."""
    clock = SystemClock()
    roles, oidc_issuers = _identities(settings.identities_file)
    # Policies and targets are parsed and validated before anything connects: a bad policy
    # or catalog stops start-up with the file and the problem. Later changes are hot-reloaded
    # (an invalid one keeps the set in force and raises an alarm on /readyz).
    reloader = PolicyReloader.load(
        policy_dir=settings.policy_dir,
        targets_file=settings.targets_file,
        hours=_working_hours(settings.policy),
        clock=clock,
    )
    policy = reloader.policy
    targets = reloader.targets
    oidc = OidcVerifier(issuers=oidc_issuers) if oidc_issuers else None
    spiffe = settings.spiffe
    store = TrustStore(
        max_staleness=timedelta(seconds=spiffe.bundle_max_age_seconds),
        max_staleness_for={
            TrustDomain(f.trust_domain): timedelta(seconds=f.max_age_seconds)
            for f in spiffe.federation
            if f.max_age_seconds is not None
        },
    )
    workload = WorkloadApiSource(socket_path=spiffe.workload_api_socket)
    await workload.start()
    ledger: RedisLedger | None = None
    vault: HvacVault | None = None
    http_session: aiohttp.ClientSession | None = None
    try:
        WorkloadApiBundleFeed(source=workload, store=store, now=clock.now).start()
        bundle_files, bundle_endpoints = _bundle_sources(settings, store, clock)
        http_session = aiohttp.ClientSession()
        for endpoint in bundle_endpoints:
            # The first fetch happens before serving: a federated domain is trusted from start.
            with contextlib.suppress(TaskleaseError):
                await endpoint.refresh_once(http_session)
        tls = RotatingServerTls(_server_context(workload, store))
        rotate: Callable[[], None] = lambda: tls.replace(_server_context(workload, store))  # noqa: E731
        workload.subscribe(rotate)
        authenticator = CallerAuthenticator(
            x509_svids=TrustStoreX509Authenticator(
                trust_store=store,
                max_chain_depth=spiffe.max_chain_depth,
                skew=timedelta(seconds=spiffe.x509_clock_skew_seconds),
            ),
            jwt_svids=JwtSvidVerifier(
                audience=spiffe.jwt_audience,
                trust_store=store,
                max_lifetime=timedelta(seconds=spiffe.jwt_max_lifetime_seconds),
                leeway=timedelta(seconds=spiffe.jwt_leeway_seconds),
            ),
            oidc=oidc,
            roles=roles,
        )
        jwks_sources = [
            OidcJwksSource(
                config=config,
                verifier=oidc,
                now=clock.now,
                session=http_session,
                base_dir=settings.identities_file.parent,
            )
            for config in oidc_issuers
            if oidc is not None
        ]
        for jwks in jwks_sources:
            # Keys before serving; a failure here leaves that issuer failing closed (503)
            # until a refresh succeeds.
            try:
                await jwks.refresh_once()
            except TaskleaseError as exc:
                _log.error("oidc.jwks_failed", issuer=jwks.location, reason=exc.reason)

        ledger = RedisLedger(settings=settings.redis)
        await ledger.ping()
        durability = await ledger.check_durability()
        if durability.problems:
            _log.warning("redis.degraded_durability", problems=durability.problems)

        if settings.vault.plain_http_off_loopback:
            # vault.insecure_allow_plain_http: config refuses this otherwise.
            _log.warning("vault.insecure_plain_http", addr=settings.vault.addr)
        vault = HvacVault(settings=settings.vault, jwt_svid=workload.fetch_jwt_svid, now=clock.now)
        session = await vault.login()
        minter = VaultMinter(vault=vault, kinds=all_kinds(), now=clock.now)
        await minter.check_task_token_role()
        _log.info(
            "vault.session",
            accessor=session.accessor,
            policies=list(session.policies),
            expires_at=session.expires_at.isoformat(),
        )
        if "default" in session.policies:
            # Not unsafe, but more than the broker needs, and costly: OpenBao evaluates the
            # templated `default` policy on every call the broker makes (about 2 ms of its CPU
            # per task token creation).
            _log.warning(
                "vault.session_has_default_policy",
                hint="set token_no_default_policy=true on the broker's OpenBao role; "
                "its own policy grants what it uses (config/dev/openbao/policies/"
                "tasklease-broker.hcl)",
            )
        audit_trail, audit_reader = await _audit_trail(settings.audit, ledger, clock)
        continuous_readiness = ContinuousReadiness()  # attached once the authorizer exists
        # One registry for the whole process, served at /metrics (broker/metrics.py).
        metrics = BrokerMetrics()
        # The digest of the decision inputs last applied to every live lease, next to the
        # ledger: a change made while no broker ran is applied at start-up, and a replica the
        # fleet has moved past stops issuing (broker/superseded.py).
        markers = RedisReevaluationMarkers(client=ledger.client, namespace=ledger.namespace)
        inputs = DecisionInputs(reloader, roles)
        superseded = SupersededInputsWatch(
            markers=markers, inputs=inputs, clock=clock, registry=metrics.registry
        )
        readiness = Readiness(
            checks=[
                RedisReadiness(ledger),
                VaultReadiness(vault),
                WorkloadApiReadiness(
                    workload, max_age_seconds=settings.spiffe.bundle_max_age_seconds
                ),
                PolicyReadiness(reloader),
                SupersededReadiness(superseded),
                AuditReadiness(audit_trail),
                continuous_readiness,
            ],
            clock=clock,
            timeout_seconds=settings.server.readiness_timeout_seconds,
        )
        reloader.metrics.register(metrics.registry)
        audit_trail.metrics.register(metrics.registry)
        quarantines = ReevaluatingQuarantines(store=ledger)
        approval_store = RedisApprovalStore(
            client=ledger.client,
            namespace=ledger.namespace,
            retention=timedelta(seconds=settings.approvals.retention_seconds),
        )
        notifier = (
            WebhookNotifier.from_settings(
                settings.notifications,
                now=clock.now,
                # Durable: a queued notification outlives this process (at least once); this
                # process reads as its own consumer (host-pid-random).
                outbox=RedisWebhookOutbox(
                    client=ledger.client,
                    namespace=ledger.namespace,
                    max_backlog=settings.notifications.queue_size,
                    visibility=timedelta(seconds=settings.notifications.visibility_seconds),
                    # A blocking read must end before the client's socket timeout.
                    block=timedelta(seconds=min(1.0, settings.redis.socket_timeout_seconds / 2)),
                ),
            )
            if settings.notifications.webhook_urls
            else None
        )
        approvals = Approvals(
            store=approval_store,
            audit=audit_trail,
            clock=clock,
            validity=timedelta(seconds=settings.approvals.ttl_seconds),
            notifier=notifier,
        )
        broker = CredentialBroker(
            policy=CountingPolicyEngine(policy, metrics=metrics),
            minter=minter,
            ledger=ledger,
            targets=targets,
            clock=clock,
            quarantines=quarantines,
            approvals=approvals,
            audit=audit_trail,
            live_limit_per_identity=settings.issuance.live_credentials_per_identity,
            issuance_rate_per_identity=settings.issuance.credentials_per_identity_per_minute,
            run_rate_per_identity=settings.issuance.runs_per_identity_per_minute,
            refuse_if_superseded=superseded.refuse_if_superseded,
        )
        app = create_app(
            readiness=readiness,
            authenticator=authenticator,
            now=clock.now,
            broker=broker,
            clock=clock,
            rejections=RejectionAuditor(
                audit=audit_trail,
                now=clock.now,
                per_second=settings.audit.identity_rejected_per_second,
                new_id=new_event_id,
            ),
            trust_store=store,
        )
        revoker = Revoker(
            ledger=ledger,
            minter=minter,
            clock=clock,
            settings=revocation or _revocation_settings(settings.revocation),
            metrics=RevocationMetrics(metrics.registry),
            audit=audit_trail,
            audit_actor=workload.own_svid().spiffe_id,
        )
        register_revocation_routes(app, revoker)
        register_query_routes(app)
        register_report_routes(
            app,
            LegacyReporter(
                ledger=ledger,
                targets=lambda: broker.targets,  # the catalog in force (hot reloads)
                clock=clock,
                ledger_retention=timedelta(days=settings.ledger.retention_days),
            ),
        )
        register_audit_routes(
            app,
            AuditService(
                ledger=ledger,
                audit=audit_trail,
                clock=clock,
                reader=audit_reader,
                report_grace=timedelta(seconds=settings.audit.report_grace_seconds),
            ),
        )
        register_approval_routes(app, approvals, clock)
        register_openapi_route(app)
        continuous = ContinuousAuthorizer(
            ledger=ledger,
            policy=policy,
            targets=targets,
            roles=roles,
            revoker=revoker,
            clock=clock,
            audit=audit_trail,
            quarantines=ledger,
            approvals=ApprovalStoreStates(approval_store),
            actor=workload.own_svid().spiffe_id,
            metrics=ContinuousMetrics(metrics.registry),
            markers=markers,
            inputs=inputs,
            writer=audit_trail.writer,
            retry_base=timedelta(seconds=settings.policy.reevaluation_retry_base_seconds),
            retry_cap=timedelta(seconds=settings.policy.reevaluation_retry_cap_seconds),
            # Withdrawn approvals' re-evaluations not yet completed (resumed at start-up).
            pending=RedisPendingScopeRecords(client=ledger.client, namespace=ledger.namespace),
            # Once replicas on the previous inputs have seen the marker (and stopped issuing),
            # the credentials issued since the re-evaluation began are decided again.
            follow_up_after=timedelta(seconds=2 * settings.policy.superseded_check_seconds + 10),
        )
        continuous_readiness.attach(continuous)
        reloader.listen(continuous)
        # A used approval's re-evaluation is noted before its withdrawal is stored, and its
        # credential decided once it is (waiting for the first attempt; retried after).
        approvals.set_withdrawal_hook(ReevaluatingWithdrawals(continuous))
        metrics.watch_pending_approvals(approvals.pending_count)
        quarantines.attach(continuous)
        sweeper = RevocationSweeper(
            sweep=revoker.revoke_due,
            clock=clock,
            interval=timedelta(seconds=settings.revocation.sweep_interval_seconds),
        )
        register_metrics_routes(app, metrics, targets=lambda: broker.targets)
        register_metrics_sources(
            metrics,
            clock=clock,
            trust_store=store,
            vault=vault,
            sweeper=sweeper,
            ledger=ledger,
            webhooks=(lambda: notifier.stats) if notifier is not None else None,
        )
        watch_redis_memory(metrics, ledger)
    except BaseException:
        if http_session is not None:
            await http_session.close()
        if ledger is not None:
            await ledger.close()
        if vault is not None:
            vault.close()
        workload.close()
        raise
    runtime = BrokerRuntime(
        settings=settings,
        app=app,
        tls=tls,
        workload=workload,
        vault=vault,
        ledger=ledger,
        minter=minter,
        revoker=revoker,
        sweeper=sweeper,
        trust_store=store,
        http_session=http_session,
        reloader=reloader,
        continuous=continuous,
        audit=audit_trail,
    )
    runtime.start_background(
        reloader.run(interval=timedelta(seconds=settings.policy.reload_interval_seconds))
    )
    runtime.start_background(
        superseded.run(interval=timedelta(seconds=settings.policy.superseded_check_seconds))
    )
    # Policies or targets edited while no broker ran: decide every live lease again (in the
    # background, retried) unless the stored digest says the inputs in force were applied.
    continuous.reevaluate_if_inputs_changed()
    # A quarantine's re-evaluation cut short by a stop still revokes what it covers.
    continuous.reapply_quarantines()
    # So does a withdrawn approval's (its pending record outlives the process that noted it).
    continuous.resume_pending()
    runtime.start_background(vault.keep_session())
    runtime.start_background(sweeper.run())
    if notifier is not None:
        runtime.start_background(notifier.run())
    reconciler = Reconciler(
        inventory=minter,
        minter=minter,
        ledger=ledger,
        locks=ledger,
        clock=clock,
        grace=timedelta(seconds=settings.vault.reconcile_grace_seconds),
        lock_ttl=timedelta(seconds=settings.vault.reconcile_lock_ttl_seconds),
    )
    runtime.start_background(
        reconciler.run(interval=timedelta(seconds=settings.vault.reconcile_interval_seconds))
    )
    if settings.ledger.retention_days > 0:
        retention = RunRetentionJob(
            ledger=ledger,
            locks=ledger,
            audit=audit_trail,
            clock=clock,
            actor=str(workload.own_svid().spiffe_id),
            retention=timedelta(days=settings.ledger.retention_days),
            batch=settings.ledger.purge_batch,
            # As long as the audit stream keeps the purged run's copy (its last write is the
            # workflow.purged record): a run id names one run while the trail shows it.
            retire_ids_for=run_copy_ttl(
                timedelta(days=settings.audit.redis.index_ttl_days),
                timedelta(days=settings.audit.redis.retention_days),
            ),
        )
        metrics.registry.register(RetentionCollector(retention))
        runtime.start_background(
            retention.run(interval=timedelta(seconds=settings.ledger.purge_interval_seconds))
        )
    runtime.start_background(_follow_roots(tls, workload, store))
    for bundle_file in bundle_files:
        runtime.start_background(bundle_file.run())
    for endpoint in bundle_endpoints:
        runtime.start_background(endpoint.run(http_session))
    for jwks in jwks_sources:
        runtime.start_background(jwks.run())
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
    _log.info(
        "broker.listening",
        url=f"https://{settings.server.host}:{port}",
        event_loop=running_loop_name(),
    )
    return RunningBroker(runtime=runtime, runner=runner, port=port)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop this code runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"


def run_on_event_loop(main: Coroutine[Any, Any, _T], event_loop: str) -> _T:
    """Run ``main`` to completion on the event loop ``server.event_loop`` names."""
    if event_loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only the server processes need it

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


async def serve_until_signalled(
    settings: Settings, *, on_ready: Callable[[RunningBroker], None] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    broker = await start_broker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if broker.runtime.reloader is not None:
        # SIGHUP: reload policies and targets now (validated first; invalid keeps the old).
        loop.add_signal_handler(signal.SIGHUP, broker.runtime.reloader.request_reload)
    try:
        if on_ready is not None:
            on_ready(broker)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await broker.stop()
