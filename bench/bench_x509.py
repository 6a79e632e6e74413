"""Time X.509-SVID authentication against the floor measured in the same run.

The floor is pyca's ``ClientVerifier`` alone (built once, Web PKI defaults) on the same
SPIRE-shaped SVID; the measured path is :class:`broker.core.x509svid.X509SvidAuthenticator`
(verifier lookup, SPIFFE leaf rules, skewed dates, a per-call ``ClientVerifier`` for the
validation instant, pyca's chain check). Two workloads: the same ``Certificate`` object every
time (its parsed extensions are cached), and a fresh object parsed from DER per call, as a new
TLS connection gives. Goal: ratio <= 1.5.

    .venv/bin/python bench/bench_x509.py [--n 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store

# The test PKI lives in tests/; this script runs from a checkout, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.core.spiffe_id import TrustDomain
from broker.core.x509svid import X509SvidAuthenticator, X509SvidVerifier
from tests.pki import NOW, make_root


def best_us_per_op(
    floor: Callable[[], object], ours: Callable[[], object], n: int, rounds: int
) -> tuple[float, float]:
    """The fastest of ``rounds`` runs of ``n`` calls each, in µs per call, for both.

    Rounds alternate between the two so that load from elsewhere on the machine hits both.
    """
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for index, operation in enumerate((floor, ours)):
            started = time.perf_counter()
            for _ in range(n):
                operation()
            best[index] = min(best[index], time.perf_counter() - started)
    return best[0] / n * 1e6, best[1] / n * 1e6


def out(line: str) -> None:
    """Print one line of the report (the bench is a script: stdout is its output)."""
    sys.stdout.write(line + "\n")


def main() -> None:
    """Run both workloads and print µs/op for the floor and for tasklease, and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="verifications per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best one counts")
    args = parser.parse_args()

    root = make_root("a.test")
    leaf = root.leaf("spiffe://a.test/ns/prod/sa/agent")
    leaf_der = leaf.public_bytes(Encoding.DER)
    trust_domain = TrustDomain("a.test")
    authenticator = X509SvidAuthenticator(
        {trust_domain: X509SvidVerifier(trust_domain=trust_domain, authorities=[root.cert])}
    )
    floor = PolicyBuilder().store(Store([root.cert])).time(NOW).build_client_verifier()
    authenticator.authenticate([leaf], now=NOW)  # fails loudly if the SVID is not accepted
    floor.verify(leaf, [])

    workloads: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "same Certificate object": (
            lambda: floor.verify(leaf, []),
            lambda: authenticator.authenticate([leaf], now=NOW),
        ),
        "parsed from DER per call": (
            lambda: floor.verify(x509.load_der_x509_certificate(leaf_der), []),
            lambda: authenticator.authenticate([x509.load_der_x509_certificate(leaf_der)], now=NOW),
        ),
    }
    out(f"SPIRE-shaped ECDSA P-256 SVID, no intermediate; n={args.n}, best of {args.rounds}")
    out(f"{'workload':<26} {'pyca floor':>12} {'tasklease':>12} {'ratio':>7}")
    for name, (floor_op, ours_op) in workloads.items():
        floor_us, ours_us = best_us_per_op(floor_op, ours_op, args.n, args.rounds)
        out(f"{name:<26} {floor_us:>9.1f} µs {ours_us:>9.1f} µs {ours_us / floor_us:>6.2f}x")


if __name__ == "__main__":
    main()
