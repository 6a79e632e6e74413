"""configure_logging: every line the broker prints is one JSON object, structlog's events and
the standard library's records (APScheduler, aiohttp, …) alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from broker.bootstrap import configure_logging


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        # The test session's own configuration (logs to its broker.jsonl), not the defaults.
        structlog.reset_defaults()
        structlog.configure(**config)


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_standard_library_records_are_json_lines(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    logging.getLogger("apscheduler.scheduler").info('Added job "%s" to job store', "sweep")
    logging.getLogger("apscheduler.scheduler").debug("below the level: not printed")
    structlog.get_logger("broker").info("broker.listening", url="https://127.0.0.1:1")
    first, second = _lines(capsys.readouterr().out)
    assert {k: first[k] for k in ("event", "level", "logger")} == {
        "event": 'Added job "sweep" to job store',
        "level": "info",
        "logger": "apscheduler.scheduler",
    }
    assert str(first["timestamp"]).endswith("Z")
    assert (second["event"], second["level"], second["url"]) == (
        "broker.listening",
        "info",
        "https://127.0.0.1:1",
    )


def test_an_exception_is_rendered_inside_the_json_line(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("warning")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    (line,) = _lines(capsys.readouterr().out)
    assert line["level"] == "error"
    assert "RuntimeError: boom" in str(line["exception"])


def test_configuring_twice_keeps_one_handler(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    configure_logging("info")
    logging.getLogger("x").warning("once")
    assert len(_lines(capsys.readouterr().out)) == 1
