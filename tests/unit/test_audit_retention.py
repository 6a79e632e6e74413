"""``audit.redis.retention_days``: its settings (default, bounds, together with ``maxlen``) and
the commands the Redis audit sink sends for each bound (a recording pipeline; the real
trimming is tested on the stack's Redis in tests/integration/test_audit_retention.py)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from broker import cli_audit
from broker.adapters.audit_redis import RedisStreamAuditSink, StreamHead
from broker.adapters.audit_sinks import SealedRecord
from broker.cli import app
from broker.config import load_settings
from broker.core.audit import AgentToolCall, AuditEvent
from broker.core.audit_chain import ChainHead, seal
from broker.errors import AuditUnavailableError, ConfigurationError

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("TASKLEASE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_the_default_keeps_everything(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().audit.redis.retention_days == 0
    clean_env.setenv("TASKLEASE_CONFIG", str(Path("config/broker.toml").resolve()))
    redis = load_settings().audit.redis
    assert (redis.retention_days, redis.maxlen, redis.index_ttl_days) == (0, 0, 90)


@pytest.mark.parametrize("days", ["1", "30", "3650"])
def test_a_retention_in_bounds_is_taken(clean_env: pytest.MonkeyPatch, days: str) -> None:
    clean_env.setenv("TASKLEASE_AUDIT__REDIS__RETENTION_DAYS", days)
    assert load_settings().audit.redis.retention_days == int(days)


@pytest.mark.parametrize(
    ("days", "why"),
    [
        ("-1", "greater than or equal to 0"),
        ("3651", "less than or equal to 3650"),
        ("1.5", "valid integer"),
        ("week", "valid integer"),
    ],
)
def test_a_retention_out_of_bounds_names_the_key(
    clean_env: pytest.MonkeyPatch, days: str, why: str
) -> None:
    clean_env.setenv("TASKLEASE_AUDIT__REDIS__RETENTION_DAYS", days)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert (
        "audit.redis.retention_days (TASKLEASE_AUDIT__REDIS__RETENTION_DAYS): Input should be "
        in str(refused.value)
    )
    assert why in str(refused.value)


def test_retention_and_maxlen_may_both_be_set(clean_env: pytest.MonkeyPatch) -> None:
    """Both apply (the sink sends MINID on the XADD and MAXLEN as an XTRIM, below)."""
    clean_env.setenv("TASKLEASE_AUDIT__REDIS__RETENTION_DAYS", "30")
    clean_env.setenv("TASKLEASE_AUDIT__REDIS__MAXLEN", "500000")
    redis = load_settings().audit.redis
    assert (redis.retention_days, redis.maxlen) == (30, 500_000)


class Recorder:
    """Stands in for redis-py's client: records what a pipeline would send."""

    def __init__(self, version: str = "7.0.15") -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.version = version

    def pipeline(self, *, transaction: bool) -> Recorder:
        return self

    def xadd(self, key: str, fields: dict[str, str], **options: Any) -> None:
        self.sent.append(("XADD", key, options))

    def xtrim(self, key: str, **options: Any) -> None:
        self.sent.append(("XTRIM", key, options))

    def expire(self, key: str, seconds: int) -> None:
        self.sent.append(("EXPIRE", key, {"seconds": seconds}))

    async def execute(self, *, raise_on_error: bool) -> list[Any]:
        return ["1-0" for _ in self.sent]

    async def type(self, key: str) -> str:
        return "none"

    async def info(self, section: str) -> dict[str, str]:
        return {"redis_version": self.version}


def sink(recorder: Recorder, **options: Any) -> RedisStreamAuditSink:
    return RedisStreamAuditSink(
        client=cast(aioredis.Redis, recorder), stream="tl:audit", now=lambda: NOW, **options
    )


RECORD = SealedRecord(record={"workflow_id": "wf-1", "seq": 0}, line='{"seq":0}')
CUT = f"{int((NOW - timedelta(days=30)).timestamp() * 1000)}-0"


@pytest.mark.parametrize(
    ("options", "main"),
    [
        ({}, [("XADD", {})]),
        ({"maxlen": 1000}, [("XADD", {"maxlen": 1000, "approximate": True})]),
        (
            {"retention": timedelta(days=30)},
            [("XADD", {"minid": CUT, "approximate": True})],
        ),
        (
            {"retention": timedelta(days=30), "maxlen": 1000},
            [
                ("XADD", {"minid": CUT, "approximate": True}),
                ("XTRIM", {"maxlen": 1000, "approximate": True}),
            ],
        ),
    ],
)
async def test_each_bound_is_sent_with_the_group_commit(
    options: dict[str, Any], main: list[tuple[str, dict[str, Any]]]
) -> None:
    recorder = Recorder()
    await sink(recorder, **options).write([RECORD])
    assert [(command, opts) for command, key, opts in recorder.sent if key == "tl:audit"] == main
    # The run's copy is never trimmed, only expired.
    assert [(c, o) for c, k, o in recorder.sent if k == "tl:audit:run:wf-1"] == [
        ("XADD", {}),
        (
            "EXPIRE",
            {"seconds": int(timedelta(days=30 if "retention" in options else 90).total_seconds())},
        ),
    ]


