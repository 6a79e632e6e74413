"""Scan log files for secrets (SECURITY.md 38): known secret values, and shapes of secrets.

Used at the end of every test session over everything the suite logged (the broker's JSON log
and the logs of OpenBao, SPIRE, Redis and PostgreSQL), and tested on its own with planted
secrets so a scanner that finds nothing is known to be able to find something.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Shapes that are secrets wherever they appear in a log.
PATTERNS: dict[str, re.Pattern[str]] = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    # A whole JWS/JWT: three base64url segments, the first two JSON objects ('eyJ' = '{"').
    "whole JWT": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"),
    # OpenBao/Vault service and batch tokens (s./b. legacy, hvs./hvb. current).
    "vault token": re.compile(r"(?<![A-Za-z0-9])(?:hv[sb]|[sb])\.[A-Za-z0-9]{24,}"),
    "password in URL": re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@]*:[^\s/@]{6,}@"),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One secret found: where, and what kind (never the secret itself)."""

    path: Path
    line: int
    kind: str


def scan_text(text: str, *, path: Path, known: Iterable[str] = ()) -> list[Finding]:
    """Findings in ``text``: each known secret value, and each secret-shaped string."""
    findings: list[Finding] = []
    known_values = [value for value in set(known) if len(value) >= 8]
    for number, line in enumerate(text.splitlines(), start=1):
        findings.extend(
            Finding(path, number, f"known secret #{index}")
            for index, value in enumerate(sorted(known_values))
            if value in line
        )
        findings.extend(
            Finding(path, number, kind)
            for kind, pattern in PATTERNS.items()
            if pattern.search(line)
        )
    return findings


def scan_paths(paths: Iterable[Path], *, known: Iterable[str] = ()) -> list[Finding]:
    """Scan every file under ``paths`` (files or directories)."""
    known = list(known)
    findings: list[Finding] = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            text = file.read_text(errors="replace")
            findings.extend(scan_text(text, path=file, known=known))
    return findings
