"""SPIFFE IDs and trust domain names, strict per the SPIFFE-ID specification.

``py-spiffe``'s ``SpiffeId`` accepts ``spiffe://a.test/w\\n`` and has no length cap, so the
broker parses IDs itself. A :class:`SpiffeId` or :class:`TrustDomain` is valid from
construction: there is no way to hold an invalid one.

Rules (SPIFFE-ID §2): scheme exactly ``spiffe`` (lowercase); trust domain of lowercase letters,
digits, ``.``, ``-``, ``_``, at most 255 bytes, no port, no userinfo; path segments of letters,
digits, ``.``, ``-``, ``_``, none empty, none ``.`` or ``..``, no trailing ``/``; no query, no
fragment, no percent-encoding; the whole ID at most 2048 bytes. Beyond the letter of the spec
the broker refuses IP-literal trust domains (a trust domain names an organisation, not a host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.core.untrusted import printable
from broker.errors import SpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID §2.3: URIs longer than 2048 bytes MUST NOT be used
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID §2.1: trust domain names are at most 255 bytes

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# IPv4 literals as inet_aton and URL parsers read them: 1 to 4 decimal, octal or hex parts,
# with or without a trailing dot ("127.0.0.1", "2130706433", "0x7f.1", "127.0.0.1.").
_IPV4_LIKE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a bare trust domain name or a ``spiffe://<td>`` root ID."""
        if not isinstance(text, str):
            raise SpiffeIdError(
                f"trust domain must be a string, got {type(text).__name__}",
                reason="spiffe_id.not_a_string",
            )
        if text.startswith(SCHEME_PREFIX):
            spiffe_id = SpiffeId.parse(text)
            if not spiffe_id.is_root:
                raise SpiffeIdError(
                    f"expected a trust domain, got the workload ID {printable(text)}",
                    reason="spiffe_id.not_a_trust_domain",
                )
            return spiffe_id.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The root SPIFFE ID ``spiffe://<name>`` of this trust domain."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a (possibly empty) path of ``/segment`` parts."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        _check_path(self.path, whole=f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}")
        total = len(SCHEME_PREFIX) + len(self.trust_domain.name) + len(self.path.encode())
        if total > MAX_ID_BYTES:
            raise SpiffeIdError(
                f"SPIFFE ID is {total} bytes long, the maximum is {MAX_ID_BYTES}",
                reason="spiffe_id.too_long",
            )

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust domain><path>``; raise :class:`SpiffeIdError` if invalid."""
        if not isinstance(text, str):
            raise SpiffeIdError(
                f"SPIFFE ID must be a string, got {type(text).__name__}",
                reason="spiffe_id.not_a_string",
            )
        # Length first, before any other work on a possibly huge value.
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise SpiffeIdError(
                f"SPIFFE ID is {size} bytes long, the maximum is {MAX_ID_BYTES}",
                reason="spiffe_id.too_long",
            )
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(
                f"SPIFFE ID {printable(text)} does not start with {SCHEME_PREFIX!r} "
                "(the scheme is lowercase 'spiffe')",
                reason="spiffe_id.bad_scheme",
            )
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        td_name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        return cls(TrustDomain(td_name), path)

    @property
    def is_root(self) -> bool:
        """True for ``spiffe://<td>`` itself, which names the trust domain, not a workload."""
        return self.path == ""

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        """True when this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"


def _check_trust_domain(name: object) -> None:
    if not isinstance(name, str):
        raise SpiffeIdError(
            f"trust domain must be a string, got {type(name).__name__}",
            reason="spiffe_id.not_a_string",
        )
    if name == "":
        raise SpiffeIdError("trust domain is empty", reason="spiffe_id.empty_trust_domain")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(
            f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes",
            reason="spiffe_id.trust_domain_too_long",
        )
    if not _TRUST_DOMAIN_CHARS.fullmatch(name):
        raise SpiffeIdError(
            f"trust domain {printable(name)} has a character outside [a-z0-9._-] "
            "(uppercase, port, userinfo, percent-encoding, query and fragment are not allowed)",
            reason="spiffe_id.bad_trust_domain_char",
        )
    if _IPV4_LIKE.fullmatch(name):
        raise SpiffeIdError(
            f"trust domain {printable(name)} is an IP literal, expected a name",
            reason="spiffe_id.ip_literal_trust_domain",
        )


def _check_path(path: object, *, whole: str) -> None:
    if not isinstance(path, str):
        raise SpiffeIdError(
            f"SPIFFE ID path must be a string, got {type(path).__name__}",
            reason="spiffe_id.not_a_string",
        )
    if path == "":
        return
    if not path.startswith("/"):
        raise SpiffeIdError(
            f"SPIFFE ID path {printable(path)} must start with '/'",
            reason="spiffe_id.bad_path",
        )
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError(
                f"SPIFFE ID {printable(whole)} has an empty path segment or a trailing '/'",
                reason="spiffe_id.empty_segment",
            )
        if segment in {".", ".."}:
            raise SpiffeIdError(
                f"SPIFFE ID {printable(whole)} has a '.' or '..' path segment",
                reason="spiffe_id.dot_segment",
            )
        if not _SEGMENT_CHARS.fullmatch(segment):
            raise SpiffeIdError(
                f"SPIFFE ID {printable(whole)} has a path character outside [A-Za-z0-9._-] "
                "(percent-encoding, query, fragment, whitespace and control characters are "
                "not allowed)",
                reason="spiffe_id.bad_path_char",
            )
