"""JWT-SVID verification, strict and fail closed (JWT-SVID spec, RFC 7515, RFC 7519).

``py-spiffe``'s ``JwtSvid.parse_and_validate`` accepts a token signed by trust domain A's key
whose ``sub`` is in trust domain B, raises a bare ``KeyError`` on a missing ``exp``, accepts a
``jku`` header and a root-path ``sub``. :class:`JwtSvidVerifier` replaces it; PyJWT's algorithm
objects (over ``cryptography``) do only the signature arithmetic.

Checks run cheapest first, so a hostile token costs no key lookup and no public-key operation
until everything that can be judged from its bytes has passed:

1. type and size budget; compact serialization only (exactly two dots, counted, not split);
2. strict, canonical base64url for all three segments;
3. header: strict JSON object, only ``alg``/``kid``/``typ``; ``typ`` is ``JWT`` or ``JOSE``;
   ``alg`` in the JWT-SVID allow-list; ``kid`` present and a short safe token;
4. payload: strict JSON object; ``sub`` a non-root SPIFFE ID; ``aud`` holds our audience;
   ``exp``/``nbf``/``iat`` integers in range; time and lifetime checks against ``now``;
   ``jti`` when the replay cache is on;
5. the bundle of the ``sub``'s own trust domain (unknown → untrusted, stale → unavailable), the
   ``kid`` in that bundle only, the key's family and curve against ``alg``;
6. the signature;
7. the replay cache, if configured (only verified tokens are ever remembered).

Replay (JWT-SVID §6.1, SECURITY 18): a JWT-SVID is a bearer token. By default the same token is
accepted again and again until ``exp`` (plus leeway): that is the stated limit. With a
:class:`JtiReplayCache`, a token must carry a ``jti`` and is accepted once per process; the
cache is per replica, so across replicas the limit still holds unless they share one.

Every rejection is a :class:`~broker.errors.JwtSvidRejectedError` with a ``jwt.*`` reason,
except: the ``sub``'s trust domain is not trusted (:class:`~broker.errors.UntrustedDomainError`,
``trust_domain.untrusted``), its bundle is stale (:class:`~broker.errors.BundleUnavailableError`,
``bundle.stale``) and a full replay cache (:class:`~broker.errors.UnavailableError`,
``jwt.replay_cache_full``). Details name what was checked and found, with untrusted values
escaped and truncated; the token itself is never echoed.
"""

from __future__ import annotations

import base64
import heapq
import re
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, NoReturn, TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from jwt.algorithms import Algorithm, get_default_algorithms

from broker.core.bundle import (
    JWT_SVID_ALGORITHMS,
    StrictJsonError,
    TrustStore,
    is_safe_kid,
    key_fits_algorithm,
    loads_strict_json,
)
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.spiffe_id import SpiffeId
from broker.core.untrusted import printable
from broker.errors import (
    ConfigurationError,
    JwtSvidRejectedError,
    SpiffeIdError,
    UnavailableError,
)

__all__ = [
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_MAX_TOKEN_BYTES",
    "DEFAULT_REPLAY_CACHE_ENTRIES",
    "MAX_JTI_CHARS",
    "MAX_LEEWAY",
    "MAX_LIFETIME_LIMIT",
    "JtiReplayCache",
    "JwtSvidVerifier",
    "Rejecter",
    "b64url_segment",
    "check_jws_header",
    "numeric_date",
    "strict_json_object",
]

DEFAULT_MAX_LIFETIME: Final = timedelta(hours=1)
DEFAULT_LEEWAY: Final = timedelta(seconds=30)
DEFAULT_MAX_TOKEN_BYTES: Final = 8 * 1024
DEFAULT_REPLAY_CACHE_ENTRIES: Final = 100_000
# A leeway is for clock skew between hosts, not a way to extend tokens.
MAX_LEEWAY: Final = timedelta(minutes=5)
# Bearer tokens valid for more than a day are a configuration mistake, not a policy.
MAX_LIFETIME_LIMIT: Final = timedelta(days=1)
MAX_JTI_CHARS: Final = 256

# RFC 7519 §2 NumericDate; bounded to what datetime can represent (9999-12-31T23:59:59Z).
_MAX_NUMERIC_DATE: Final = 253_402_300_799
# JWT-SVID §2: any header not described there MUST NOT be present.
_ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
_ALLOWED_TYP: Final = frozenset({"JWT", "JOSE"})
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")

