"""X.509-SVID authentication against the live TrustStore, and its per-chain result cache."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.core.bundle import TrustBundle, TrustStore
from broker.core.spiffe_id import TrustDomain
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import BundleUnavailableError, UntrustedDomainError, X509SvidRejectedError
from tests.pki import LEAF_LIFETIME, NOW, make_root

TD = TrustDomain("a.test")


def _store(*authorities: object) -> TrustStore:
    store = TrustStore(max_staleness=timedelta(hours=2))
    store.replace(
        TrustBundle.from_authorities(TD, x509_authorities=authorities),  # type: ignore[arg-type]
        NOW - timedelta(minutes=1),
    )
    return store


def test_a_chain_is_verified_then_served_from_the_cache() -> None:
    root = make_root("a.test")
    leaf = root.leaf("spiffe://a.test/agent/x")
    store = _store(root.cert)
    auth = TrustStoreX509Authenticator(trust_store=store)
    first = auth.authenticate([leaf], now=NOW)
    assert str(first.spiffe_id) == "spiffe://a.test/agent/x"
    assert auth.authenticate([leaf], now=NOW + timedelta(seconds=5)) == first


def test_a_refresh_that_drops_the_root_rejects_a_cached_chain() -> None:
    root, other = make_root("a.test"), make_root("a.test")
    leaf = root.leaf("spiffe://a.test/agent/x")
    store = _store(root.cert)
    auth = TrustStoreX509Authenticator(trust_store=store)
    auth.authenticate([leaf], now=NOW)
    store.replace(TrustBundle.from_authorities(TD, x509_authorities=[other.cert]), NOW)
    with pytest.raises(X509SvidRejectedError):
        auth.authenticate([leaf], now=NOW + timedelta(seconds=1))


def test_a_cached_chain_expires_with_its_leaf() -> None:
    root = make_root("a.test")
    leaf = root.leaf("spiffe://a.test/agent/x")
    auth = TrustStoreX509Authenticator(trust_store=_store(root.cert), skew=timedelta(0))
    auth.authenticate([leaf], now=NOW)
    with pytest.raises(X509SvidRejectedError) as caught:
        auth.authenticate([leaf], now=NOW + LEAF_LIFETIME)
    assert caught.value.reason == "x509.leaf_expired"


def test_a_removed_trust_domain_or_a_stale_bundle_fails_closed_even_when_cached() -> None:
    root = make_root("a.test")
    leaf = root.leaf("spiffe://a.test/agent/x")
    store = _store(root.cert)
    auth = TrustStoreX509Authenticator(trust_store=store)
    auth.authenticate([leaf], now=NOW)
    with pytest.raises(BundleUnavailableError):
        auth.authenticate([leaf], now=NOW + timedelta(hours=3))
    store.remove(TD)
    with pytest.raises(UntrustedDomainError):
        auth.authenticate([leaf], now=NOW)
