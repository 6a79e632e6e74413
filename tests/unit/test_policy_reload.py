"""Policy lifecycle: a valid new policy set or catalog replaces the one in force (on a file
change or SIGHUP) and the listeners are told; an invalid one keeps the old set, alerts, counts
and shows an alarm on the readiness check, which stays ready."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from broker.core.model import DecisionOutcome, Sensitivity
from broker.core.policy import WorkingHours
from broker.policy_reload import PolicyReadiness, PolicyReloader, PolicyReloadMetrics
from tests.unit.test_policy import make_request, make_target

NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
DENY_DEMO_DB = (
    '@id("demo-db-closed") @reason("closed")\n'
    'forbid (principal, action, resource) when { resource.name == "demo-db" };\n'
)
BROKEN = '@id("broken") permit (principal, action, resource) when { context.nope };\n'


class Clock:
    def now(self) -> datetime:
        return NOW


class Listener:
    def __init__(self) -> None:
        self.policy: list[str] = []
        self.targets: list[tuple[frozenset[str], str]] = []

    async def policy_changed(self, *, trigger: str) -> None:
        self.policy.append(trigger)

    async def targets_changed(self, names: frozenset[str], *, trigger: str) -> None:
        self.targets.append((names, trigger))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    policy_dir = tmp_path / "policies"
    shutil.copytree("config/policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    targets = tmp_path / "targets.toml"
    shutil.copy("config/targets.toml", targets)
    return policy_dir, targets


def reloader_for(
    files: tuple[Path, Path], registry: CollectorRegistry | None = None
) -> PolicyReloader:
    return PolicyReloader.load(
        policy_dir=files[0],
        targets_file=files[1],
        hours=WorkingHours(),
        clock=Clock(),
        metrics=PolicyReloadMetrics(registry),
    )


def outcome(reloader: PolicyReloader) -> DecisionOutcome:
    return reloader.policy.decide(make_request()).outcome


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward (a coarse-mtime filesystem could hide the change)."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_a_valid_new_policy_file_is_put_in_force_and_announced(
    files: tuple[Path, Path],
) -> None:
    reloader = reloader_for(files)
    listener = Listener()
    reloader.listen(listener)
    before = reloader.policy_digest
    assert outcome(reloader) == DecisionOutcome.ALLOW

    write(files[0] / "closed.cedar", DENY_DEMO_DB)
    result = await reloader.reload("file_change", force=False)

    assert (result.policy, result.targets, result.errors) == ("reloaded", "unchanged", ())
    assert outcome(reloader) == DecisionOutcome.DENY
    assert listener.policy == ["file_change"]
    assert before != reloader.policy_digest
    check = await PolicyReadiness(reloader).check(NOW)
    assert (check.ok, check.alarm) == (True, False)


async def test_an_invalid_policy_file_keeps_the_old_set_and_raises_an_alarm(
    files: tuple[Path, Path],
) -> None:
    registry = CollectorRegistry()
    reloader = reloader_for(files, registry)
    listener = Listener()
    reloader.listen(listener)
    before = reloader.policy_digest

    write(files[0] / "broken.cedar", BROKEN)
    with capture_logs() as logs:
        result = await reloader.reload("file_change", force=False)

    assert (result.policy, result.failed) == ("invalid", True)
    assert "broken.cedar: does not match the schema" in result.errors[0]
    assert outcome(reloader) == DecisionOutcome.ALLOW  # the old set decides
    assert (before, []) == (reloader.policy_digest, listener.policy)
    (alert,) = [e for e in logs if e["event"] == "policy.reload_failed"]
    assert (alert["alert"], alert["what"]) == (True, "policy")
    check = await PolicyReadiness(reloader).check(NOW)
    assert (check.ok, check.alarm) == (True, True)
    assert "broken.cedar" in check.detail
    labels = {"what": "policy", "result": "invalid"}
    assert registry.get_sample_value("tasklease_policy_reloads_total", labels) == 1
    assert registry.get_sample_value("tasklease_policy_reload_failing", {"what": "policy"}) == 1

    # The same bad content again: still failing, alerted once.
    with capture_logs() as logs:
        await reloader.reload("sighup")
    assert [e for e in logs if e["event"] == "policy.reload_failed"] == []
    assert registry.get_sample_value("tasklease_policy_reloads_total", labels) == 1

    # Fixed: the new set is loaded and the alarm clears.
    write(files[0] / "broken.cedar", DENY_DEMO_DB)
    result = await reloader.reload("file_change", force=False)
    assert result.policy == "reloaded"
    assert outcome(reloader) == DecisionOutcome.DENY
    check = await PolicyReadiness(reloader).check(NOW)
    assert (check.ok, check.alarm) == (True, False)
    assert registry.get_sample_value("tasklease_policy_reload_failing", {"what": "policy"}) == 0


async def test_a_removed_schema_keeps_the_old_set(files: tuple[Path, Path]) -> None:
    reloader = reloader_for(files)
    (files[0] / "schema.cedarschema").unlink()
    result = await reloader.reload("file_change", force=False)
    assert result.policy == "invalid"
    assert "cannot be read: FileNotFoundError" in result.errors[0]
    assert outcome(reloader) == DecisionOutcome.ALLOW


async def test_reverting_to_the_set_in_force_clears_the_alarm(files: tuple[Path, Path]) -> None:
    reloader = reloader_for(files)
    write(files[0] / "broken.cedar", BROKEN)
    await reloader.reload("file_change", force=False)
    (files[0] / "broken.cedar").unlink()
    result = await reloader.reload("file_change", force=False)
    assert (result.policy, result.failed) == ("unchanged", False)
    assert not (await PolicyReadiness(reloader).check(NOW)).alarm


async def test_touching_a_file_without_changing_it_is_no_change(files: tuple[Path, Path]) -> None:
    reloader = reloader_for(files)
    listener = Listener()
    reloader.listen(listener)
    base = files[0] / "base.cedar"
    write(base, base.read_text())
    result = await reloader.reload("file_change", force=False)
    assert (result.policy, listener.policy) == ("unchanged", [])


async def test_a_poll_reads_nothing_while_stat_is_unchanged(
    files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reloader = reloader_for(files)

    def fail(*args: object) -> None:
        raise AssertionError("read although nothing changed")

    monkeypatch.setattr("broker.policy_reload.read_policy_dir", fail)
    monkeypatch.setattr("broker.policy_reload.read_targets_file", fail)
    result = await reloader.reload("file_change", force=False)
    assert (result.policy, result.targets) == ("unchanged", "unchanged")


async def test_a_changed_target_is_put_in_force_and_announced_by_name(
    files: tuple[Path, Path],
) -> None:
    reloader = reloader_for(files)
    listener = Listener()
    reloader.listen(listener)
    text = files[1].read_text()
    changed = text.replace(
        'sensitivity = "internal"\nmax_ttl = "15m"',
        'sensitivity = "restricted"\nmax_ttl = "15m"',
        1,
    )
    assert changed != text
    write(files[1], changed)

    result = await reloader.reload("sighup")

    assert ("unchanged", "reloaded", frozenset({"demo-db"})) == (
        result.policy,
        result.targets,
        result.changed_targets,
    )
    assert reloader.targets["demo-db"].sensitivity == Sensitivity.RESTRICTED
    assert [(frozenset({"demo-db"}), "sighup")] == listener.targets
    decision = reloader.policy.decide(make_request(target=reloader.targets["demo-db"]))
    assert decision.outcome == DecisionOutcome.NEEDS_APPROVAL


async def test_an_invalid_catalog_keeps_the_old_one(files: tuple[Path, Path]) -> None:
    reloader = reloader_for(files)
    write(files[1], files[1].read_text().replace('max_ttl = "15m"', 'max_ttl = "15 minutes"', 1))
    result = await reloader.reload("file_change", force=False)
    assert (result.targets, result.failed) == ("invalid", True)
    assert "max_ttl must be a duration" in result.errors[0]
    assert "demo-db" in reloader.targets
    check = reloader.check_result()
    assert (check.ok, check.alarm) == (True, True)
    assert "targets files invalid" in check.detail


async def test_a_failing_listener_does_not_undo_the_reload(files: tuple[Path, Path]) -> None:
    class Failing(Listener):
        async def policy_changed(self, *, trigger: str) -> None:
            raise RuntimeError("boom")

    reloader = reloader_for(files)
    reloader.listen(Failing())
    after = Listener()
    reloader.listen(after)
    write(files[0] / "closed.cedar", DENY_DEMO_DB)
    assert (await reloader.reload("sighup")).policy == "reloaded"
    assert after.policy == ["sighup"]
    assert outcome(reloader) == DecisionOutcome.DENY


async def test_the_poll_loop_picks_up_a_change(files: tuple[Path, Path]) -> None:
    reloader = reloader_for(files)
    task = asyncio.create_task(reloader.run(interval=timedelta(milliseconds=20)))
    try:
        write(files[0] / "closed.cedar", DENY_DEMO_DB)
        for _ in range(200):
            if outcome(reloader) is DecisionOutcome.DENY:
                break
            await asyncio.sleep(0.02)
        assert outcome(reloader) == DecisionOutcome.DENY
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_polling_off_returns_at_once(files: tuple[Path, Path]) -> None:
    await asyncio.wait_for(reloader_for(files).run(interval=timedelta(0)), timeout=1)


async def test_sighup_reloads(files: tuple[Path, Path]) -> None:
    """The handler serve_until_signalled installs: SIGHUP → request_reload."""
    reloader = reloader_for(files)
    listener = Listener()
    reloader.listen(listener)
    write(files[0] / "closed.cedar", DENY_DEMO_DB)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.request_reload)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if listener.policy:
                break
            await asyncio.sleep(0.02)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await reloader.close()
    assert listener.policy == ["sighup"]
    assert outcome(reloader) == DecisionOutcome.DENY


def test_an_invalid_set_at_start_up_stops_the_broker(files: tuple[Path, Path]) -> None:
    from broker.errors import ConfigurationError

    write(files[0] / "broken.cedar", BROKEN)
    with pytest.raises(ConfigurationError, match=r"broken\.cedar: does not match the schema"):
        reloader_for(files)


def test_the_live_catalog_is_a_mapping(files: tuple[Path, Path]) -> None:
    reloader = reloader_for(files)
    assert list(reloader.targets) == [
        "demo-db",
        "demo-cert",
        "demo-ssh",
        "demo-kv",
        "legacy-crm",
        "prod-db",
    ]
    assert len(reloader.targets) == 6
    assert make_target().name in reloader.targets


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {
                "TASKLEASE_POLICY__WORKING_HOURS_START_UTC": "8",
                "TASKLEASE_POLICY__WORKING_HOURS_END_UTC": "8",
            },
            "empty window",
        ),
        ({"TASKLEASE_POLICY__WORKING_DAYS": "[0, 1]"}, "working_days must list ISO weekdays"),
        ({"TASKLEASE_POLICY__WORKING_HOURS_END_UTC": "25"}, "policy.working_hours_end_utc"),
        ({"TASKLEASE_POLICY__RELOAD_INTERVAL_SECONDS": "-1"}, "policy.reload_interval_seconds"),
    ],
)
def test_bad_policy_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    from broker.config import load_settings
    from broker.errors import ConfigurationError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigurationError, match=message):
        load_settings()
