"""Readiness aggregates checks: slow or failing ones count as not ready, with a reason."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp.test_utils import TestClient, TestServer

from broker.core.authn import CallerAuthenticator
from broker.core.bundle import TrustStore
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.ports import CheckResult
from broker.core.roles import RoleMap
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import LedgerUnavailableError
from broker.http.app import create_app
from broker.service import Readiness

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FixedClock:
    def now(self) -> datetime:
        return NOW


class StaticCheck:
    def __init__(self, name: str, ok: bool) -> None:
        self.name = name
        self._ok = ok

    async def check(self, now: datetime) -> CheckResult:
        assert now == NOW
        return CheckResult(self.name, ok=self._ok, detail="fine" if self._ok else "broken")


class RaisingCheck:
    name = "ledger"

    async def check(self, now: datetime) -> CheckResult:
        raise LedgerUnavailableError("Redis is unreachable (ConnectionError)")


class SlowCheck:
    name = "slow"

    async def check(self, now: datetime) -> CheckResult:
        await asyncio.sleep(10)
        return CheckResult(self.name, ok=True, detail="late")


def _no_auth() -> CallerAuthenticator:
    """An authenticator that trusts nothing (these tests only touch public paths)."""
    store = TrustStore()
    return CallerAuthenticator(
        x509_svids=TrustStoreX509Authenticator(trust_store=store),
        jwt_svids=JwtSvidVerifier(audience="tasklease", trust_store=store),
        oidc=None,
        roles=RoleMap((), ()),
    )


async def test_all_ok_is_ready() -> None:
    readiness = Readiness(
        checks=[StaticCheck("a", True), StaticCheck("b", True)],
        clock=FixedClock(),
        timeout_seconds=1,
    )
    assert (await readiness.report()).ready is True


async def test_a_raising_or_slow_check_is_not_ready_with_its_reason() -> None:
    readiness = Readiness(
        checks=[StaticCheck("a", True), RaisingCheck(), SlowCheck()],
        clock=FixedClock(),
        timeout_seconds=0.05,
    )
    report = await readiness.report()
    assert report.ready is False
    assert {r.name: (r.ok, r.detail) for r in report.results} == {
        "a": (True, "fine"),
        "ledger": (False, "Redis is unreachable (ConnectionError)"),
        "slow": (False, "no answer within 0.05 s"),
    }


async def test_readyz_answers_503_with_each_check_and_healthz_200() -> None:
    readiness = Readiness(
        checks=[StaticCheck("a", True), StaticCheck("b", False)],
        clock=FixedClock(),
        timeout_seconds=1,
    )
    async with TestClient(
        TestServer(create_app(readiness=readiness, authenticator=_no_auth(), now=FixedClock().now))
    ) as client:
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert await ready.json() == {
            "status": "not_ready",
            "checks": {"a": {"ok": True, "detail": "fine"}, "b": {"ok": False, "detail": "broken"}},
        }
        health = await client.get("/healthz")
        assert (health.status, await health.json()) == (200, {"status": "ok"})


async def test_unauthenticated_requests_are_401_problem_json_even_for_unknown_routes() -> None:
    """Nothing beyond the public paths answers before authentication (no route probing)."""
    readiness = Readiness(checks=[], clock=FixedClock(), timeout_seconds=1)
    async with TestClient(
        TestServer(create_app(readiness=readiness, authenticator=_no_auth(), now=FixedClock().now))
    ) as client:
        response = await client.get("/v1/nope", headers={"X-Request-Id": "req-1"})
        assert response.status == 401
        assert response.content_type == "application/problem+json"
        body = await response.json()
        assert (body["status"], body["code"], body["reason"], body["request_id"]) == (
            401,
            "unauthenticated",
            "auth.missing",
            "req-1",
        )
