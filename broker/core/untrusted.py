"""Rendering untrusted values safely for logs, audit events and error messages.

Anything that came from a caller (a SPIFFE ID, a ``kid``, an ``aud``, a library's error text)
is passed through :func:`printable` before it is written anywhere a person or a log parser
reads: control characters (CR, LF, ESC and the rest of C0/C1), and non-ASCII characters are
escaped, and the result is truncated to a fixed budget so one hostile value cannot flood a log.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200
_ELLIPSIS = "…"


def printable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """Return ``value`` as one short line of printable ASCII.

    Non-printable and non-ASCII characters become Python-style escapes (``\\n``, ``\\x1b``,
    ``\\u202e``). At most ``limit`` characters of the escaped form are kept; a truncated value
    ends with ``…(+N chars)`` so a reader knows it was cut and by how much.
    """
    text = value if isinstance(value, str) else repr(value)
    # Escape before truncating would expand a 100 KB value first; cut the raw text to a bound
    # that is surely enough for `limit` escaped characters, then escape, then cut exactly.
    raw = text[: limit + 1]
    escaped = raw.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(_escape_control(ch) for ch in escaped)
    if len(escaped) <= limit and len(text) <= limit:
        return escaped
    return f"{escaped[:limit]}{_ELLIPSIS}(+{max(len(text) - limit, 1)} chars)"


def _escape_control(ch: str) -> str:
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    return ch