@pytest.mark.parametrize(
    ("retention", "index_ttl", "run_ttl"),
    [
        (None, timedelta(days=90), timedelta(days=90)),
        (timedelta(days=7), timedelta(days=90), timedelta(days=7)),
        (timedelta(days=365), timedelta(days=90), timedelta(days=90)),
        (timedelta(0), timedelta(days=90), timedelta(days=90)),
    ],
)
def test_a_run_copy_does_not_outlive_the_retention(
    retention: timedelta | None, index_ttl: timedelta, run_ttl: timedelta
) -> None:
    built = sink(Recorder(), retention=retention, index_ttl=index_ttl)
    assert built.run_ttl == run_ttl


def test_the_bounds_in_words() -> None:
    assert sink(Recorder()).bounds == "every entry (never trimmed)"
    assert sink(Recorder(), retention=timedelta(days=1)).bounds == "1 day (MINID ~)"
    assert (
        sink(Recorder(), retention=timedelta(days=30), maxlen=5).bounds
        == "30 days (MINID ~) and 5 entries (MAXLEN ~)"
    )


async def test_a_retention_needs_redis_6_2() -> None:
    with pytest.raises(AuditUnavailableError, match=r"needs Redis >= 6\.2.*Redis 6\.0\.16"):
        await sink(Recorder("6.0.16"), retention=timedelta(days=30)).probe()
    assert "keeps 30 days" in await sink(Recorder("6.2.0"), retention=timedelta(days=30)).probe()
    # Without a retention any version will do (nothing asks).
    assert (
        await sink(Recorder("6.0.16")).probe()
        == "stream tl:audit, keeps every entry (never trimmed)"
    )


def _chain_from(first: int, count: int) -> list[tuple[str, object]]:
    head = ChainHead.start("w-unit")
    records: list[tuple[str, object]] = []
    for seq in range(first + count):
        event = AuditEvent(
            event_id=f"evt_{seq}",
            time=NOW,
            actor="spiffe://td/a/b",
            payload=AgentToolCall(tool="t"),
        )
        record, head = seal(event.as_dict(), head)
        if seq >= first:
            records.append((f"{seq}-0.0", record))
    return records


@pytest.mark.parametrize(
    ("head", "hint"),
    [
        (StreamHead("tl:audit", 3, 9, True), "tl:audit looks trimmed: its 6 oldest entries"),
        (StreamHead("tl:audit", 3, None, None), "Redis does not say whether tl:audit was trimmed"),
        (StreamHead("tl:audit", 3, 9, False), None),  # XDEL past the head: not trimming
        (StreamHead("tl:audit", 3, 3, True), None),  # nothing removed
    ],
)
def test_verify_names_the_flag_only_for_a_stream_that_lost_its_head(
    monkeypatch: pytest.MonkeyPatch, head: StreamHead, hint: str | None
) -> None:
    """A chain starting after seq 0 on a stream whose oldest entries (and only those) are gone
    reads as trimming: the finding says so and names ``--allow-trimmed-head``."""
    monkeypatch.setattr(cli_audit, "_records", lambda *_a, **_k: _chain_from(3, 3))

    async def stream_head(stream: str | None) -> StreamHead:
        return head

    monkeypatch.setattr(cli_audit, "_redis_head", stream_head)
    result = CliRunner().invoke(app, ["audit", "verify"])
    assert result.exit_code == cli_audit.EXIT_TAMPERED
    [finding] = [line for line in result.output.splitlines() if line.startswith("HEAD_MISSING")]
    if hint is None:
        assert "--allow-trimmed-head" not in result.output
    else:
        assert hint in finding
        assert finding.endswith("verify with --allow-trimmed-head")
    assert CliRunner().invoke(app, ["audit", "verify", "--allow-trimmed-head"]).exit_code == 0


def test_a_bad_genesis_gets_no_trimming_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trimming drops whole entries; it never leaves a seq 0 with another prev_hash."""
    records = _chain_from(0, 2)
    forged = dict(cast(dict[str, Any], records[0][1]), prev_hash="0" * 64)
    monkeypatch.setattr(cli_audit, "_records", lambda *_a, **_k: [("0-0.0", forged)])

    async def stream_head(stream: str | None) -> StreamHead:
        return StreamHead("tl:audit", 1, 9, True)

    monkeypatch.setattr(cli_audit, "_redis_head", stream_head)
    result = CliRunner().invoke(app, ["audit", "verify", "--allow-trimmed-head"])
    assert result.exit_code == cli_audit.EXIT_TAMPERED
    assert "BAD_GENESIS at 0-0.0: writer w-unit seq 0" in result.output
    assert "looks trimmed" not in result.output
