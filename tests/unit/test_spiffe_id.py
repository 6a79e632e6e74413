"""SPIFFE ID and trust domain parsing: SECURITY.md item 10, one defect per table row."""

from __future__ import annotations

import string
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core.spiffe_id import MAX_ID_BYTES, MAX_TRUST_DOMAIN_BYTES, SpiffeId, TrustDomain
from broker.core.untrusted import DEFAULT_LIMIT, printable
from broker.errors import SpiffeIdError

LONG_PATH = "/" + "a" * (MAX_ID_BYTES - len("spiffe://a.test/") + 1)
LONG_TD = "a" * (MAX_TRUST_DOMAIN_BYTES + 1)

INVALID_IDS: list[tuple[str, str, str]] = [
    # scheme: exactly "spiffe://", lowercase
    ("empty", "", "bad_scheme"),
    ("uppercase scheme", "SPIFFE://a.test/w", "bad_scheme"),
    ("mixed-case scheme", "Spiffe://a.test/w", "bad_scheme"),
    ("one slash", "spiffe:/a.test/w", "bad_scheme"),
    ("other scheme", "https://a.test/w", "bad_scheme"),
    ("leading space", " spiffe://a.test/w", "bad_scheme"),
    # trust domain
    ("no trust domain", "spiffe:///w", "empty_trust_domain"),
    ("scheme only", "spiffe://", "empty_trust_domain"),
    ("uppercase trust domain", "spiffe://A.test/w", "bad_trust_domain_char"),
    ("uppercase TLD", "spiffe://a.TEST/w", "bad_trust_domain_char"),
    ("port", "spiffe://a.test:8443/w", "bad_trust_domain_char"),
    ("userinfo", "spiffe://admin@a.test/w", "bad_trust_domain_char"),
    ("userinfo with password", "spiffe://admin:pw@a.test/w", "bad_trust_domain_char"),
    ("percent-encoded trust domain", "spiffe://a%2etest/w", "bad_trust_domain_char"),
    ("query after trust domain", "spiffe://a.test?x=1", "bad_trust_domain_char"),
    ("fragment after trust domain", "spiffe://a.test#x", "bad_trust_domain_char"),
    ("non-ASCII trust domain", "spiffe://ä.test/w", "bad_trust_domain_char"),
    ("NUL in trust domain", "spiffe://a.test\x00/w", "bad_trust_domain_char"),
    ("LF in trust domain", "spiffe://a.test\n/w", "bad_trust_domain_char"),
    ("IPv6 literal", "spiffe://[::1]/w", "bad_trust_domain_char"),
    ("IPv4 literal", "spiffe://127.0.0.1/w", "ip_literal_trust_domain"),
    ("IPv4 literal, trailing dot", "spiffe://127.0.0.1./w", "ip_literal_trust_domain"),
    ("IPv4 shorthand", "spiffe://10.1/w", "ip_literal_trust_domain"),
    ("IPv4 as one integer", "spiffe://2130706433/w", "ip_literal_trust_domain"),
    ("IPv4 in hex", "spiffe://0x7f.0.0.1/w", "ip_literal_trust_domain"),
    ("trust domain over 255 bytes", f"spiffe://{LONG_TD}/w", "trust_domain_too_long"),
    # path
    ("trailing slash", "spiffe://a.test/w/", "empty_segment"),
    ("slash only", "spiffe://a.test/", "empty_segment"),
    ("empty segment", "spiffe://a.test/a//b", "empty_segment"),
    ("leading empty segment", "spiffe://a.test//w", "empty_segment"),
    ("dot segment", "spiffe://a.test/./w", "dot_segment"),
    ("dot-dot segment", "spiffe://a.test/x/../admin", "dot_segment"),
    ("final dot-dot", "spiffe://a.test/w/..", "dot_segment"),
    ("percent-encoding", "spiffe://a.test/%61dmin", "bad_path_char"),
    ("percent-encoded slash", "spiffe://a.test/a%2Fb", "bad_path_char"),
    ("query", "spiffe://a.test/w?admin=1", "bad_path_char"),
    ("fragment", "spiffe://a.test/w#admin", "bad_path_char"),
    ("non-ASCII path", "spiffe://a.test/é", "bad_path_char"),
    ("right-to-left override", "spiffe://a.test/w\u202e", "bad_path_char"),
    ("lone surrogate", "spiffe://a.test/\ud800", "bad_path_char"),
    ("NUL", "spiffe://a.test/w\x00", "bad_path_char"),
    ("trailing LF", "spiffe://a.test/w\n", "bad_path_char"),
    ("CR LF", "spiffe://a.test/w\r\nx", "bad_path_char"),
    ("ESC", "spiffe://a.test/w\x1b[2J", "bad_path_char"),
    ("space", "spiffe://a.test/w x", "bad_path_char"),
    ("backslash", "spiffe://a.test/w\\x", "bad_path_char"),
    # length: SPIFFE-ID §2.3 counts bytes
    ("ID over 2048 bytes", f"spiffe://a.test{LONG_PATH}", "too_long"),
    ("ID over 2048 bytes, under 2048 chars", "spiffe://a.test/" + "é" * 1100, "too_long"),
    ("100 KB ID", "spiffe://a.test/" + "a" * 100_000, "too_long"),
]


