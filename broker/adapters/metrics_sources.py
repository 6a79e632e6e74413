"""Where the scrape-time metrics come from: the trust store, the broker's OpenBao session, the
sweeper and the ledger's due index (see :mod:`broker.metrics` for what each metric means).

Collectors here are read by the Prometheus registry at every scrape and do no I/O (the trust
store, the session and the sweeper keep their state in memory); the ledger's backlog is one
Redis round trip, registered as an async source of :class:`~broker.metrics.BrokerMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.adapters.memory_ledger import DueBacklog
from broker.adapters.redis_ledger import RedisMemory
from broker.adapters.scheduler import RevocationSweeper
from broker.adapters.vault import HvacVault
from broker.adapters.webhook_notifier import DeliveryStats
from broker.core.bundle import TrustStore
from broker.core.ports import Clock
from broker.metrics import BrokerMetrics


class DueBacklogSource(Protocol):
    """A ledger that can say how much revocation work is waiting (both ledgers can)."""

    async def due_backlog(self, now: datetime) -> DueBacklog:
        """The due index at ``now``."""
        ...


class TrustBundleCollector(Collector):
    """Age and staleness limit of every installed trust bundle, by trust domain."""

    def __init__(self, store: TrustStore, *, now: Callable[[], datetime]) -> None:
        self._store = store
        self._now = now

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "tasklease_trust_bundle_age_seconds",
                "Seconds since the trust bundle of a trust domain was fetched; SVIDs of that "
                "domain are refused once it passes tasklease_trust_bundle_max_age_seconds",
                labels=["trust_domain"],
            ),
            GaugeMetricFamily(
                "tasklease_trust_bundle_max_age_seconds",
                "The staleness limit of a trust domain's bundle",
                labels=["trust_domain"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        """The metric names, without reading the store."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """One sample per trust domain that has a bundle."""
        age, limit = self._families()
        now = self._now()
        for trust_domain in sorted(self._store.trust_domains, key=lambda td: td.name):
            fetched_at = self._store.fetched_at(trust_domain)
            if fetched_at is None:
                continue
            age.add_metric([trust_domain.name], (now - fetched_at).total_seconds())
            limit.add_metric(
                [trust_domain.name], self._store.max_staleness_of(trust_domain).total_seconds()
            )
        yield age
        yield limit


class VaultSessionCollector(Collector):
    """Time left on the broker's own OpenBao/Vault token (it logs in again before half)."""

    def __init__(self, vault: HvacVault) -> None:
        self._vault = vault

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "tasklease_vault_token_expires_in_seconds",
            "Seconds until the broker's own OpenBao/Vault token expires (negative: expired; "
            "absent before the first login)",
        )

    def describe(self) -> Iterator[Metric]:
        """The metric name."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """The remaining TTL, from the session the broker holds (no call to Vault)."""
        family = self._family()
        remaining = self._vault.seconds_to_expiry()
        if remaining is not None:
            family.add_metric([], remaining)
        yield family


class SweeperCollector(Collector):
    """How many sweeps this process ran, and how many failed (the ledger was unreachable)."""

    def __init__(self, sweeper: RevocationSweeper) -> None:
        self._sweeper = sweeper

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "tasklease_revocation_sweeps",
            "Revocation sweeps run by this process, by result (ok, failed)",
            labels=["result"],
        )

    def describe(self) -> Iterator[Metric]:
        """The metric name."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """The sweeper's own counts."""
        family = self._family()
        family.add_metric(["ok"], self._sweeper.sweeps)
        family.add_metric(["failed"], self._sweeper.failures)
        yield family


class RetentionTotals(Protocol):
    """What the run retention job (``broker.retention``) has done in this process."""

    runs_purged: int
    leases_purged: int
    failures: int