# PyJWT's algorithm objects for exactly the JWT-SVID allow-list; 'none', HMAC, EdDSA and
# ES256K never enter this table, so no header value can select them.
_SIGNERS: Final[Mapping[str, Algorithm]] = MappingProxyType(
    {name: alg for name, alg in get_default_algorithms().items() if name in JWT_SVID_ALGORITHMS}
)


def _reject(detail: str, reason: str) -> NoReturn:
    raise JwtSvidRejectedError(detail, reason=f"jwt.{reason}")


Rejecter: TypeAlias = Callable[[str, str], NoReturn]
"""Raises the caller's typed error from ``(detail, reason)``; ``reason`` has no prefix yet.

The token-parsing helpers below are shared with the OIDC verifier, which raises its own error
type and ``oidc.*`` reasons through this hook; here they default to ``jwt.*`` rejections.
"""


class JtiReplayCache:
    """Remembers the ``jti`` of verified JWT-SVIDs until they could no longer be accepted.

    Pure and bounded: time is passed in; an entry lives until its ``expires_at``; a full cache
    (after dropping expired entries) fails closed with ``jwt.replay_cache_full`` rather than
    forgetting a live entry, which would reopen the replay window. Keys are scoped by issuer
    (the ``sub``'s trust domain): ``jti`` is unique per issuer (RFC 7519 §4.1.7). Not
    thread-safe; one instance per event loop.
    """

    def __init__(self, *, max_entries: int = DEFAULT_REPLAY_CACHE_ENTRIES) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(
                f"replay cache max_entries is {max_entries!r}, expected a positive integer"
            )
        self._max_entries = max_entries
        self._expiry: dict[tuple[str, str], float] = {}
        self._by_expiry: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def remember(self, issuer: str, jti: str, *, expires_at: datetime, now: datetime) -> None:
        """Record ``(issuer, jti)`` until ``expires_at``; reject it if already recorded."""
        now_ts = now.timestamp()
        self._drop_expired(now_ts)
        key = (issuer, jti)
        if key in self._expiry:
            _reject(
                f"jti {printable(jti, 64)} from {printable(issuer, 64)} was already used; "
                "this JWT-SVID is a replay",
                "replayed",
            )
        if len(self._expiry) >= self._max_entries:
            raise UnavailableError(
                f"replay cache holds {len(self._expiry)} live entries, its limit; "
                "refusing rather than forgetting one",
                reason="jwt.replay_cache_full",
            )
        expiry_ts = expires_at.timestamp()
        self._expiry[key] = expiry_ts
        heapq.heappush(self._by_expiry, (expiry_ts, key))

    def _drop_expired(self, now_ts: float) -> None:
        heap = self._by_expiry
        while heap and heap[0][0] <= now_ts:
            _, key = heapq.heappop(heap)
            del self._expiry[key]