@pytest.mark.parametrize(
    ("text", "reason"),
    [pytest.param(text, reason, id=name) for name, text, reason in INVALID_IDS],
)
def test_invalid_spiffe_id_is_rejected_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(text)
    assert (caught.value.reason, caught.value.status) == (f"spiffe_id.{reason}", 401)


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://a.test", "a.test", ""),
        ("spiffe://a.test/w", "a.test", "/w"),
        ("spiffe://example.org/ns/prod/sa/default", "example.org", "/ns/prod/sa/default"),
        ("spiffe://a-b_c.d0/A-Z_0.9", "a-b_c.d0", "/A-Z_0.9"),
        ("spiffe://xn--4ca.test/w", "xn--4ca.test", "/w"),
        ("spiffe://1a.test/w", "1a.test", "/w"),
        ("spiffe://a.test/.hidden/...", "a.test", "/.hidden/..."),
        (f"spiffe://{'a' * MAX_TRUST_DOMAIN_BYTES}/w", "a" * MAX_TRUST_DOMAIN_BYTES, "/w"),
        ("spiffe://a.test" + LONG_PATH[:-1], "a.test", LONG_PATH[:-1]),
    ],
    ids=[
        "root",
        "one segment",
        "kubernetes style",
        "every allowed character",
        "punycode",
        "label starting with a digit",
        "dots inside segments",
        "255-byte trust domain",
        "exactly 2048 bytes",
    ],
)
def test_valid_spiffe_id_is_accepted(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert (spiffe_id.trust_domain.name, spiffe_id.path, str(spiffe_id)) == (
        trust_domain,
        path,
        text,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a.test", "a.test"), ("spiffe://a.test", "a.test")],
    ids=["bare name", "root ID"],
)
def test_trust_domain_parses_from_a_name_or_a_root_id(text: str, expected: str) -> None:
    assert TrustDomain.parse(text) == TrustDomain(expected)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("spiffe://a.test/w", "not_a_trust_domain"),
        ("A.test", "bad_trust_domain_char"),
        ("", "empty_trust_domain"),
        (LONG_TD, "trust_domain_too_long"),
        ("10.0.0.1", "ip_literal_trust_domain"),
    ],
    ids=["workload ID", "uppercase", "empty", "over 255 bytes", "IP literal"],
)
def test_invalid_trust_domain_is_rejected_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        TrustDomain.parse(text)
    assert caught.value.reason == f"spiffe_id.{reason}"


@pytest.mark.parametrize("value", [b"spiffe://a.test/w", None, 42], ids=["bytes", "None", "int"])
def test_non_string_is_rejected(value: object) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(value)  # type: ignore[arg-type]
    assert caught.value.reason == "spiffe_id.not_a_string"


A_TEST = TrustDomain("a.test")