class RetentionCollector(Collector):
    """Run retention of this process: records purged, and runs it could not purge."""

    def __init__(self, job: RetentionTotals) -> None:
        self._job = job

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "tasklease_ledger_purged",
                "Records this process deleted from the ledger after their run's retention, by "
                "record (run, lease)",
                labels=["record"],
            ),
            CounterMetricFamily(
                "tasklease_ledger_purge_failures",
                "Runs this process could not purge in a pass (ledger or audit trail "
                "unavailable, a record it could not read), and passes that failed",
            ),
        )

    def describe(self) -> Iterator[Metric]:
        """The metric names."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """The job's own counts."""
        purged, failures = self._families()
        purged.add_metric(["run"], self._job.runs_purged)
        purged.add_metric(["lease"], self._job.leases_purged)
        failures.add_metric([], self._job.failures)
        yield purged
        yield failures


class WebhookCollector(Collector):
    """Approval webhook deliveries handled by this process, by outcome."""

    # DeliveryStats field → outcome label.
    OUTCOMES = (
        "queued",
        "delivered",
        "failed",
        "dropped",
        "retries",
        "unknown_url",
        "handed_back",
        "reclaimed",
        "lost",
    )

    def __init__(self, stats: Callable[[], DeliveryStats]) -> None:
        self._stats = stats

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "tasklease_webhook_deliveries",
            "Approval webhook deliveries of this process, by outcome (queued, delivered, "
            "failed: a final refusal or attempts exhausted, dropped: the outbox full or "
            "unreachable, retries, unknown_url, handed_back, reclaimed, lost)",
            labels=["outcome"],
        )

    def describe(self) -> Iterator[Metric]:
        """The metric name."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """The notifier's own counts."""
        family = self._family()
        stats = self._stats()
        for outcome in self.OUTCOMES:
            family.add_metric([outcome], getattr(stats, outcome))
        yield family


def watch_revocation_backlog(
    metrics: BrokerMetrics, ledger: DueBacklogSource, clock: Clock
) -> None:
    """Refresh the ledger-wide backlog gauges from the due index at every scrape."""

    async def refresh() -> None:
        now = clock.now()
        backlog = await ledger.due_backlog(now)
        metrics.revocation_backlog.labels(state="due").set(backlog.due)
        metrics.revocation_backlog.labels(state="claimed").set(backlog.claimed)
        metrics.revocation_backlog.labels(state="claim_expired").set(backlog.claim_expired)
        oldest = backlog.oldest_due_at
        metrics.revocation_backlog_oldest.set(
            max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
        )

    metrics.add_source(
        "ledger",
        refresh,
        gauges=[metrics.revocation_backlog, metrics.revocation_backlog_oldest],
    )


class MemorySource(Protocol):
    """A ledger that can say how much memory its store uses (the Redis ledger)."""

    async def memory(self) -> RedisMemory:
        """Used bytes and the limit."""
        ...


def watch_redis_memory(metrics: BrokerMetrics, ledger: MemorySource) -> None:
    """Refresh the Redis memory gauges at every scrape."""

    async def refresh() -> None:
        memory = await ledger.memory()
        metrics.redis_memory.labels(kind="used").set(memory.used)
        metrics.redis_memory.labels(kind="max").set(memory.maximum)

    metrics.add_source("redis_memory", refresh, gauges=[metrics.redis_memory])


def register_metrics_sources(
    metrics: BrokerMetrics,
    *,
    clock: Clock,
    trust_store: TrustStore,
    vault: HvacVault,
    sweeper: RevocationSweeper,
    ledger: DueBacklogSource,
    webhooks: Callable[[], DeliveryStats] | None = None,
) -> None:
    """Attach every scrape-time source of a running broker to ``metrics``."""
    metrics.registry.register(TrustBundleCollector(trust_store, now=clock.now))
    metrics.registry.register(VaultSessionCollector(vault))
    metrics.registry.register(SweeperCollector(sweeper))
    if webhooks is not None:
        metrics.registry.register(WebhookCollector(webhooks))
    watch_revocation_backlog(metrics, ledger, clock)