class JwtSvidVerifier:
    """Verifies JWT-SVIDs addressed to ``audience`` against the bundles in ``trust_store``.

    ``leeway`` absorbs clock skew on ``exp``/``nbf``/``iat`` (at most five minutes);
    ``max_lifetime`` (at most a day) bounds ``exp`` minus ``iat`` (or ``nbf``, or ``now``);
    ``max_token_bytes`` is checked on the length before any parsing (a compact JWS is ASCII, so
    characters are bytes; anything else fails the base64url check). ``replay_cache`` turns on
    single use per ``jti``. Construction raises :class:`~broker.errors.ConfigurationError` for
    an empty or blank audience or a limit outside its range.
    """

    def __init__(
        self,
        *,
        audience: str,
        trust_store: TrustStore,
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
        leeway: timedelta = DEFAULT_LEEWAY,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        replay_cache: JtiReplayCache | None = None,
    ) -> None:
        if not isinstance(audience, str) or not audience.strip():
            raise ConfigurationError(
                f"JWT-SVID audience is {printable(audience)}, expected a non-empty string "
                "(JWT-SVID §3.2: validators MUST check aud)"
            )
        if audience != audience.strip() or not audience.isprintable():
            raise ConfigurationError(
                f"JWT-SVID audience {printable(audience)} has surrounding whitespace or "
                "control characters"
            )
        if not isinstance(max_lifetime, timedelta) or not (
            timedelta(0) < max_lifetime <= MAX_LIFETIME_LIMIT
        ):
            raise ConfigurationError(
                f"max_lifetime is {max_lifetime!r}, expected above 0 and at most "
                f"{MAX_LIFETIME_LIMIT} (JWT-SVID §3.3: keep validity as short as possible)"
            )
        if not isinstance(leeway, timedelta) or not timedelta(0) <= leeway <= MAX_LEEWAY:
            raise ConfigurationError(f"leeway is {leeway!r}, expected between 0 and {MAX_LEEWAY}")
        if isinstance(max_token_bytes, bool) or not isinstance(max_token_bytes, int):
            raise ConfigurationError(f"max_token_bytes is {max_token_bytes!r}, expected an int")
        if not 256 <= max_token_bytes <= 1024 * 1024:
            raise ConfigurationError(
                f"max_token_bytes is {max_token_bytes}, expected between 256 and 1048576"
            )
        self._audience = audience
        self._trust_store = trust_store
        self._max_lifetime_s = max_lifetime.total_seconds()
        self._leeway = leeway
        self._leeway_s = leeway.total_seconds()
        self._max_token_bytes = max_token_bytes
        self._replay_cache = replay_cache

    @property
    def audience(self) -> str:
        """The audience a token must name in ``aud``."""
        return self._audience

    def verify(self, token: str, *, now: datetime) -> WorkloadIdentity:
        """Verify ``token`` at ``now`` (timezone-aware) and return the identity it proves."""
        if not isinstance(now, datetime) or now.utcoffset() is None:
            raise TypeError(f"now must be a timezone-aware datetime, got {now!r}")
        header_b64, payload_b64, signature_b64 = self._split(token)
        header_raw = b64url_segment(header_b64, "header")
        payload_raw = b64url_segment(payload_b64, "payload")
        signature = b64url_segment(signature_b64, "signature")

        header = strict_json_object(header_raw, "header")
        alg_name, kid = _check_header(header)
        algorithm = JWT_SVID_ALGORITHMS[alg_name]

        claims = strict_json_object(payload_raw, "payload")
        subject = _check_subject(claims)
        self._check_audience(claims)
        now_ts = now.timestamp()
        exp = self._check_times(claims, now_ts)
        jti = self._check_jti(claims)

        # Trust Domain and Bundle §3: only the bundle of the SVID's own trust domain.
        bundle = self._trust_store.bundle_for(subject.trust_domain, now)
        key = bundle.jwt_authority(kid)
        if key is None:
            _reject(
                f"kid {kid} is not a JWT authority of trust domain {subject.trust_domain} "
                f"(the sub's trust domain; {len(bundle.jwt_authorities)} keys)",
                "kid_unknown",
            )
        if not key_fits_algorithm(key, algorithm):
            _reject(
                f"alg {alg_name} does not fit the {type(key).__name__} named by kid {kid}",
                "alg_key_mismatch",
            )
        declared = bundle.jwt_authority_algorithms.get(kid)
        if declared is not None and declared != alg_name:
            _reject(
                f"kid {kid} is bound to alg {declared} by its bundle, token says {alg_name}",
                "alg_key_mismatch",
            )

        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        try:
            valid = _SIGNERS[alg_name].verify(signing_input, key, signature)
        except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
            valid = False
        if not valid:
            _reject(
                f"{alg_name} signature does not verify with kid {kid} of {subject.trust_domain}",
                "signature_invalid",
            )

        if self._replay_cache is not None and jti is not None:
            self._replay_cache.remember(
                subject.trust_domain.name,
                jti,
                expires_at=datetime.fromtimestamp(exp, UTC) + self._leeway,
                now=now,
            )
        return WorkloadIdentity(
            spiffe_id=subject,
            expires_at=datetime.fromtimestamp(exp, UTC),
            method=AuthMethod.JWT_SVID,
        )

    def _split(self, token: object) -> tuple[str, str, str]:
        if not isinstance(token, str):
            _reject(f"token must be a string, got {type(token).__name__}", "not_a_string")
        if len(token) > self._max_token_bytes:
            _reject(
                f"token is {len(token)} characters, the limit is {self._max_token_bytes}; "
                "not parsed",
                "too_large",
            )
        if token.lstrip().startswith("{"):
            _reject(
                "token is JWS JSON serialization; JWT-SVID §5.1 requires compact serialization",
                "json_serialization",
            )
        # str.count is linear and allocation-free; split only once the count is right.
        dots = token.count(".")
        if dots != 2:
            _reject(
                f"token has {dots + 1} dot-separated segments, expected 3 "
                "(JWS compact serialization)",
                "segment_count",
            )
        header_b64, payload_b64, signature_b64 = token.split(".")
        return header_b64, payload_b64, signature_b64

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        if "aud" not in claims:
            _reject("token has no aud claim (JWT-SVID §3.2: MUST be present)", "aud_missing")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if (
            not isinstance(audiences, list)
            or not audiences
            or not all(isinstance(a, str) and a for a in audiences)
        ):
            _reject(
                f"aud is {printable(aud, 80)}, expected a non-empty string or a non-empty "
                "array of non-empty strings",
                "aud_malformed",
            )
        if self._audience not in audiences:
            _reject(
                f"aud {printable(audiences, 120)} does not contain {self._audience!r}",
                "aud_mismatch",
            )

    def _check_times(self, claims: Mapping[str, Any], now_ts: float) -> int:
        if "exp" not in claims:
            _reject("token has no exp claim (JWT-SVID §3.3: MUST be set)", "exp_missing")
        exp = numeric_date(claims, "exp")
        nbf = numeric_date(claims, "nbf") if "nbf" in claims else None
        iat = numeric_date(claims, "iat") if "iat" in claims else None
        leeway = self._leeway_s
        if exp + leeway <= now_ts:
            _reject(
                f"token expired: exp {exp} plus leeway {leeway:g}s is not after now {now_ts:.0f}",
                "expired",
            )
        if nbf is not None and nbf - leeway > now_ts:
            _reject(
                f"token not valid yet: nbf {nbf} minus leeway {leeway:g}s is after now "
                f"{now_ts:.0f}",
                "not_yet_valid",
            )
        # An iat in the future would shrink the measured lifetime below the real remaining
        # validity; refusing it keeps exp - now <= max_lifetime + leeway.
        if iat is not None and iat - leeway > now_ts:
            _reject(
                f"token issued in the future: iat {iat} minus leeway {leeway:g}s is after now "
                f"{now_ts:.0f}",
                "iat_in_future",
            )
        for name, moment in (("nbf", nbf), ("iat", iat)):
            if moment is not None and moment > exp:
                _reject(f"{name} {moment} is after exp {exp}: never valid", "exp_before_start")
        start = iat if iat is not None else nbf if nbf is not None else now_ts
        if exp - start > self._max_lifetime_s:
            _reject(
                f"token lifetime {exp - start:.0f}s (exp {exp} minus "
                f"{'iat' if iat is not None else 'nbf' if nbf is not None else 'now'}) "
                f"exceeds the maximum {self._max_lifetime_s:.0f}s",
                "lifetime_too_long",
            )
        return exp

    def _check_jti(self, claims: Mapping[str, Any]) -> str | None:
        if self._replay_cache is None:
            return None
        if "jti" not in claims:
            _reject("token has no jti claim; the replay cache requires one", "jti_missing")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            _reject(
                f"jti is {printable(jti, 64)}, expected a string of 1-{MAX_JTI_CHARS} characters",
                "jti_malformed",
            )
        return jti


