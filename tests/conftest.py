"""Shared fixtures: the real local stack (started once per session) and a broker on it.

Locally, a machine without the stack's binaries skips the stack tests with the reason. In CI
(``TASKLEASE_REQUIRE_STACK=1``) a missing part fails them instead: nothing is skipped there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from broker.devstack import DevStack, missing_parts

REQUIRE_STACK = os.environ.get("TASKLEASE_REQUIRE_STACK") == "1"


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
    dev = DevStack(x509_svid_ttl="1h", jwt_svid_ttl="5m")
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


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