DIRECT_CONSTRUCTION: list[tuple[str, Callable[[], object], str]] = [
    ("path without leading slash", lambda: SpiffeId(A_TEST, "w"), "bad_path"),
    ("path with a dot segment", lambda: SpiffeId(A_TEST, "/.."), "dot_segment"),
    ("path over 2048 bytes in all", lambda: SpiffeId(A_TEST, LONG_PATH), "too_long"),
    ("path not a string", lambda: SpiffeId(A_TEST, None), "not_a_string"),  # type: ignore[arg-type]
    ("trust domain not a string", lambda: TrustDomain(b"a.test"), "not_a_string"),  # type: ignore[arg-type]
    ("trust domain text not a string", lambda: TrustDomain.parse(None), "not_a_string"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("construct", "reason"),
    [pytest.param(make, reason, id=name) for name, make, reason in DIRECT_CONSTRUCTION],
)
def test_direct_construction_validates_like_parsing(
    construct: Callable[[], object], reason: str
) -> None:
    """There is no way to hold an invalid SpiffeId or TrustDomain, parsed or built."""
    with pytest.raises(SpiffeIdError) as caught:
        construct()
    assert caught.value.reason == f"spiffe_id.{reason}"


def test_trust_domain_id_is_its_root_spiffe_id() -> None:
    assert A_TEST.id == SpiffeId.parse("spiffe://a.test")


def test_membership_compares_trust_domains() -> None:
    spiffe_id = SpiffeId.parse("spiffe://a.test/w")
    memberships = [spiffe_id.is_member_of(TrustDomain(name)) for name in ("a.test", "b.test")]
    assert memberships == [True, False]


# --- property tests ---------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Labels start with a letter, so no generated name is an IP literal.
labels = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_lowercase),
    st.text(alphabet=string.ascii_lowercase + string.digits + "_-", max_size=15),
)
trust_domain_names = st.lists(labels, min_size=1, max_size=4).map(".".join)
segments = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20)
paths = st.lists(segments.filter(lambda s: s not in {".", ".."}), max_size=6).map(
    lambda parts: "".join(f"/{part}" for part in parts)
)


@PROPERTY_SETTINGS
@given(name=trust_domain_names, path=paths)
def test_generated_valid_id_round_trips_through_its_text(name: str, path: str) -> None:
    spiffe_id = SpiffeId(TrustDomain(name), path)
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


spiffe_like_text = st.one_of(
    st.text(max_size=80),
    st.builds(lambda rest: f"spiffe://{rest}", st.text(max_size=80)),
    st.builds(
        lambda name, rest: f"spiffe://{name}/{rest}",
        trust_domain_names,
        st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from("/.%?#"), max_size=60),
    ),
)


@PROPERTY_SETTINGS
@given(text=spiffe_like_text)
def test_any_text_parses_to_itself_or_raises_spiffe_id_error(text: str) -> None:
    """Never another exception type, and never a normalised (different) ID."""
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        assert exc.reason.startswith("spiffe_id.")
        assert "\n" not in exc.detail
    else:
        assert str(spiffe_id) == text


@PROPERTY_SETTINGS
@given(text=st.text(max_size=80) | trust_domain_names)
def test_any_text_is_a_trust_domain_of_that_name_or_raises_spiffe_id_error(text: str) -> None:
    try:
        trust_domain = TrustDomain.parse(text)
    except SpiffeIdError as exc:
        assert exc.reason.startswith("spiffe_id.")
    else:
        assert trust_domain.name == text.removeprefix("spiffe://")


# --- logs show the escaped, truncated value -----------------------------------------------

HOSTILE_ID = "spiffe://a.test/w\r\n\x1b[31mINFO forged log line\x00\u202e" + "A" * 100_000


def test_printable_renders_a_hostile_id_as_one_escaped_truncated_line() -> None:
    shown = printable(HOSTILE_ID)
    assert (shown.isprintable(), "\n" in shown, "\r" in shown, "\x1b" in shown) == (
        True,
        False,
        False,
        False,
    )
    assert shown.startswith("spiffe://a.test/w\\r\\n\\x1b[31mINFO forged log line\\x00\\u202e")
    assert shown.endswith(f"…(+{len(HOSTILE_ID) - DEFAULT_LIMIT} chars)")
    assert len(shown) < DEFAULT_LIMIT + 30


def test_rejection_detail_of_a_hostile_id_is_one_escaped_line() -> None:
    hostile = "spiffe://a.test/w\r\n\x1b[31mforged\u202e"
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(hostile)
    assert "spiffe://a.test/w\\r\\n\\x1b[31mforged\\u202e" in caught.value.detail
    assert [ch for ch in caught.value.detail if not ch.isprintable()] == []