def b64url_segment(segment: str, name: str, *, reject: Rejecter = _reject) -> bytes:
    """Decode one segment of a compact JWS (RFC 7515 §7.1).

    Anything but canonical, unpadded base64url is refused through ``reject`` with reason
    ``bad_base64``.
    """
    # RFC 7515 §2: base64url without padding; no '+', '/', '=' or whitespace. A segment
    # whose length is 1 mod 4 cannot encode whole bytes.
    if len(segment) % 4 == 1 or _B64URL.fullmatch(segment) is None:
        reject(f"{name} segment is not unpadded base64url", "bad_base64")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # Refuse non-canonical encodings (non-zero trailing bits): one token, one spelling.
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        reject(f"{name} segment is non-canonical base64url", "bad_base64")
    return raw


def strict_json_object(raw: bytes, name: str, *, reject: Rejecter = _reject) -> dict[str, Any]:
    """Parse a decoded JOSE header or claims set as a strict JSON object.

    Refusals go through ``reject``: ``duplicate_member`` for a repeated member name anywhere,
    ``<name>_malformed`` for anything else that is not one UTF-8 JSON object.
    """
    try:
        value = loads_strict_json(raw)
    except StrictJsonError as exc:
        if exc.reason == "duplicate":
            reject(f"{name} JSON has a {exc} (RFC 7515 §5.2: MUST reject)", "duplicate_member")
        reject(f"{name} is not strict UTF-8 JSON: {printable(str(exc), 120)}", f"{name}_malformed")
    if not isinstance(value, dict):
        reject(f"{name} is not a JSON object", f"{name}_malformed")
    return value


