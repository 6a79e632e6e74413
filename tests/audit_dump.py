"""Copy the audit streams out of Redis into files, so the end-of-session secret scan covers
what the suite recorded in Redis as well as on disk (SECURITY 38), and check the hash chains
of the audit files the suite's brokers wrote."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import redis
import redis.exceptions

from broker.adapters.audit_sinks import read_jsonl_records
from broker.core.audit_chain import Finding, verify_records


def dump_audit_streams(redis_url: str, directory: Path, *, attempts: int = 20) -> list[Path]:
    """Write every Redis stream whose key contains ``audit`` to ``directory/<key>.jsonl``
    (one stored record per line, as stored); the files written. A Redis that is still
    starting (a fault test restarted it, it is loading its AOF) is waited for."""
    for attempt in range(attempts):
        try:
            return _dump(redis_url, directory)
        except redis.exceptions.ConnectionError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    return []


def _dump(redis_url: str, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    written: list[Path] = []
    try:
        for key in sorted(client.scan_iter(match="*audit*", _type="STREAM", count=1000)):
            path = directory / (re.sub(r"[^A-Za-z0-9._-]", "_", str(key)) + ".jsonl")
            start = "-"
            with path.open("a", encoding="utf-8") as out:
                while True:
                    entries: list[Any] = list(
                        client.xrange(key, min=start, max="+", count=1000) or []
                    )
                    for _, fields in entries:
                        # One entry per group commit: fields r0, r1, … hold the records.
                        numbered = sorted(
                            (int(name[1:]), value)
                            for name, value in fields.items()
                            if re.fullmatch(r"r[0-9]+", name)
                        )
                        if len(numbered) != len(fields):
                            out.write(json.dumps(fields) + "\n")
                        for _, value in numbered:
                            out.write(f"{value}\n")
                    if len(entries) < 1000:
                        break
                    start = f"({entries[-1][0]}"
            written.append(path)
    finally:
        client.close()
    return written


def verify_audit_files(paths: list[Path]) -> list[tuple[Path, Finding]]:
    """Every hash-chain finding in the given audit files (each verified on its own)."""
    return [
        (path, finding)
        for path in paths
        if path.is_file()
        for finding in verify_records(read_jsonl_records(path)).findings
    ]
