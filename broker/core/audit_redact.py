"""A last line of defence before an audit event is chained: secret-shaped text is redacted.

Events are built from identifiers and metadata and never carry a secret by construction; but
agents report free text (tool calls, side effects) and policy contexts quote what callers
sent. Before chaining, every string in an event is checked for the shapes of secrets
(SECURITY 38: private keys, whole JWTs, Vault/OpenBao tokens, passwords in URLs), and values
under keys that name a secret (``password``, ``secret``, ``private_key``, ``api_key``,
``authorization``, ``token``, ``…_token``) are replaced. Token *accessors* are not secrets
and stay. Pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "[redacted]"

_SHAPES: Final = (
    (
        "private key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE "
            r"KEY-----|\Z)",
            re.DOTALL,
        ),
    ),
    ("jwt", re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")),
    ("vault token", re.compile(r"(?<![A-Za-z0-9])(?:hv[sb]|[sb])\.[A-Za-z0-9_-]{20,}")),
)
_URL_PASSWORD: Final = re.compile(r"([a-z][a-z0-9+.-]*://[^\s/:@]*:)([^\s/@]+)(@)", re.IGNORECASE)
_SECRET_KEY: Final = re.compile(
    r"(?:^|_)(?:password|passwd|secret|private_key|api_key|authorization)(?:$|_)|^token$|_token$",
    re.IGNORECASE,
)


def redact_text(text: str) -> tuple[str, int]:
    """``text`` with every secret-shaped part replaced, and how many were replaced."""
    count = 0
    for kind, pattern in _SHAPES:
        text, found = pattern.subn(f"[redacted {kind}]", text)
        count += found
    text, found = _URL_PASSWORD.subn(rf"\g<1>{REDACTED}\g<3>", text)
    return text, count + found


# Cheap supersets of the shapes and of the secret-naming keys, checked once over the JSON text
# of an event (substring tests first: Python's regex engine is slow on long texts). Only an
# event that trips one of them is walked value by value.
_URL_TRIGGER: Final = re.compile(r"://[^\s/:@\"]*:[^\s/@]*@")
_TOKEN_TRIGGER: Final = re.compile(r"[sb]\.[A-Za-z0-9_-]{20}")
_KEY_WORDS: Final = ("password", "passwd", "secret", "private_key", "api_key", "authorization")
_TOKEN_KEY_TRIGGER: Final = re.compile(r"token(?!_accessor\")[a-z0-9_]*\"\s*:")


def _may_hold_a_secret(text: str) -> bool:
    if "-----BEGIN" in text or "eyJ" in text:
        return True
    if ("s." in text or "b." in text) and _TOKEN_TRIGGER.search(text):
        return True
    if "://" in text and "@" in text and _URL_TRIGGER.search(text):
        return True
    lowered = text.lower()
    if any(word in lowered for word in _KEY_WORDS):
        return True
    return "token" in lowered and _TOKEN_KEY_TRIGGER.search(lowered) is not None


def redact_event(data: Mapping[str, Any], text: str | None = None) -> tuple[dict[str, Any], int]:
    """:func:`redact` for one event's JSON-ready form, fast when there is nothing to redact
    (nearly always): a few substring tests over its JSON ``text`` (serialised here when not
    given) decide whether to walk it."""
    if not _may_hold_a_secret(json.dumps(data) if text is None else text):
        return dict(data), 0
    clean, count = redact(data)
    return clean, count


def redact(value: Any) -> tuple[Any, int]:
    """A copy of ``value`` (JSON-ready data) with secrets redacted, and how many were."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        total = 0
        for key, item in value.items():
            name = str(key)
            secret_like = isinstance(item, str | int | float) and not isinstance(item, bool)
            if secret_like and item != "" and _SECRET_KEY.search(name):
                out[name] = REDACTED
                total += 1
                continue
            out[name], found = redact(item)
            total += found
        return out, total
    if isinstance(value, list | tuple):
        items = []
        total = 0
        for item in value:
            clean, found = redact(item)
            items.append(clean)
            total += found
        return items, total
    return value, 0
