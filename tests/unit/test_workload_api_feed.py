"""WorkloadApiBundleFeed: what the SPIRE agent streams becomes exactly what the store trusts.

A small fake with the ``bundles()``/``subscribe()`` surface of ``WorkloadApiSource`` stands in
for the agent; updates are pushed from a real thread, as py-spiffe delivers them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from structlog.testing import capture_logs

from broker.adapters.bundle_sources import WorkloadApiBundleFeed
from broker.adapters.workload_api import WorkloadApiBundles
from broker.core.bundle import ReplaceOutcome, TrustBundle, TrustStore
from broker.core.spiffe_id import TrustDomain
from broker.errors import BundleUnavailableError, UntrustedDomainError
from tests.jwt_tokens import NOW, TD_A, TD_B, ca_cert, signer_es256_a, signer_es256_b_colliding

TD_OWN = TrustDomain("broker.test")


def delivery(
    x509_authorities: Mapping[str, tuple[x509.Certificate, ...]],
    jwt_authorities: Mapping[str, dict[str, PublicKeyTypes]] | None = None,
) -> WorkloadApiBundles:
    return WorkloadApiBundles(
        x509_authorities=dict(x509_authorities),
        jwt_authorities=dict(jwt_authorities or {}),
        received_at=NOW,
    )


def own_and_federated() -> WorkloadApiBundles:
    return delivery(
        {"broker.test": (ca_cert(TD_OWN),), "a.test": (ca_cert(TD_A),)},
        {"broker.test": {"own-1": signer_es256_b_colliding().public_key}},
    )


class FakeWorkloadApi:
    """Delivers whatever a test sets, and calls subscribers from a thread of its own."""

    def __init__(self, current: WorkloadApiBundles) -> None:
        self.current = current
        self.failure: BundleUnavailableError | None = None
        self._callbacks: list[Callable[[], None]] = []

    def bundles(self) -> WorkloadApiBundles:
        if self.failure is not None:
            raise self.failure
        return self.current

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    async def push(self, update: WorkloadApiBundles | None = None) -> None:
        """Deliver ``update`` from another thread, then let the loop run what it scheduled."""
        if update is not None:
            self.current = update
        thread = threading.Thread(target=lambda: [cb() for cb in self._callbacks])
        thread.start()
        thread.join()
        # call_soon_threadsafe queued the sync before this task's own wake-up.
        await asyncio.sleep(0)


class ThreadRecordingStore(TrustStore):
    """A TrustStore that remembers which threads wrote to it."""

    def __init__(self) -> None:
        super().__init__(max_staleness=timedelta(hours=1))
        self.writers: set[int] = set()

    def replace(self, bundle: TrustBundle, fetched_at: datetime) -> ReplaceOutcome:
        self.writers.add(threading.get_ident())
        return super().replace(bundle, fetched_at)

    def remove(self, trust_domain: TrustDomain) -> bool:
        self.writers.add(threading.get_ident())
        return super().remove(trust_domain)


def started_feed(
    api: FakeWorkloadApi, store: TrustStore | None = None
) -> tuple[WorkloadApiBundleFeed, TrustStore]:
    store = store if store is not None else TrustStore(max_staleness=timedelta(hours=1))
    feed = WorkloadApiBundleFeed(source=api, store=store, now=lambda: NOW)
    feed.start()
    return feed, store


async def test_start_installs_every_delivered_trust_domain() -> None:
    feed, store = started_feed(FakeWorkloadApi(own_and_federated()))

    assert frozenset({TD_OWN, TD_A}) == store.trust_domains
    assert frozenset({TD_OWN, TD_A}) == feed.trust_domains
    own = store.bundle_for(TD_OWN, NOW)
    assert [ca_cert(TD_OWN)] == list(own.x509_authorities)
    assert list(own.jwt_authorities) == ["own-1"]
    assert [ca_cert(TD_A)] == list(store.bundle_for(TD_A, NOW).x509_authorities)


async def test_start_fails_when_the_workload_api_has_no_bundles() -> None:
    api = FakeWorkloadApi(own_and_federated())
    api.failure = BundleUnavailableError("down", reason="workload_api.failed")
    store = TrustStore()

    with pytest.raises(BundleUnavailableError):
        WorkloadApiBundleFeed(source=api, store=store, now=lambda: NOW).start()

    assert frozenset() == store.trust_domains


async def test_update_dropping_a_federated_domain_removes_it_from_the_store() -> None:
    api = FakeWorkloadApi(own_and_federated())
    feed, store = started_feed(api)

    with capture_logs() as logs:
        await api.push(delivery({"broker.test": (ca_cert(TD_OWN),)}))

    assert frozenset({TD_OWN}) == store.trust_domains
    assert frozenset({TD_OWN}) == feed.trust_domains
    with pytest.raises(UntrustedDomainError):
        store.bundle_for(TD_A, NOW)
    removed = [e["trust_domain"] for e in logs if e["event"] == "bundle.removed"]
    assert removed == ["a.test"]


async def test_update_dropping_a_jwt_key_removes_it_from_the_domain() -> None:
    api = FakeWorkloadApi(delivery({}, {"a.test": {"a-ec-1": signer_es256_a().public_key}}))
    _, store = started_feed(api)

    await api.push(delivery({"a.test": (ca_cert(TD_A),)}))

    assert dict(store.bundle_for(TD_A, NOW).jwt_authorities) == {}


async def test_domain_the_feed_did_not_install_is_left_alone() -> None:
    """A domain fed by a bundle file or endpoint is not the Workload API's to remove."""
    store = TrustStore(max_staleness=timedelta(hours=1))
    store.replace(TrustBundle(trust_domain=TD_B), NOW)
    api = FakeWorkloadApi(own_and_federated())
    started_feed(api, store)

    await api.push(delivery({"broker.test": (ca_cert(TD_OWN),)}))

    assert frozenset({TD_OWN, TD_B}) == store.trust_domains


