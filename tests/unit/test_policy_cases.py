"""The declarative policy cases (config/policies/tests/*.toml) run as part of the suite, the
runner reports what differs, a malformed case file is refused by name, and the
``tasklease policy validate`` / ``test`` commands answer with the documented exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.adapters.config_files import load_policy_engine
from broker.cli import EXIT_CONFIG, EXIT_ERROR, app
from broker.errors import ConfigurationError
from broker.policy_cases import PolicyCase, check_case, load_cases, parse_case_file, run_cases

POLICY_DIR = Path("config/policies")
SHIPPED = load_cases(POLICY_DIR / "tests")


@pytest.mark.parametrize("case", SHIPPED, ids=[case.label for case in SHIPPED])
def test_shipped_policy_case(case: PolicyCase) -> None:
    (result,) = run_cases(POLICY_DIR, [case]).results
    assert result.problems == ()


def test_every_shipped_policy_is_exercised_by_a_case() -> None:
    """A default policy without a case that names it is an untested policy."""
    named = {policy_id for case in SHIPPED for policy_id in case.expect.policy_ids or ()}
    shipped = {info.id for info in load_policy_engine(POLICY_DIR).policies}
    assert set() == shipped - named


def _case(**expect: object) -> PolicyCase:
    (case,) = parse_case_file("t.toml", {"case": [{"name": "c", "expect": expect}]})
    return case


@pytest.mark.parametrize(
    ("expect", "problem"),
    [
        ({"outcome": "deny"}, "outcome: expected deny, got allow"),
        ({"outcome": "allow", "policy_ids": ["other"]}, "policy_ids: expected ['other']"),
        ({"outcome": "allow", "max_ttl": "none"}, "max_ttl: expected none, got 3600s"),
        ({"outcome": "allow", "max_ttl": "5m"}, "max_ttl: expected 300s, got 3600s"),
        ({"outcome": "allow", "reason_contains": "zebra"}, "none contains 'zebra'"),
    ],
)
def test_a_case_that_does_not_hold_fails_with_what_differs(
    expect: dict[str, object], problem: str
) -> None:
    result = check_case(load_policy_engine(POLICY_DIR), _case(**expect))
    assert not result.passed
    assert problem in result.problems[0]
    assert result.problems[-1].startswith("the decision's reasons: agent-request")


def test_a_case_that_holds_passes() -> None:
    expect = {"outcome": "allow", "policy_ids": ["agent-request"], "max_ttl": "1h"}
    assert check_case(load_policy_engine(POLICY_DIR), _case(**expect)).passed


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "no \\[\\[case\\]\\] tables"),
        ({"cases": []}, "unknown key\\(s\\) \\['cases'\\]"),
        ({"case": [{"expect": {"outcome": "allow"}}]}, "case\\[0\\]: needs a name"),
        ({"case": [{"name": "a"}]}, "case 'a': needs expect"),
        ({"case": [{"name": "a", "expect": {"outcome": "maybe"}}]}, "expect.outcome must be"),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow", "policy": ["x"]}}]},
            "unknown key\\(s\\) \\['policy'\\]",
        ),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow"}, "taget": {}}]},
            "unknown key\\(s\\) \\['taget'\\]",
        ),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow"}, "target": {"sensitive": "x"}}]},
            "target: unknown key\\(s\\) \\['sensitive'\\]",
        ),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow"}, "ttl": "5 minutes"}]},
            "ttl must be a duration",
        ),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow"}, "now": "noon"}]},
            "now must be a TOML date-time",
        ),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow"}, "target": {"kind": "ftp"}}]},
            "'ftp' is not a valid TargetKind",
        ),
        (
            {"case": [{"name": "a", "expect": {"outcome": "allow"}}] * 2},
            "the name is used twice",
        ),
        (
            {"working_hours": {"start_hour_utc": 8, "end_hour_utc": 8}, "case": [{}]},
            "\\[working_hours\\]: .*empty window",
        ),
    ],
)
def test_a_malformed_case_file_is_refused_by_name(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^t.toml: .*{message}"):
        parse_case_file("t.toml", data)


def test_an_empty_cases_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no policy test cases"):
        load_cases(tmp_path)


# --------------------------------------------------------------------------- the CLI


def _policy_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, directory)
    return directory


def test_cli_validate_accepts_the_shipped_set() -> None:
    result = CliRunner().invoke(app, ["policy", "validate", "--dir", str(POLICY_DIR)])
    assert result.exit_code == 0, result.output
    assert "valid: 10 policies in 6 files" in result.output
    assert "restricted.cedar: restricted-needs-approval (forbid, approval gate)" in result.output


def test_cli_validate_refuses_an_invalid_set_with_exit_3(tmp_path: Path) -> None:
    directory = _policy_copy(tmp_path)
    (directory / "broken.cedar").write_text('@id("b") permit (principal, action, resource) when {')
    result = CliRunner().invoke(app, ["policy", "validate", "--dir", str(directory)])
    assert result.exit_code == EXIT_CONFIG
    assert "broken.cedar: cannot be parsed" in result.output


def test_cli_validate_checks_a_targets_file(tmp_path: Path) -> None:
    bad = tmp_path / "targets.toml"
    bad.write_text("[[target]]\nname = 'x'\n")
    result = CliRunner().invoke(
        app, ["policy", "validate", "--dir", str(POLICY_DIR), "--targets", str(bad)]
    )
    assert result.exit_code == EXIT_CONFIG
    assert "missing key(s)" in result.output


def test_cli_test_runs_the_shipped_cases() -> None:
    result = CliRunner().invoke(app, ["policy", "test", "--dir", str(POLICY_DIR)])
    assert result.exit_code == 0, result.output
    assert f"{len(SHIPPED)} passed, 0 failed" in result.output


def test_cli_test_fails_with_exit_1_when_a_case_does_not_hold(tmp_path: Path) -> None:
    directory = _policy_copy(tmp_path)
    (directory / "closed.cedar").write_text(
        '@id("demo-closed") forbid (principal, action, resource) when { resource.system == '
        '"test-system" };'
    )
    result = CliRunner().invoke(app, ["policy", "test", "--dir", str(directory)])
    assert result.exit_code == EXIT_ERROR
    assert "FAIL an agent of the run's trust domain, no participants listed" in result.output
    assert "outcome: expected allow, got deny" in result.output


def test_cli_test_refuses_a_malformed_case_file_with_exit_3(tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a.toml").write_text('[[case]]\nname = "x"\nexpect = { outcome = "perhaps" }\n')
    result = CliRunner().invoke(
        app, ["policy", "test", "--dir", str(POLICY_DIR), "--cases", str(cases)]
    )
    assert result.exit_code == EXIT_CONFIG
    assert "expect.outcome must be one of" in result.output
