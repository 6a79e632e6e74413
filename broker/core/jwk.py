"""Public keys from JWK members (RFC 7517/7518), shared by the SPIFFE bundle and OIDC parsers.

Only what both need: RSA and EC (P-256/384/521) public keys built from strict, unpadded
base64url members. A problem raises :class:`JwkKeyError` with a short code (``rsa_malformed``,
``ec_curve_unsupported``, ``ec_malformed``); each parser maps it to its own reason prefix and
decides whether the entry is skipped or the document rejected.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.core.untrusted import printable

JWK_CURVES: Final[Mapping[str, tuple[ec.EllipticCurve, int]]] = MappingProxyType(
    {
        "P-256": (ec.SECP256R1(), 32),
        "P-384": (ec.SECP384R1(), 48),
        "P-521": (ec.SECP521R1(), 66),
    }
)
_B64URL_CHARS: Final = re.compile(r"[A-Za-z0-9_-]+")


class JwkKeyError(Exception):
    """A JWK's key members are unusable; ``code`` is stable, ``detail`` escaped."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def b64url_member(entry: Mapping[str, Any], name: str, code: str) -> bytes:
    """The bytes of member ``name``: a string of unpadded base64url (RFC 7518 §6)."""
    value = entry.get(name)
    if not isinstance(value, str) or len(value) % 4 == 1 or _B64URL_CHARS.fullmatch(value) is None:
        raise JwkKeyError(code, f"member {name!r} is missing or not unpadded base64url")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def rsa_public_key(entry: Mapping[str, Any]) -> rsa.RSAPublicKey:
    """The RSA public key of ``n`` and ``e``; an even modulus or exponent is never a key."""
    n = int.from_bytes(b64url_member(entry, "n", "rsa_malformed"), "big")
    e = int.from_bytes(b64url_member(entry, "e", "rsa_malformed"), "big")
    if n % 2 == 0 or e % 2 == 0:
        raise JwkKeyError("rsa_malformed", "RSA modulus or exponent is even")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise JwkKeyError("rsa_malformed", f"RSA key is invalid: {exc}") from None


def ec_public_key(entry: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    """The EC public key of ``crv``, ``x`` and ``y`` on P-256, P-384 or P-521."""
    crv = entry.get("crv")
    if not isinstance(crv, str) or crv not in JWK_CURVES:
        raise JwkKeyError(
            "ec_curve_unsupported",
            f"EC key has crv {printable(crv, 40)}, expected P-256, P-384 or P-521",
        )
    curve, size = JWK_CURVES[crv]
    x = b64url_member(entry, "x", "ec_malformed")
    y = b64url_member(entry, "y", "ec_malformed")
    # RFC 7518 §6.2.1.2: coordinates are the full octet length of the curve.
    if len(x) != size or len(y) != size:
        raise JwkKeyError(
            "ec_malformed",
            f"EC coordinates are {len(x)} and {len(y)} bytes, expected {size} for {crv}",
        )
    try:
        # Refuses points off the curve and the point at infinity.
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except ValueError as exc:
        raise JwkKeyError("ec_malformed", f"EC point is invalid: {exc}") from None