async def test_authority_that_is_not_a_ca_is_skipped_and_logged() -> None:
    not_a_ca = ca_cert(TD_A, key_label="leafish", ca=False)
    api = FakeWorkloadApi(delivery({"a.test": (not_a_ca, ca_cert(TD_A))}))

    with capture_logs() as logs:
        _, store = started_feed(api)

    assert [ca_cert(TD_A)] == list(store.bundle_for(TD_A, NOW).x509_authorities)
    skipped = [e for e in logs if e["event"] == "bundle.key_skipped"]
    assert [(e["trust_domain"], e["reason"], e["index"], e["alert"]) for e in skipped] == [
        ("a.test", "bundle_key.not_a_ca", 0, True)
    ]


async def test_update_is_applied_on_the_loop_thread_not_the_callers() -> None:
    """TrustStore swaps snapshots without a lock: every write must come from one thread."""
    api = FakeWorkloadApi(own_and_federated())
    store = ThreadRecordingStore()
    started_feed(api, store)

    await api.push(delivery({"broker.test": (ca_cert(TD_OWN),)}))

    assert {threading.get_ident()} == store.writers
    assert frozenset({TD_OWN}) == store.trust_domains


async def test_failed_update_keeps_the_last_good_bundles_and_alerts() -> None:
    api = FakeWorkloadApi(own_and_federated())
    _, store = started_feed(api)
    before = store.bundle_for(TD_A, NOW)
    api.failure = BundleUnavailableError("stream broke", reason="workload_api.failed")

    with capture_logs() as logs:
        await api.push()

    assert before is store.bundle_for(TD_A, NOW)
    failed = [e for e in logs if e["event"] == "bundle.refresh_failed"]
    assert [(e["reason"], e["alert"]) for e in failed] == [("workload_api.failed", True)]


async def test_invalid_trust_domain_name_is_skipped_and_logged_escaped() -> None:
    hostile = "Evil.test\n\x1b[2J"
    api = FakeWorkloadApi(delivery({hostile: (ca_cert(TD_A),), "a.test": (ca_cert(TD_A),)}))

    with capture_logs() as logs:
        _, store = started_feed(api)

    assert frozenset({TD_A}) == store.trust_domains
    bad = [e for e in logs if e["event"] == "bundle.bad_trust_domain"]
    assert len(bad) == 1
    assert "\n" not in bad[0]["name"]
    assert "\x1b" not in bad[0]["name"]
