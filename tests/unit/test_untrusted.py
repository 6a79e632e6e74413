"""Untrusted values are rendered as one short, escaped line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.untrusted import printable


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("line\nbreak", "line\\nbreak"),
        ("carriage\rreturn", "carriage\\rreturn"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("caf\u00e9", "caf\\xe9"),
        ("rtl\u202eoverride", "rtl\\u202eoverride"),
        (b"bytes", "b'bytes'"),
    ],
)
def test_control_and_non_ascii_characters_are_escaped(value: object, expected: str) -> None:
    assert printable(value) == expected


def test_a_100_kb_value_is_truncated_and_says_by_how_much() -> None:
    rendered = printable("A" * 100_000, limit=50)
    assert rendered == "A" * 50 + "…(+99950 chars)"


@given(st.text())
def test_output_is_always_one_printable_ascii_line(text: str) -> None:
    rendered = printable(text, limit=80)
    assert "\n" not in rendered
    assert "\r" not in rendered
    assert rendered.replace("…", "").isascii()
    assert all(ch.isprintable() for ch in rendered)
    assert len(rendered) <= 80 + len("…(+999999999 chars)")
