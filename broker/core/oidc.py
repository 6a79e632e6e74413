"""OIDC ID-token verification for people (approvers, admins), strict and fail closed.

Workloads prove themselves with SVIDs; people present an OpenID Connect ID token from one of
the issuers configured in ``config/identities.toml`` (``[[oidc_issuer]]``). This module holds
the pure parts: the issuer configuration (:func:`parse_oidc_issuers`), the issuer's signing
keys (:func:`parse_oidc_jwks`, an RFC 7517 JWK Set) and :class:`OidcVerifier`. Fetching the
JWKS is the adapter's job (``broker.adapters.oidc_jwks``), which installs each key set with
:meth:`OidcVerifier.install_keys`; until then, and once it goes stale, the issuer fails closed.

ID token validation follows OIDC Core §3.1.3.7, hardened like the JWT-SVID verifier
(SECURITY 11-17 and 38) and reusing its building blocks. Checks run cheapest first, so a
hostile token costs no key lookup and no public-key operation until everything that can be
judged from its bytes has passed:

1. type and size budget; compact serialization only (exactly two dots, counted, not split);
2. strict, canonical base64url for all three segments;
3. header: strict JSON object with only ``alg``/``kid``/``typ``/``x5t`` (IdPs such as Entra ID
   add ``x5t``; its value is ignored and never used to find a key); ``typ``, when present, is
   ``JWT``; ``alg`` in the global allow-list (RS/PS/ES 256/384/512); ``kid`` present and safe;
4. payload: strict JSON object; ``iss`` exactly one configured issuer (§3.1.3.7 step 2), and
   ``alg`` in *that* issuer's allow-list (step 7); ``aud`` contains the issuer's client id
   (step 3); ``azp`` when ``aud`` has several values (step 4-5); ``sub`` (§2); ``exp`` (step 9)
   and ``iat`` (step 10) required integers, ``nbf`` honoured, lifetime bounded, with leeway;
5. the key set of the token's own issuer only (missing → ``oidc.keys_unavailable``, too old
   → ``oidc.keys_stale``, both 503), the ``kid`` in it, the key family and curve against ``alg``
   and the ``alg`` the JWK declared, if any;
6. the signature (step 6), with PyJWT's algorithm objects over ``cryptography``.

Not checked, because the broker does not run the authorization-code flow that produced the
token: ``nonce`` (step 11), ``acr`` (step 12) and ``auth_time`` (step 13). An ID token is a
bearer token to the broker: it is accepted again until ``exp`` (plus leeway).

Every rejection is an :class:`~broker.errors.OidcTokenRejectedError` with an ``oidc.*``
reason; details name what was checked and found, untrusted values escaped and truncated; the
token itself is never echoed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, NoReturn
from urllib.parse import SplitResult, urlsplit

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import Algorithm, get_default_algorithms

from broker.core.bundle import (
    JWT_SVID_ALGORITHMS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    JwtAlgorithm,
    JwtAuthority,
    SkippedKey,
    StrictJsonError,
    is_safe_kid,
    key_fits_algorithm,
    loads_strict_json,
)
from broker.core.identity import HumanIdentity
from broker.core.jwk import JwkKeyError, ec_public_key, rsa_public_key
from broker.core.jwtsvid import (
    MAX_LEEWAY,
    MAX_LIFETIME_LIMIT,
    b64url_segment,
    check_jws_header,
    numeric_date,
    strict_json_object,
)
from broker.core.untrusted import printable
from broker.errors import ConfigurationError, OidcTokenRejectedError, UnavailableError

__all__ = [
    "DEFAULT_DISPLAY_CLAIMS",
    "DEFAULT_GROUPS_CLAIM",
    "DEFAULT_JWKS_REFRESH",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_JWKS_BYTES",
    "DEFAULT_MAX_JWKS_KEYS",
    "DEFAULT_MAX_KEY_AGE",
    "DEFAULT_MAX_LIFETIME",
    "DEFAULT_MAX_TOKEN_BYTES",
    "MAX_SUB_CHARS",
    "OIDC_ALGORITHMS",
    "OidcIssuer",
    "OidcIssuerConfig",
    "OidcKeySet",
    "OidcVerifier",
    "parse_oidc_issuers",
    "parse_oidc_jwks",
]

# RFC 7518 §3.3-3.5, the same set the JWT-SVID verifier accepts. OIDC Core §3.1.3.7 step 8
# allows HS* keyed with the client secret; the broker holds no client secret, so HMAC is
# never an option (it would be keyed with whatever the attacker says), and neither is 'none'.
OIDC_ALGORITHMS: Final[Mapping[str, JwtAlgorithm]] = JWT_SVID_ALGORITHMS

DEFAULT_LEEWAY: Final = timedelta(seconds=60)
# Google, Entra ID and Okta issue one-hour ID tokens; a longer-lived IdP (Auth0 defaults to
# ten hours) must be configured explicitly, up to MAX_LIFETIME_LIMIT (a day).
DEFAULT_MAX_LIFETIME: Final = timedelta(hours=1)
# Entra ID puts up to 200 group ids in a token before switching to an overage claim (~10 KB).
DEFAULT_MAX_TOKEN_BYTES: Final = 16 * 1024
DEFAULT_JWKS_REFRESH: Final = timedelta(minutes=5)
MIN_JWKS_REFRESH: Final = timedelta(seconds=5)
# Keys kept past this age without a successful refresh fail closed: a key the IdP withdrew
# (rotation, compromise) must not stay trusted because its JWKS endpoint became unreachable.
DEFAULT_MAX_KEY_AGE: Final = timedelta(hours=1)
MAX_KEY_AGE_LIMIT: Final = timedelta(days=7)
DEFAULT_MAX_JWKS_BYTES: Final = 256 * 1024
DEFAULT_MAX_JWKS_KEYS: Final = 100
DEFAULT_DISPLAY_CLAIMS: Final = ("email", "preferred_username")
DEFAULT_GROUPS_CLAIM: Final = "groups"
# OIDC Core §2: sub MUST NOT exceed 255 ASCII characters.
MAX_SUB_CHARS: Final = 255
_MAX_ISSUER_CHARS: Final = 2048
_MAX_DISPLAY_CHARS: Final = 128

# Only these header parameters may appear (RFC 7515 §4.1). jku, x5u, jwk and x5c would name
# a key the token chose itself; crit would oblige us to understand extensions we do not.
_ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ", "x5t"})
# RFC 7519 §5.1: "JWT" is the recommended value. An access token (RFC 9068 'at+jwt') or a
# logout token is not an ID token.
_ALLOWED_TYP: Final = frozenset({"JWT"})

# PyJWT's algorithm objects for exactly OIDC_ALGORITHMS: no header value can select 'none',
# HMAC, EdDSA or ES256K.
_SIGNERS: Final[Mapping[str, Algorithm]] = MappingProxyType(
    {name: alg for name, alg in get_default_algorithms().items() if name in OIDC_ALGORITHMS}
)

# Members only a private JWK has (RFC 7518 §6.2.2, §6.3.2).
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_ALLOWED_CURVE_NAMES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_CLAIM_NAME: Final = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")


def _reject(detail: str, reason: str) -> NoReturn:
    raise OidcTokenRejectedError(detail, reason=f"oidc.{reason}")


# --------------------------------------------------------------------------------------------
# Issuer configuration


@dataclass(frozen=True, slots=True)
class OidcIssuerConfig:
    """One trusted OpenID Provider, as configured in an ``[[oidc_issuer]]`` table.

    ``issuer`` is compared exactly with the token's ``iss`` (OIDC Core §3.1.3.7 step 2) and is
    an ``https`` URL without query or fragment (§2). ``audience`` is the broker's client id at
    this issuer (step 3). ``algorithms`` is the issuer's ``alg`` allow-list (step 7), a subset
    of :data:`OIDC_ALGORITHMS`. Keys come from exactly one of ``jwks_file`` (a path; the
    adapter resolves and reads it) or ``jwks_url`` (``https``), refreshed every ``refresh``;
    keys older than ``max_key_age`` fail closed. ``display_claims`` name the claims tried, in
    order, for :attr:`HumanIdentity.display`; ``groups_claim`` the claim copied into
    :attr:`HumanIdentity.groups`.

    Construction raises :class:`~broker.errors.ConfigurationError` naming the key at fault.
    """

    issuer: str
    audience: str
    algorithms: frozenset[str]
    jwks_file: str | None = None
    jwks_url: str | None = None
    leeway: timedelta = DEFAULT_LEEWAY
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME
    refresh: timedelta = DEFAULT_JWKS_REFRESH
    max_key_age: timedelta = DEFAULT_MAX_KEY_AGE
    display_claims: tuple[str, ...] = DEFAULT_DISPLAY_CLAIMS
    groups_claim: str = DEFAULT_GROUPS_CLAIM

    def __post_init__(self) -> None:
        _check_issuer_url(self.issuer)
        name = printable(self.issuer, 80)
        if not isinstance(self.audience, str) or not self.audience.strip():
            _config_error(
                name,
                "audience",
                f"is {printable(self.audience, 80)}, expected the broker's non-empty client id "
                "(OIDC Core §3.1.3.7 step 3: the aud check needs it)",
            )
        if self.audience != self.audience.strip() or not self.audience.isprintable():
            _config_error(
                name,
                "audience",
                f"{printable(self.audience, 80)} has surrounding whitespace or control characters",
            )
        algorithms = _check_algorithms(name, self.algorithms)
        if (self.jwks_file is None) == (self.jwks_url is None):
            _config_error(
                name,
                "jwks_file/jwks_url",
                "exactly one of jwks_file and jwks_url must be set, "
                f"got {'both' if self.jwks_file is not None else 'neither'}",
            )
        if self.jwks_file is not None and (
            not isinstance(self.jwks_file, str) or not self.jwks_file.strip()
        ):
            _config_error(name, "jwks_file", "must be a non-empty path")
        if self.jwks_url is not None:
            _check_jwks_url(name, self.jwks_url)
        _check_duration(name, "leeway_seconds", self.leeway, timedelta(0), MAX_LEEWAY)
        _check_duration(
            name,
            "max_lifetime_seconds",
            self.max_lifetime,
            timedelta(seconds=1),
            MAX_LIFETIME_LIMIT,
        )
        _check_duration(name, "refresh_seconds", self.refresh, MIN_JWKS_REFRESH, MAX_KEY_AGE_LIMIT)
        _check_duration(
            name, "max_key_age_seconds", self.max_key_age, timedelta(minutes=1), MAX_KEY_AGE_LIMIT
        )
        if self.refresh >= self.max_key_age:
            _config_error(
                name,
                "refresh_seconds",
                f"is {self.refresh.total_seconds():g}, expected below max_key_age_seconds "
                f"({self.max_key_age.total_seconds():g}) or the keys go stale between refreshes",
            )
        display = tuple(self.display_claims)
        if not display or not all(_is_claim_name(c) for c in display):
            _config_error(
                name,
                "display_claims",
                f"is {printable(display, 120)}, expected a non-empty list of claim names",
            )
        if not _is_claim_name(self.groups_claim):
            _config_error(
                name,
                "groups_claim",
                f"is {printable(self.groups_claim, 80)}, expected a claim name",
            )
        object.__setattr__(self, "algorithms", algorithms)
        object.__setattr__(self, "display_claims", display)


def _config_error(issuer: str, key: str, problem: str) -> NoReturn:
    raise ConfigurationError(f"oidc issuer {issuer}: {key} {problem}")


def _is_claim_name(value: object) -> bool:
    return isinstance(value, str) and _CLAIM_NAME.fullmatch(value) is not None


def _check_issuer_url(issuer: object) -> None:
    shown = printable(issuer, 80)
    if not isinstance(issuer, str) or not issuer:
        raise ConfigurationError(f"oidc issuer: issuer is {shown}, expected an https URL")
    # OIDC Core §2 (iss) and Discovery §2: a case-sensitive https URL with scheme, host and
    # optionally port and path; no query, no fragment. Whitespace or non-ASCII would make the
    # exact comparison with the token's iss depend on how someone typed the config.
    if len(issuer) > _MAX_ISSUER_CHARS or not issuer.isascii() or not issuer.isprintable():
        _config_error(shown, "issuer", "must be printable ASCII of at most 2048 characters")
    if any(ch.isspace() for ch in issuer):
        _config_error(shown, "issuer", "must not contain whitespace")
    parts = _split_url(shown, "issuer", issuer)
    if not issuer.startswith("https://"):
        _config_error(shown, "issuer", "must use the https scheme (OIDC Core §2: iss)")
    if not parts.hostname:
        _config_error(shown, "issuer", "has no host")
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        _config_error(shown, "issuer", "must have no query or fragment (OIDC Core §2: iss)")
    if "@" in parts.netloc:
        _config_error(shown, "issuer", "must have no user information")


def _split_url(issuer: str, key: str, url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        port = parts.port  # reading it validates it: non-numeric or out of range raises
    except ValueError as exc:
        _config_error(issuer, key, f"is not a URL ({printable(str(exc), 80)})")
    if port == 0:
        _config_error(issuer, key, "has port 0")
    return parts


def _check_jwks_url(issuer: str, url: object) -> None:
    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or " " in url:
        _config_error(issuer, "jwks_url", f"is {printable(url, 80)}, expected an https URL")
    parts = _split_url(issuer, "jwks_url", url)
    if parts.scheme != "https" or not parts.hostname:
        _config_error(issuer, "jwks_url", f"{printable(url, 80)} must be an https:// URL")
    if parts.fragment or "@" in parts.netloc:
        _config_error(issuer, "jwks_url", "must have no fragment or user information")


def _check_algorithms(issuer: str, algorithms: object) -> frozenset[str]:
    if isinstance(algorithms, str) or not isinstance(algorithms, Iterable):
        _config_error(issuer, "algorithms", "must be a non-empty list of JWS alg names")
    names = list(algorithms)
    if not names:
        _config_error(issuer, "algorithms", "is empty; list the algs this issuer signs with")
    for alg in names:
        if isinstance(alg, str) and alg.upper().startswith("HS"):
            _config_error(
                issuer,
                "algorithms",
                f"{alg!r} is an HMAC algorithm: it would be keyed with a shared secret, and the "
                "broker verifies ID tokens with the issuer's public keys only",
            )
        if not isinstance(alg, str) or alg not in OIDC_ALGORITHMS:
            _config_error(
                issuer,
                "algorithms",
                f"{printable(alg, 40)} is not allowed; choose from {', '.join(OIDC_ALGORITHMS)}",
            )
    return frozenset(names)


def _check_duration(issuer: str, key: str, value: object, low: timedelta, high: timedelta) -> None:
    if not isinstance(value, timedelta) or not low <= value <= high:
        shown = value.total_seconds() if isinstance(value, timedelta) else printable(value, 40)
        _config_error(
            issuer,
            key,
            f"is {shown}, expected between {low.total_seconds():g} and "
            f"{high.total_seconds():g} seconds",
        )


_ENTRY_KEYS: Final = frozenset(
    {
        "issuer",
        "audience",
        "algorithms",
        "jwks_file",
        "jwks_url",
        "leeway_seconds",
        "max_lifetime_seconds",
        "refresh_seconds",
        "max_key_age_seconds",
        "display_claims",
        "groups_claim",
    }
)


def parse_oidc_issuers(entries: object) -> list[OidcIssuerConfig]:
    """Parse the ``oidc_issuer`` array of tables of ``identities.toml``.

    ``entries`` is the parsed TOML value (absent section: pass ``[]``). Required keys:
    ``issuer``, ``audience``, ``algorithms`` and exactly one of ``jwks_file``/``jwks_url``;
    optional: ``leeway_seconds``, ``max_lifetime_seconds``, ``refresh_seconds``,
    ``max_key_age_seconds`` (integers), ``display_claims`` (list) and ``groups_claim``. Every
    problem raises :class:`~broker.errors.ConfigurationError` naming the entry and the key;
    two entries for the same issuer are refused (which audience and keys apply would be
    ambiguous).
    """
    if not isinstance(entries, list):
        raise ConfigurationError(
            f"identities: oidc_issuer is a {type(entries).__name__}, expected an array of "
            "tables ([[oidc_issuer]])"
        )
    configs: list[OidcIssuerConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"identities: oidc_issuer[{index}]"
        config = _parse_issuer_entry(entry, where)
        if config.issuer in seen:
            raise ConfigurationError(
                f"{where}.issuer: {printable(config.issuer, 80)} is already configured by "
                f"oidc_issuer[{seen[config.issuer]}]"
            )
        seen[config.issuer] = index
        configs.append(config)
    return configs


def _parse_issuer_entry(entry: object, where: str) -> OidcIssuerConfig:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where} must be a table")
    extra = set(entry) - _ENTRY_KEYS
    if extra:
        raise ConfigurationError(
            f"{where}: unknown key(s) {sorted(printable(k, 40) for k in extra)}; "
            f"allowed {sorted(_ENTRY_KEYS)}"
        )
    for key in ("issuer", "audience", "algorithms"):
        if key not in entry:
            raise ConfigurationError(f"{where}.{key} is required")
    for key in ("issuer", "audience", "jwks_file", "jwks_url", "groups_claim"):
        if key in entry and not isinstance(entry[key], str):
            raise ConfigurationError(
                f"{where}.{key} is a {type(entry[key]).__name__}, expected a string"
            )
    for key in ("algorithms", "display_claims"):
        if key in entry and (
            not isinstance(entry[key], list) or not all(isinstance(v, str) for v in entry[key])
        ):
            raise ConfigurationError(f"{where}.{key} must be a list of strings")
    if isinstance(entry["algorithms"], list) and len(set(entry["algorithms"])) != len(
        entry["algorithms"]
    ):
        raise ConfigurationError(f"{where}.algorithms lists an algorithm twice")
    try:
        return OidcIssuerConfig(
            issuer=entry["issuer"],
            audience=entry["audience"],
            algorithms=frozenset(entry["algorithms"]),
            jwks_file=entry.get("jwks_file"),
            jwks_url=entry.get("jwks_url"),
            display_claims=tuple(entry.get("display_claims", DEFAULT_DISPLAY_CLAIMS)),
            groups_claim=entry.get("groups_claim", DEFAULT_GROUPS_CLAIM),
            leeway=_seconds(entry, "leeway_seconds", DEFAULT_LEEWAY, where),
            max_lifetime=_seconds(entry, "max_lifetime_seconds", DEFAULT_MAX_LIFETIME, where),
            refresh=_seconds(entry, "refresh_seconds", DEFAULT_JWKS_REFRESH, where),
            max_key_age=_seconds(entry, "max_key_age_seconds", DEFAULT_MAX_KEY_AGE, where),
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc.detail}") from None


def _seconds(entry: Mapping[str, Any], key: str, default: timedelta, where: str) -> timedelta:
    if key not in entry:
        return default
    value = entry[key]
    # TOML booleans are not integers, and a fractional leeway is a typo.
    if type(value) is not int:
        raise ConfigurationError(
            f"{where}.{key} is {printable(value, 40)}, expected an integer number of seconds"
        )
    if abs(value) > 10**9:
        raise ConfigurationError(f"{where}.{key} is {value}, far outside any sensible range")
    return timedelta(seconds=value)


# --------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, slots=True, eq=False)
class OidcKeySet:
    """The signing keys of one issuer, from one JWK Set, valid from construction.

    ``keys`` maps ``kid`` to a public key (RSA of 2048-8192 bits, or EC on P-256/P-384/P-521);
    ``algorithms`` holds the ``alg`` a JWK declared for its key (RFC 7517 §4.4), which tokens
    must then use. ``skipped`` lists the JWK entries that were ignored, for logs and alerts.
    Direct construction raises :class:`~broker.errors.UnavailableError`
    (``oidc_jwks.invalid_key``) for a key outside that policy.
    """

    keys: Mapping[str, JwtAuthority] = field(default_factory=dict)
    algorithms: Mapping[str, str] = field(default_factory=dict)
    skipped: tuple[SkippedKey, ...] = ()

    def __post_init__(self) -> None:
        keys = dict(self.keys)
        for kid, key in keys.items():
            if not is_safe_kid(kid):
                _invalid_key(f"kid {printable(kid, 64)} is not a safe token")
            problem = _key_problem(key)
            if problem is not None:
                _invalid_key(f"kid {kid}: {problem[1]}")
        algorithms = dict(self.algorithms)
        for kid, alg in algorithms.items():
            spec = OIDC_ALGORITHMS.get(alg)
            if kid not in keys or spec is None or not key_fits_algorithm(keys[kid], spec):
                _invalid_key(f"kid {printable(kid, 64)} is bound to unusable alg {alg!r}")
        object.__setattr__(self, "keys", MappingProxyType(keys))
        object.__setattr__(self, "algorithms", MappingProxyType(algorithms))
        object.__setattr__(self, "skipped", tuple(self.skipped))


def _invalid_key(detail: str) -> NoReturn:
    raise UnavailableError(
        f"OIDC key set holds an invalid key: {detail}", reason="oidc_jwks.invalid_key"
    )


def _key_problem(key: object) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``key`` may not verify ID tokens, else ``None``."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return (
                "oidc_jwk.rsa_too_small",
                f"RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} are required",
            )
        if key.key_size > MAX_RSA_BITS:
            # Verification cost grows with the modulus; the cap bounds CPU per token.
            return (
                "oidc_jwk.rsa_too_large",
                f"RSA key has {key.key_size} bits, at most {MAX_RSA_BITS} are accepted",
            )
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _ALLOWED_CURVE_NAMES:
            return (
                "oidc_jwk.ec_curve_unsupported",
                f"EC key is on {printable(key.curve.name, 40)}, expected P-256, P-384 or P-521",
            )
        return None
    return ("oidc_jwk.kty_unsupported", f"key of type {type(key).__name__} is neither RSA nor EC")


class _Skip(Exception):  # noqa: N818 - control flow inside the parser, never escapes it
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_jwks(issuer: str, detail: str, reason: str) -> NoReturn:
    raise UnavailableError(
        f"JWKS of OIDC issuer {printable(issuer, 80)} rejected: {detail}",
        reason=f"oidc_jwks.{reason}",
    )


def parse_oidc_jwks(
    issuer: str,
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
    max_keys: int = DEFAULT_MAX_JWKS_KEYS,
) -> OidcKeySet:
    """Parse the JWK Set ``data`` (RFC 7517 §5) published by ``issuer``.

    The whole document is **rejected** (:class:`~broker.errors.UnavailableError`,
    ``oidc_jwks.*``; the caller keeps its last good key set) when it is larger than
    ``max_bytes``, not strict UTF-8 JSON (duplicate members included), has no ``keys`` array,
    a ``keys`` element that is not an object, more than ``max_keys`` entries, or two signing
    entries with the same ``kid`` (which key is meant would be ambiguous).

    One entry is **ignored** (recorded in :attr:`OidcKeySet.skipped` with an ``oidc_jwk.*``
    reason) when: ``use`` is present and not ``sig`` (RFC 7517 §4.2); ``key_ops`` is present
    without ``verify`` (§4.3); it has no ``kid`` or an unsafe one (tokens are matched by
    ``kid`` only); ``kty`` is missing, ``oct`` or anything but ``RSA``/``EC``; it carries
    private members; the key is RSA below 2048 bits or EC off P-256/P-384/P-521 or malformed;
    its ``alg`` is outside :data:`OIDC_ALGORITHMS` or does not fit the key. ``x5c``, ``x5t``
    and other members are never used: the key is ``n``/``e`` or ``crv``/``x``/``y``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        _reject_jwks(issuer, f"JWKS must be bytes, got {type(data).__name__}", "malformed_json")
    if len(data) > max_bytes:
        _reject_jwks(
            issuer, f"JWKS is {len(data)} bytes, the limit is {max_bytes}; not parsed", "too_large"
        )
    try:
        document = loads_strict_json(bytes(data))
    except StrictJsonError as exc:
        if exc.reason == "duplicate":
            _reject_jwks(issuer, f"JWKS JSON has a {exc}", "duplicate_member")
        _reject_jwks(issuer, f"not strict JSON: {printable(str(exc), 120)}", "malformed_json")
    if not isinstance(document, dict):
        _reject_jwks(issuer, "JWKS is not a JSON object", "not_an_object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        _reject_jwks(issuer, "JWKS has no 'keys' array (RFC 7517 §5.1: REQUIRED)", "keys_missing")
    if len(entries) > max_keys:
        _reject_jwks(
            issuer, f"JWKS has {len(entries)} keys, the limit is {max_keys}", "too_many_keys"
        )
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            _reject_jwks(issuer, f"keys[{index}] is not a JWK object", "key_not_an_object")
    # Counted before any per-entry check: two signing entries naming one kid make the
    # publisher's intent ambiguous even when one of them would be ignored.
    signing_kids = Counter(
        e["kid"] for e in entries if isinstance(e.get("kid"), str) and e.get("use", "sig") == "sig"
    )
    duplicates = sorted(kid for kid, count in signing_kids.items() if count > 1)
    if duplicates:
        _reject_jwks(
            issuer,
            f"kid {printable(duplicates[0], 64)} names more than one signing key",
            "duplicate_kid",
        )

    keys: dict[str, JwtAuthority] = {}
    algorithms: dict[str, str] = {}
    skipped: list[SkippedKey] = []
    for index, entry in enumerate(entries):
        try:
            kid, key, alg = _signing_key(entry)
        except _Skip as skip:
            skipped.append(SkippedKey(index, skip.reason, skip.detail))
            continue
        keys[kid] = key
        if alg is not None:
            algorithms[kid] = alg
    return OidcKeySet(keys=keys, algorithms=algorithms, skipped=tuple(skipped))


def _signing_key(entry: dict[str, Any]) -> tuple[str, JwtAuthority, str | None]:
    use = entry.get("use")
    if use is not None and use != "sig":
        raise _Skip("oidc_jwk.not_for_signatures", f"entry has use {printable(use, 40)}, not sig")
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise _Skip(
            "oidc_jwk.not_for_signatures",
            f"entry has key_ops {printable(key_ops, 60)} without verify",
        )
    kid = entry.get("kid")
    if kid is None:
        raise _Skip("oidc_jwk.kid_missing", "entry has no kid; tokens find keys by kid only")
    if not is_safe_kid(kid):
        raise _Skip(
            "oidc_jwk.kid_malformed",
            f"kid {printable(kid, 64)} is not 1-128 characters of [A-Za-z0-9._-]",
        )
    kty = entry.get("kty")
    if kty is None:
        raise _Skip("oidc_jwk.kty_missing", "entry has no kty (RFC 7517 §4.1: REQUIRED)")
    if kty not in ("RSA", "EC"):
        raise _Skip(
            "oidc_jwk.kty_unsupported", f"entry has kty {printable(kty, 40)}, expected RSA or EC"
        )
    private = sorted(_PRIVATE_MEMBERS.intersection(entry))
    if private:
        raise _Skip(
            "oidc_jwk.private_material",
            f"entry carries private key members {private}: the key is compromised, ignored",
        )
    key: JwtAuthority = _rsa_key(entry) if kty == "RSA" else _ec_key(entry)
    problem = _key_problem(key)
    if problem is not None:
        raise _Skip(*problem)
    alg = entry.get("alg")
    if alg is not None:
        spec = OIDC_ALGORITHMS.get(alg) if isinstance(alg, str) else None
        if spec is None or not key_fits_algorithm(key, spec):
            raise _Skip(
                "oidc_jwk.alg_mismatch",
                f"entry declares alg {printable(alg, 40)}, not an allowed alg for a {kty} key",
            )
    return kid, key, alg


def _rsa_key(entry: dict[str, Any]) -> rsa.RSAPublicKey:
    try:
        return rsa_public_key(entry)
    except JwkKeyError as exc:
        raise _Skip(f"oidc_jwk.{exc.code}", exc.detail) from None


def _ec_key(entry: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    try:
        return ec_public_key(entry)
    except JwkKeyError as exc:
        raise _Skip(f"oidc_jwk.{exc.code}", exc.detail) from None


# --------------------------------------------------------------------------------------------
# Verifier


@dataclass(frozen=True, slots=True)
class OidcIssuer:
    """One configured issuer as the verifier sees it now: its settings and installed keys.

    ``key_set`` and ``keys_fetched_at`` are ``None`` until the adapter installs the first key
    set; until then every token of this issuer fails closed (``oidc.keys_unavailable``).
    """

    config: OidcIssuerConfig
    key_set: OidcKeySet | None = None
    keys_fetched_at: datetime | None = None

    @property
    def issuer(self) -> str:
        """The issuer identifier, compared exactly with ``iss``."""
        return self.config.issuer

    @property
    def keys(self) -> Mapping[str, JwtAuthority]:
        """The installed keys by ``kid`` (empty before the first install)."""
        return MappingProxyType({}) if self.key_set is None else self.key_set.keys


class OidcVerifier:
    """Verifies OIDC ID tokens from the configured ``issuers`` (OIDC Core §3.1.3.7).

    Each issuer's keys are installed (whole, replacing the previous set: a key the IdP removed
    stops verifying) with :meth:`install_keys`. A token is judged only against the settings
    and keys of the issuer its ``iss`` names. ``max_token_bytes`` is checked on the length
    before any parsing. Construction raises :class:`~broker.errors.ConfigurationError` for two
    configurations of one issuer or a budget outside [256, 1 MiB].
    """

    def __init__(
        self,
        *,
        issuers: Iterable[OidcIssuerConfig],
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    ) -> None:
        if isinstance(max_token_bytes, bool) or not isinstance(max_token_bytes, int):
            raise ConfigurationError(f"max_token_bytes is {max_token_bytes!r}, expected an int")
        if not 256 <= max_token_bytes <= 1024 * 1024:
            raise ConfigurationError(
                f"max_token_bytes is {max_token_bytes}, expected between 256 and 1048576"
            )
        states: dict[str, OidcIssuer] = {}
        for config in issuers:
            if not isinstance(config, OidcIssuerConfig):
                raise ConfigurationError(f"issuer entry is a {type(config).__name__}")
            if config.issuer in states:
                raise ConfigurationError(f"oidc issuer {config.issuer!r} is configured twice")
            states[config.issuer] = OidcIssuer(config)
        self._max_token_bytes = max_token_bytes
        # Swapped whole on every install, so one verification reads one consistent snapshot.
        self._issuers: Mapping[str, OidcIssuer] = MappingProxyType(states)

    @property
    def issuers(self) -> Mapping[str, OidcIssuer]:
        """Every configured issuer and its current keys, by issuer identifier."""
        return self._issuers

    def install_keys(self, issuer: str, key_set: OidcKeySet, *, fetched_at: datetime) -> None:
        """Make ``key_set`` the complete key set of ``issuer``, fetched at ``fetched_at``."""
        if not isinstance(fetched_at, datetime) or fetched_at.utcoffset() is None:
            raise TypeError(f"fetched_at must be a timezone-aware datetime, got {fetched_at!r}")
        current = self._issuers.get(issuer)
        if current is None:
            raise ConfigurationError(
                f"cannot install keys for {printable(issuer, 80)}: not a configured issuer"
            )
        updated = dict(self._issuers)
        updated[issuer] = replace(current, key_set=key_set, keys_fetched_at=fetched_at)
        self._issuers = MappingProxyType(updated)

    def issuer_of(self, token: object) -> str | None:
        """The configured issuer a bearer token claims to come from, or ``None``. Unverified.

        For routing only: a token naming a configured issuer goes to :meth:`verify`, anything
        else to the JWT-SVID verifier, and each verifier then checks everything. Lying here
        gains nothing: a JWT-SVID dressed up with a configured ``iss`` fails OIDC verification,
        and an ID token with another ``iss`` fails JWT-SVID verification. Bounded by the same
        size budget as :meth:`verify` and never raises.
        """
        if not isinstance(token, str) or len(token) > self._max_token_bytes:
            return None
        if token.count(".") != 2:
            return None
        try:
            payload = b64url_segment(token.split(".")[1], "payload", reject=_reject)
            claims = strict_json_object(payload, "payload", reject=_reject)
        except OidcTokenRejectedError:
            return None
        iss = claims.get("iss")
        return iss if isinstance(iss, str) and iss in self._issuers else None

    def verify(self, token: str, *, now: datetime) -> tuple[HumanIdentity, Mapping[str, Any]]:
        """Verify ``token`` at ``now`` (timezone-aware).

        Returns the person it proves and its verified claims (read-only), which
        :meth:`broker.core.roles.RoleMap.roles_for_human` maps to roles.
        """
        if not isinstance(now, datetime) or now.utcoffset() is None:
            raise TypeError(f"now must be a timezone-aware datetime, got {now!r}")
        header_b64, payload_b64, signature_b64 = self._split(token)
        header_raw = b64url_segment(header_b64, "header", reject=_reject)
        payload_raw = b64url_segment(payload_b64, "payload", reject=_reject)
        signature = b64url_segment(signature_b64, "signature", reject=_reject)

        header = strict_json_object(header_raw, "header", reject=_reject)
        alg_name, kid = _check_header(header)
        claims = strict_json_object(payload_raw, "payload", reject=_reject)

        state = self._issuer_for(claims)
        config = state.config
        # §3.1.3.7 step 7: the alg SHOULD be the one registered for the client; the issuer's
        # allow-list is that registration, checked before any key is looked up.
        if alg_name not in config.algorithms:
            _reject(
                f"alg {alg_name} is not accepted from {printable(config.issuer, 80)} "
                f"(configured: {', '.join(sorted(config.algorithms))})",
                "alg_not_allowed_for_issuer",
            )
        _check_audience(claims, config.audience)
        subject = _check_subject(claims)
        exp = _check_times(claims, now.timestamp(), config)

        key = self._key_for(state, kid, alg_name, now)
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        try:
            valid = _SIGNERS[alg_name].verify(signing_input, key, signature)
        except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
            valid = False
        if not valid:
            _reject(
                f"{alg_name} signature does not verify with kid {kid} of "
                f"{printable(config.issuer, 80)}",
                "signature_invalid",
            )

        identity = HumanIdentity(
            issuer=config.issuer,
            subject=subject,
            display=_display(claims, config.display_claims, subject),
            expires_at=datetime.fromtimestamp(exp, UTC),
            groups=_groups(claims.get(config.groups_claim)),
        )
        return identity, MappingProxyType(claims)

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
                "token is JWS JSON serialization; an ID token is a compact JWS "
                "(OIDC Core §2: signed using JWS compact serialization)",
                "json_serialization",
            )
        # str.count is linear and allocation-free; split only once the count is right.
        dots = token.count(".")
        if dots != 2:
            _reject(
                f"token has {dots + 1} dot-separated segments, expected 3 "
                "(JWS compact serialization; an encrypted ID token has 5 and is not supported)",
                "segment_count",
            )
        header_b64, payload_b64, signature_b64 = token.split(".")
        return header_b64, payload_b64, signature_b64

    def _issuer_for(self, claims: Mapping[str, Any]) -> OidcIssuer:
        if "iss" not in claims:
            _reject("token has no iss claim (OIDC Core §2: REQUIRED)", "iss_missing")
        iss = claims["iss"]
        if not isinstance(iss, str):
            _reject(f"iss is a {type(iss).__name__}, expected a string", "iss_malformed")
        # §3.1.3.7 step 2: the issuer MUST exactly match; no normalisation (case, slash).
        state = self._issuers.get(iss)
        if state is None:
            _reject(
                f"iss {printable(iss, 80)} is not a configured issuer "
                f"(configured: {printable(sorted(self._issuers), 160)})",
                "iss_unknown",
            )
        return state

    def _key_for(self, state: OidcIssuer, kid: str, alg_name: str, now: datetime) -> JwtAuthority:
        config = state.config
        shown = printable(config.issuer, 80)
        if state.key_set is None or state.keys_fetched_at is None:
            raise UnavailableError(
                f"no keys are installed yet for OIDC issuer {shown}; failing closed",
                reason="oidc.keys_unavailable",
            )
        age = now - state.keys_fetched_at
        if age > config.max_key_age:
            raise UnavailableError(
                f"keys of OIDC issuer {shown} were fetched {age} ago, beyond the limit of "
                f"{config.max_key_age}; failing closed",
                reason="oidc.keys_stale",
            )
        # Only the keys of the issuer the token names: a key of issuer B never verifies a
        # token claiming issuer A, whatever kid it carries.
        key = state.key_set.keys.get(kid)
        if key is None:
            _reject(
                f"kid {kid} is not a key of {shown} ({len(state.key_set.keys)} keys)",
                "kid_unknown",
            )
        if not key_fits_algorithm(key, OIDC_ALGORITHMS[alg_name]):
            _reject(
                f"alg {alg_name} does not fit the {type(key).__name__} named by kid {kid}",
                "alg_key_mismatch",
            )
        declared = state.key_set.algorithms.get(kid)
        if declared is not None and declared != alg_name:
            _reject(
                f"kid {kid} is bound to alg {declared} by its JWK, token says {alg_name}",
                "alg_key_mismatch",
            )
        return key


def _check_header(header: Mapping[str, Any]) -> tuple[str, str]:
    return check_jws_header(
        header,
        allowed_headers=_ALLOWED_HEADERS,
        allowed_typ=_ALLOWED_TYP,
        algorithms=OIDC_ALGORITHMS,
        header_rule="only alg, kid, typ and x5t are allowed",
        typ_rule="JWT",
        reject=_reject,
    )


def _check_audience(claims: Mapping[str, Any], audience: str) -> None:
    if "aud" not in claims:
        _reject("token has no aud claim (OIDC Core §2: REQUIRED)", "aud_missing")
    aud = claims["aud"]
    audiences = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(audiences, list)
        or not audiences
        or not all(isinstance(a, str) and a for a in audiences)
    ):
        _reject(
            f"aud is {printable(aud, 80)}, expected a non-empty string or a non-empty array of "
            "non-empty strings",
            "aud_malformed",
        )
    # §3.1.3.7 step 3: aud MUST contain the client id (exact, case-sensitive).
    if audience not in audiences:
        _reject(f"aud {printable(audiences, 120)} does not contain {audience!r}", "aud_mismatch")
    azp = claims.get("azp")
    if "azp" in claims and not isinstance(azp, str):
        _reject(f"azp is {printable(azp, 60)}, expected a string", "azp_malformed")
    # §3.1.3.7 steps 4-5: with several audiences the authorized party must be us, or another
    # audience's client could replay a token it was given. With one audience (ours) a
    # different azp is the cross-client case (e.g. Google's Android-to-backend flow) and is
    # accepted.
    if len(audiences) > 1:
        if azp is None:
            _reject(
                f"aud has {len(audiences)} values and there is no azp to say which client the "
                "token was issued to",
                "azp_missing",
            )
        if azp != audience:
            _reject(
                f"aud has {len(audiences)} values and azp is {printable(azp, 80)}, "
                f"expected {audience!r}",
                "azp_mismatch",
            )


