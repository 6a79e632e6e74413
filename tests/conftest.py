"""Shared fixtures: the real local stack (started once per session) and a broker on it.

Locally, a machine without the stack's binaries skips the stack tests with the reason. In CI
(``TASKLEASE_REQUIRE_STACK=1``) a missing part fails them instead: nothing is skipped there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import pytest
import redis.exceptions
import structlog

from broker.bootstrap import log_processors
from broker.devstack import DevStack, missing_parts
from tests.audit_dump import dump_audit_streams, verify_audit_files
from tests.secret_scan import scan_paths

REQUIRE_STACK = os.environ.get("TASKLEASE_REQUIRE_STACK") == "1"

# Everything the suite logs lands here and is scanned for secrets when the session ends
# (SECURITY.md 38): the broker's structlog JSON, the standard library's records, and the logs
# of OpenBao, SPIRE, Redis and PostgreSQL.
LOG_DIR = Path(os.environ.get("TASKLEASE_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="tl-test-logs-"))
# The audit trail the suite's brokers write: their JSONL file, and (copied out of Redis before
# the stack stops) the audit streams. Both are scanned with the logs; the file's hash chains
# must verify.
AUDIT_DIR = LOG_DIR / "audit"
AUDIT_FILE = AUDIT_DIR / "brokers.jsonl"
AUDIT_DUMP_ERRORS: list[str] = []
KNOWN_SECRETS: list[str] = []
_log_file: IO[str] | None = None


def remember_secret(value: str) -> str:
    """Register a secret the suite handled: the final log scan fails if it shows up anywhere."""
    KNOWN_SECRETS.append(value)
    return value


def pytest_configure(config: pytest.Config) -> None:
    global _log_file  # noqa: PLW0603 - one log file per test session
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    _log_file = (LOG_DIR / "broker.jsonl").open("a", encoding="utf-8")
    structlog.configure(
        processors=log_processors(),
        logger_factory=structlog.WriteLoggerFactory(file=_log_file),
        cache_logger_on_first_use=False,
    )
    handler = logging.FileHandler(LOG_DIR / "stdlib.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _log_file is not None:
        _log_file.flush()
    findings = scan_paths([LOG_DIR], known=KNOWN_SECRETS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    tampered = verify_audit_files([AUDIT_FILE])
    if tampered or AUDIT_DUMP_ERRORS:
        if reporter is not None:
            for path, broken in tampered[:20]:
                reporter.write_line(f"AUDIT CHAIN: {path}: {broken.kind.value}: {broken.detail}")
            for error in AUDIT_DUMP_ERRORS:
                reporter.write_line(f"AUDIT DUMP: {error}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if findings:
        if reporter is not None:
            reporter.write_line(f"SECRET SCAN: {len(findings)} finding(s) in the logs of this run:")
            for finding in findings[:50]:
                reporter.write_line(f"  {finding.path}:{finding.line}: {finding.kind}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        files = sum(1 for p in LOG_DIR.rglob("*") if p.is_file())
        reporter.write_line(
            f"secret scan: {files} log files in {LOG_DIR}, {len(KNOWN_SECRETS)} known secrets, "
            "no findings"
        )


def _stack_or_skip() -> None:
    missing = missing_parts()
    if not missing:
        return
    message = "the real stack is not installed here: " + "; ".join(missing)
    if REQUIRE_STACK:
        pytest.fail(f"TASKLEASE_REQUIRE_STACK=1 but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def stack() -> Iterator[DevStack]:
    """OpenBao, SPIRE server + agent, Redis and PostgreSQL on free loopback ports."""
    _stack_or_skip()
    runtime = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    dev = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m", runtime_dir=runtime)
    try:
        endpoints = dev.start()
        for secret in (
            endpoints.openbao_root_token,
            endpoints.openbao_unseal_key,
            endpoints.postgres_superuser_password,
            endpoints.redis_url.split("@")[0].rsplit(":", 1)[-1],
        ):
            remember_secret(secret)
        yield dev
    finally:
        if dev.endpoints is not None:
            try:
                try:
                    dump_audit_streams(dev.endpoints.redis_url, AUDIT_DIR / "redis", attempts=4)
                except redis.exceptions.ConnectionError:
                    # A fault test restarted Redis from a worker thread, and PR_SET_PDEATHSIG
                    # ended it with that thread. Its AOF holds the streams: start it again.
                    dev.restart_redis()
                    dump_audit_streams(dev.endpoints.redis_url, AUDIT_DIR / "redis")
            except Exception as exc:  # noqa: BLE001 - reported, and the session fails
                AUDIT_DUMP_ERRORS.append(
                    f"cannot copy the audit streams out of Redis: {type(exc).__name__}: {exc}"
                )
        dev.stop()
        # Keep the services' logs for the secret scan; drop everything else (stack.json holds
        # the dev secrets).
        if (runtime / "logs").exists():
            shutil.copytree(runtime / "logs", LOG_DIR / "stack", dirs_exist_ok=True)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def broker_env(stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment (for this test only) that points broker settings at the stack."""
    endpoints = stack.endpoints
    assert endpoints is not None
    env = {
        "SPIFFE_ENDPOINT_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_SPIFFE__TRUST_DOMAIN": endpoints.trust_domain,
        "TASKLEASE_SPIFFE__WORKLOAD_API_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_VAULT__ADDR": endpoints.openbao_addr,
        "TASKLEASE_REDIS__URL": endpoints.redis_url,
        "TASKLEASE_SERVER__PORT": "0",
        "TASKLEASE_SERVER__READINESS_TIMEOUT_SECONDS": "3",
        "TASKLEASE_AUDIT__FILE__PATH": str(AUDIT_FILE),
        # Stack tests run at any hour; the working-hours policies (confidential targets, off-hours
        # production) are tested at fixed times in tests/unit/test_policy.py and the policy cases.
        "TASKLEASE_POLICY__WORKING_HOURS_START_UTC": "0",
        "TASKLEASE_POLICY__WORKING_HOURS_END_UTC": "24",
        # The session's tests share the demo agent's identity for hundreds of credentials (about
        # 700 in a full run, in bursts), most left to their TTL; the limits themselves are
        # tested with their own identities and values (tests/integration/test_issuance_limits.py).
        "TASKLEASE_ISSUANCE__LIVE_CREDENTIALS_PER_IDENTITY": "100000",
        "TASKLEASE_ISSUANCE__CREDENTIALS_PER_IDENTITY_PER_MINUTE": "0",
        "TASKLEASE_ISSUANCE__RUNS_PER_IDENTITY_PER_MINUTE": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
async def running_broker(broker_env: dict[str, str]) -> AsyncIterator[object]:
    """A broker serving HTTPS on a free port, against the stack."""
    from broker.bootstrap import start_broker
    from broker.config import load_settings

    broker = await start_broker(load_settings())
    try:
        yield broker
    finally:
        await broker.stop()