def check_jws_header(
    header: Mapping[str, Any],
    *,
    allowed_headers: frozenset[str],
    allowed_typ: frozenset[str],
    algorithms: Collection[str],
    header_rule: str,
    typ_rule: str,
    reject: Rejecter = _reject,
) -> tuple[str, str]:
    """Check a JOSE header before any key lookup; return ``(alg, kid)``.

    Shared by JWT-SVIDs and OIDC ID tokens, which differ only in what they allow. Refusals go
    through ``reject`` with ``header_not_allowed``, ``typ_not_allowed``, ``alg_missing``,
    ``alg_not_allowed``, ``kid_missing`` or ``kid_malformed``.
    """
    extra = header.keys() - allowed_headers
    if extra:
        names = sorted(printable(name, 32) for name in extra)
        reject(f"header has {', '.join(names)}; {header_rule}", "header_not_allowed")
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ not in allowed_typ:
        reject(f"typ is {printable(header['typ'], 40)}, expected {typ_rule}", "typ_not_allowed")
    if "alg" not in header:
        reject("header has no alg", "alg_missing")
    alg = header["alg"]
    # JWT-SVID §4 / RFC 8725 §3.1: the algorithm is checked before anything else is trusted.
    if not isinstance(alg, str) or alg not in algorithms:
        reject(
            f"alg {printable(alg, 40)} is not one of {', '.join(algorithms)}",
            "alg_not_allowed",
        )
    if "kid" not in header:
        reject("header has no kid; the broker looks keys up by kid only", "kid_missing")
    kid = header["kid"]
    if not is_safe_kid(kid):
        reject(
            f"kid {printable(kid, 64)} is not 1-128 characters of [A-Za-z0-9._-]",
            "kid_malformed",
        )
    return alg, kid


def _check_header(header: dict[str, Any]) -> tuple[str, str]:
    return check_jws_header(
        header,
        allowed_headers=_ALLOWED_HEADERS,
        allowed_typ=_ALLOWED_TYP,
        algorithms=JWT_SVID_ALGORITHMS,
        header_rule="JWT-SVID §2 allows only alg, kid and typ",
        typ_rule="JWT or JOSE (JWT-SVID §2.3)",
    )


def _check_subject(claims: Mapping[str, Any]) -> SpiffeId:
    if "sub" not in claims:
        _reject("token has no sub claim (JWT-SVID §3.1: MUST be set)", "sub_missing")
    sub = claims["sub"]
    if not isinstance(sub, str):
        _reject(f"sub is a {type(sub).__name__}, expected a SPIFFE ID string", "sub_invalid")
    try:
        subject = SpiffeId.parse(sub)
    except SpiffeIdError as exc:
        raise JwtSvidRejectedError(
            f"sub is not a valid SPIFFE ID ({exc.reason}): {exc.detail}",
            reason="jwt.sub_invalid",
        ) from exc
    if subject.is_root:
        _reject(f"sub {printable(sub)} names a trust domain, not a workload", "sub_is_root")
    return subject


def numeric_date(claims: Mapping[str, Any], name: str, *, reject: Rejecter = _reject) -> int:
    """The claim ``name`` as an integer NumericDate in [0, 9999-12-31T23:59:59Z].

    Refusals go through ``reject``: ``<name>_not_integer`` or ``<name>_out_of_range``.
    """
    value = claims[name]
    # RFC 7519 §2 allows fractions; the broker accepts integers only, and never a bool.
    if type(value) is not int:
        reject(
            f"{name} is {printable(value, 40)}, expected an integer NumericDate",
            f"{name}_not_integer",
        )
    if not 0 <= value <= _MAX_NUMERIC_DATE:
        reject(
            f"{name} is {printable(value, 40)}, outside [0, {_MAX_NUMERIC_DATE}]",
            f"{name}_out_of_range",
        )
    return value