def _check_subject(claims: Mapping[str, Any]) -> str:
    if "sub" not in claims:
        _reject("token has no sub claim (OIDC Core §2: REQUIRED)", "sub_missing")
    sub = claims["sub"]
    # OIDC Core §2: a locally unique identifier of at most 255 ASCII characters. Control
    # characters would reach principal ids, audit events and logs.
    if (
        not isinstance(sub, str)
        or not sub
        or len(sub) > MAX_SUB_CHARS
        or not sub.isascii()
        or not sub.isprintable()
    ):
        _reject(
            f"sub is {printable(sub, 60)}, expected 1-{MAX_SUB_CHARS} printable ASCII characters",
            "sub_invalid",
        )
    return sub


def _check_times(claims: Mapping[str, Any], now_ts: float, config: OidcIssuerConfig) -> int:
    # OIDC Core §2: exp and iat are REQUIRED; a token without them has no bounded lifetime.
    if "exp" not in claims:
        _reject("token has no exp claim (OIDC Core §2: REQUIRED)", "exp_missing")
    if "iat" not in claims:
        _reject("token has no iat claim (OIDC Core §2: REQUIRED)", "iat_missing")
    exp = numeric_date(claims, "exp", reject=_reject)
    iat = numeric_date(claims, "iat", reject=_reject)
    nbf = numeric_date(claims, "nbf", reject=_reject) if "nbf" in claims else None
    leeway = config.leeway.total_seconds()
    # §3.1.3.7 step 9: the current time MUST be before exp.
    if exp + leeway <= now_ts:
        _reject(
            f"token expired: exp {exp} plus leeway {leeway:g}s is not after now {now_ts:.0f}",
            "expired",
        )
    if nbf is not None and nbf - leeway > now_ts:
        _reject(
            f"token not valid yet: nbf {nbf} minus leeway {leeway:g}s is after now {now_ts:.0f}",
            "not_yet_valid",
        )
    # §3.1.3.7 step 10: iat can bound how old a token may be; an iat in the future would also
    # shrink the measured lifetime below the real remaining validity.
    if iat - leeway > now_ts:
        _reject(
            f"token issued in the future: iat {iat} minus leeway {leeway:g}s is after now "
            f"{now_ts:.0f}",
            "iat_in_future",
        )
    for name, moment in (("iat", iat), ("nbf", nbf)):
        if moment is not None and moment > exp:
            _reject(f"{name} {moment} is after exp {exp}: never valid", "exp_before_start")
    lifetime = exp - iat
    if lifetime > config.max_lifetime.total_seconds():
        _reject(
            f"token lifetime {lifetime}s (exp {exp} minus iat {iat}) exceeds the maximum "
            f"{config.max_lifetime.total_seconds():.0f}s for this issuer",
            "lifetime_too_long",
        )
    return exp


def _display(claims: Mapping[str, Any], names: Sequence[str], subject: str) -> str:
    # For audit and logs only, never for authorisation; escaped and truncated because the
    # user may have chosen it.
    for name in names:
        value = claims.get(name)
        if isinstance(value, str) and value:
            return printable(value, _MAX_DISPLAY_CHARS)
    return printable(subject, _MAX_DISPLAY_CHARS)


def _groups(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(group, str) for group in value):
        return tuple(value)
    return ()
