"""The broker's Prometheus metrics: one registry per broker process, and the pieces that feed
it without touching the use cases.

``GET /metrics`` (:mod:`broker.http.metrics_routes`) serves the registry in the Prometheus text
format, **without authentication**, like ``/healthz`` and ``/readyz``: a scraper should not
need a role that can also revoke or approve, and nothing here identifies anyone. Every label
is a closed set chosen by the broker — a target kind, an outcome or stable reason code, a
policy decision, a claim state, a trust domain name — never a SPIFFE ID, a credential id, a
token accessor, or anything a caller sent.

What feeds it, by kind of source:

* **events** — counters and histograms updated where things happen, from the outside of the
  use cases: the issuance middleware (:mod:`broker.http.metrics_routes`) times
  ``POST /v1/credentials``; :class:`CountingPolicyEngine` wraps the policy engine;
  :class:`broker.revocation.RevocationMetrics` (the revocation engine's own instruments)
  lives on this same registry.
* **scrape-time sources** — values read when ``/metrics`` is asked: async sources registered
  with :meth:`BrokerMetrics.add_source` (the ledger's revocation backlog, pending approvals)
  are awaited first, each within a time budget; synchronous collectors (trust bundle age, the
  broker's Vault token, the sweeper's counts; :mod:`broker.adapters.metrics_sources`) are
  read by the registry itself. A source that fails is counted in
  ``tasklease_metrics_source_errors_total{source}`` and its gauges read NaN (unknown), never
  a stale value.

Hook for the approvals work: ``metrics.watch_pending_approvals(count)`` with an async
``count() -> int`` (e.g. the approval store's number of pending approvals); until it is called
``tasklease_approvals_pending`` is 0 (no approvals exist).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.core.model import Decision
from broker.core.ports import PolicyEngine, PolicyRequest
from broker.errors import TaskleaseError

_log = structlog.get_logger("broker.metrics")

# Issuance takes a few ms (vault-token) to a few hundred (database under load).
ISSUANCE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# What an outcome label may look like: the broker's stable reason codes (``policy.denied``,
# ``workflow.not_active``) and a few words of its own; anything else is "error".
_OUTCOME_LABEL = re.compile(r"[a-z][a-z0-9_.]{0,63}")
UNKNOWN_KIND: Final = "unknown"


def error_outcome(exc: BaseException) -> str:
    """The outcome label of a failed request: the error's stable reason code (a closed set
    written in the code), ``http_<status>`` for aiohttp's own errors, else ``error``."""
    if isinstance(exc, TaskleaseError):
        for label in (exc.reason, exc.code):
            if _OUTCOME_LABEL.fullmatch(label):
                return label
        return "error"
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 100 <= status <= 599:
        return f"http_{status}"
    return "error"


