"""Time JWT-SVID verification against the floor of a bare PyJWT ES256 decode.

Run: ``.venv/bin/python bench/bench_jwt.py [iterations]`` (default 5000).

Both sides verify the same ES256 token with the same, already-parsed public key:

* floor: ``jwt.decode(token, key, algorithms=["ES256"])`` with PyJWT's claim checks off, so it
  is base64, JSON and one ECDSA verification, nothing more;
* broker: :meth:`JwtSvidVerifier.verify`, every check (strict JSON, header allow-list, SPIFFE
  ID parsing, audience, times, trust-store lookup, key/alg match, signature).

For context it also times the bare ``cryptography`` ECDSA verification of the same signature:
``broker - ecdsa`` is what all the parsing and policy checks cost per token.

Rounds of each alternate to share any drift in CPU frequency or load; the best round of each
is reported (the least disturbed), with the median alongside. Goal: ratio <= 1.5.
"""

from __future__ import annotations

import base64
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from broker.core.bundle import TrustBundle, TrustStore
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.spiffe_id import TrustDomain

AUDIENCE = "spiffe://broker.test/tasklease"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ROUNDS = 7
GOAL = 1.5


def _setup() -> tuple[str, ec.EllipticCurvePublicKey, JwtSvidVerifier]:
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_key = private_key.public_key()
    issued = int(NOW.timestamp())
    token = jwt.encode(
        {
            "sub": "spiffe://a.test/agent/planner",
            "aud": [AUDIENCE],
            "exp": issued + 300,
            "iat": issued,
        },
        private_key,
        algorithm="ES256",
        headers={"kid": "a-ec-1", "typ": "JWT"},
    )
    td = TrustDomain("a.test")
    store = TrustStore()
    store.replace(
        TrustBundle.from_authorities(td, jwt_authorities={"a-ec-1": public_key}),
        NOW - timedelta(minutes=1),
    )
    verifier = JwtSvidVerifier(audience=AUDIENCE, trust_store=store)
    return token, public_key, verifier


def _round_us(run: Callable[[], object], iterations: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(iterations):
        run()
    return (time.perf_counter_ns() - started) / iterations / 1000


def main(argv: list[str]) -> int:
    """Run the benchmark and print the figures (``make bench`` asserts nothing)."""
    iterations = int(argv[1]) if len(argv) > 1 else 5000
    token, public_key, verifier = _setup()
    floor_options = {
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_aud": False,
        "verify_iss": False,
    }

    def floor() -> object:
        return jwt.decode(token, public_key, algorithms=["ES256"], options=floor_options)  # type: ignore[arg-type]

    def broker() -> object:
        return verifier.verify(token, now=NOW)

    signing_input, _, signature_b64 = token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    message = signing_input.encode()

    def ecdsa() -> object:
        public_key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        return None

    # Both must succeed before anything is timed.
    floor()
    broker()
    ecdsa()
    warmup = max(iterations // 10, 50)
    _round_us(floor, warmup)
    _round_us(broker, warmup)
    _round_us(ecdsa, warmup)

    floor_rounds: list[float] = []
    broker_rounds: list[float] = []
    ecdsa_rounds: list[float] = []
    for _ in range(ROUNDS):
        floor_rounds.append(_round_us(floor, iterations))
        broker_rounds.append(_round_us(broker, iterations))
        ecdsa_rounds.append(_round_us(ecdsa, iterations))

    floor_best, broker_best = min(floor_rounds), min(broker_rounds)
    ratio = broker_best / floor_best
    out = sys.stdout
    out.write(f"iterations per round: {iterations}, rounds: {ROUNDS}\n")
    out.write(
        f"floor  jwt.decode ES256 (signature only): best {floor_best:8.2f} us/op, "
        f"median {statistics.median(floor_rounds):8.2f} us/op\n"
    )
    out.write(
        f"broker JwtSvidVerifier.verify (all checks): best {broker_best:8.2f} us/op, "
        f"median {statistics.median(broker_rounds):8.2f} us/op\n"
    )
    ecdsa_best = min(ecdsa_rounds)
    out.write(
        f"ecdsa  cryptography P-256 verify only:      best {ecdsa_best:8.2f} us/op "
        f"(broker beyond ECDSA: {broker_best - ecdsa_best:.2f} us/op)\n"
    )
    out.write(
        f"ratio (best/best): {ratio:.2f}x  goal <= {GOAL}x  {'OK' if ratio <= GOAL else 'MISS'}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