class BrokerMetrics:
    """Every instrument of one broker process, on ``registry`` (a new one if None).

    Per process: a replica reports what it did; sum (counters) or take the max (gauges)
    across replicas. The ledger-wide gauges (``tasklease_revocation_backlog*``) are the same
    on every replica.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, source_timeout: float = 2.0
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._source_timeout = source_timeout
        self._sources: dict[str, tuple[Callable[[], Awaitable[None]], tuple[Gauge, ...]]] = {}
        registry = self.registry
        self.issuance = Counter(
            "tasklease_issuance",
            "Credential requests (POST /v1/credentials) by target kind and outcome "
            "(issued, or the refusal's reason code)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.issuance_seconds = Histogram(
            "tasklease_issuance_duration_seconds",
            "Time to answer a credential request, by target kind and outcome",
            ["kind", "outcome"],
            buckets=ISSUANCE_BUCKETS,
            registry=registry,
        )
        # The target label names a catalog entry (a closed set the operator wrote), and only
        # legacy ones: the burn-down trend beyond what the ledger keeps (broker/legacy.py).
        self.legacy_requests = Counter(
            "tasklease_legacy_requests",
            "Credential requests for targets the catalog marks legacy (standing static "
            "secrets), by target and outcome",
            ["target", "outcome"],
            registry=registry,
        )
        self.policy_decisions = Counter(
            "tasklease_policy_decisions",
            "Policy decisions by outcome (allow, deny, needs_approval; error when the engine "
            "failed, which denies)",
            ["outcome"],
            registry=registry,
        )
        self.approvals_pending = Gauge(
            "tasklease_approvals_pending",
            "Approval requests waiting for a decision",
            registry=registry,
        )
        self.revocation_backlog = Gauge(
            "tasklease_revocation_backlog",
            "Ledger-wide, at scrape time: leases whose due time has passed and that no sweep "
            "has settled (state=due: waiting for a claim; claimed: a sweep holds them; "
            "claim_expired: the claimer died or stalled, they return on the next sweep)",
            ["state"],
            registry=registry,
        )
        self.revocation_backlog_oldest = Gauge(
            "tasklease_revocation_backlog_oldest_seconds",
            "Ledger-wide sweep lag at scrape time: now minus the oldest due time among the "
            "unclaimed due leases (0 when none is due)",
            registry=registry,
        )
        self.redis_memory = Gauge(
            "tasklease_redis_memory_bytes",
            "The ledger's Redis at scrape time: memory in use (used) and its maxmemory (max; "
            "0: no limit of its own). Full, with noeviction, it refuses every ledger write",
            ["kind"],
            registry=registry,
        )
        self.source_errors = Counter(
            "tasklease_metrics_source_errors",
            "Scrape-time metric sources that failed or timed out (their gauges read NaN)",
            ["source"],
            registry=registry,
        )
        for state in ("due", "claimed", "claim_expired"):
            self.revocation_backlog.labels(state=state)

    # ---- scrape-time sources

    def add_source(
        self, name: str, refresh: Callable[[], Awaitable[None]], *, gauges: Iterable[Gauge]
    ) -> None:
        """Await ``refresh`` before every exposition; it sets ``gauges``, which read NaN when
        it fails or takes longer than the source budget."""
        if not _OUTCOME_LABEL.fullmatch(name):
            raise ValueError(f"a metric source name must match {_OUTCOME_LABEL.pattern}")
        self._sources[name] = (refresh, tuple(gauges))

    def watch_pending_approvals(self, count: Callable[[], Awaitable[int]]) -> None:
        """The approvals hook: ``count()`` (awaited at every scrape) is the number of
        approval requests waiting for a decision."""

        async def refresh() -> None:
            self.approvals_pending.set(await count())

        self.add_source("approvals", refresh, gauges=[self.approvals_pending])

    async def refresh(self) -> None:
        """Run every scrape-time source, concurrently, each within the budget."""
        await asyncio.gather(*(self._refresh(name) for name in list(self._sources)))

    async def _refresh(self, name: str) -> None:
        refresh, gauges = self._sources[name]
        try:
            async with asyncio.timeout(self._source_timeout):
                await refresh()
        except Exception as exc:  # noqa: BLE001 - a failing source must not fail the scrape
            self.source_errors.labels(source=name).inc()
            for gauge in gauges:
                _blank(gauge)
            _log.warning(
                "metrics.source_failed",
                source=name,
                error_type=type(exc).__name__,
                reason=getattr(exc, "reason", ""),
            )

    async def exposition(self) -> bytes:
        """Refresh the sources, then the registry in the Prometheus text format."""
        await self.refresh()
        return generate_latest(self.registry)


def _blank(gauge: Gauge) -> None:
    """Set every series of ``gauge`` to NaN (unknown)."""
    series = [sample.labels for family in gauge.collect() for sample in family.samples]
    for labels in series:
        (gauge.labels(**labels) if labels else gauge).set(math.nan)


class CountingPolicyEngine:  # satisfies core.ports.PolicyEngine
    """A policy engine that counts the decisions of the one it wraps, by outcome."""

    def __init__(self, inner: PolicyEngine, *, metrics: BrokerMetrics) -> None:
        self._inner = inner
        self._decisions = metrics.policy_decisions

    def decide(self, request: PolicyRequest) -> Decision:
        """The wrapped engine's decision, counted (``error`` when it raised)."""
        try:
            decision = self._inner.decide(request)
        except BaseException:
            self._decisions.labels(outcome="error").inc()
            raise
        self._decisions.labels(outcome=decision.outcome.value).inc()
        return decision
