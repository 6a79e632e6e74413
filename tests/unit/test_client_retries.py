"""The SDK asks again after transient failures without ever minting twice, and a credential
whose answer was lost is released, not left live with nobody holding its secret. Against a
scripted HTTP server; tests/integration/test_client.py does the same against the real broker."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.client import AgentClient, ApiError, TaskleaseClient

CREDENTIAL = {
    "credential_id": "cred_1",
    "workflow_id": "wf-1",
    "task_id": "t-1",
    "target": "demo-kv",
    "kind": "vault-token",
    "expires_at": "2030-01-01T00:05:00+00:00",
    "ttl_seconds": 300,
    "secret": {"token": "s.not-a-real-token"},
}


class _Auth:
    """Plain HTTP to the scripted server: no certificate, no extra header."""

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context()

    async def headers(self) -> dict[str, str]:
        return {}

    @property
    def broker_id(self) -> str | None:
        return None


def _problem(status: int, code: str, reason: str, **extra: Any) -> web.Response:
    return web.json_response(
        {"code": code, "reason": reason, "detail": reason, **extra},
        status=status,
        content_type="application/problem+json",
    )


class Script:
    """A broker stand-in: each POST /v1/credentials answers the next scripted step."""

    def __init__(self, *steps: Callable[[web.Request], Any]) -> None:
        self.steps = list(steps)
        self.keys: list[str] = []
        self.released: list[str] = []
        self.release_answers: list[web.Response] = []

    async def credentials(self, request: web.Request) -> web.StreamResponse:
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        answer = self.steps.pop(0)(request)
        if answer is None:  # the answer is lost: the connection drops before it is sent
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPInternalServerError
        return answer  # type: ignore[no-any-return]

    async def release(self, request: web.Request) -> web.Response:
        self.released.append(request.match_info["credential_id"])
        if self.release_answers:
            return self.release_answers.pop(0)
        return web.json_response({"complete": True, "still_live": [], "confirmed_revoked": []})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/credentials", self.credentials)
        app.router.add_delete("/v1/credentials/{credential_id}", self.release)
        return app


def minted(credential_id: str = "cred_1") -> Callable[[web.Request], web.Response]:
    return lambda _: web.json_response({**CREDENTIAL, "credential_id": credential_id}, status=201)


def lost(_: web.Request) -> None:
    return None


def unavailable(_: web.Request) -> web.Response:
    response = _problem(503, "vault_unavailable", "vault.unavailable")
    response.headers["Retry-After"] = "0"
    return response


def replayed(credential_id: str) -> Callable[[web.Request], web.Response]:
    return lambda _: _problem(
        409, "idempotency_replayed", "idempotency.replayed", credential_id=credential_id
    )


async def _ask(script: Script, **options: Any) -> tuple[Any, TestServer]:
    server = TestServer(script.app())
    await server.start_server()
    try:
        async with AgentClient(str(server.make_url("")), _Auth(), backoff=0.0) as agent:
            return await agent.request_credential(
                workflow="wf-1", task="t-1", target="demo-kv", **options
            ), server
    finally:
        await server.close()


async def test_a_transient_failure_is_asked_again_with_the_same_key() -> None:
    script = Script(unavailable, lost, minted())
    credential, _ = await _ask(script)
    assert credential.credential_id == "cred_1"
    assert len(script.keys) == 3
    assert len(set(script.keys)) == 1
    assert script.keys[0].startswith("tlk-")
    assert script.released == []


async def test_a_credential_whose_answer_was_lost_is_released_and_asked_again() -> None:
    """The first attempt minted cred_1 but its answer never arrived; the retry with the same
    key learns of it (409 replayed): cred_1 is released and a new key mints cred_2."""
    script = Script(lost, replayed("cred_1"), minted("cred_2"))
    credential, _ = await _ask(script)
    assert credential.credential_id == "cred_2"
    assert script.released == ["cred_1"]
    first, again, fresh = script.keys
    assert first == again != fresh


async def test_a_lost_answer_with_an_approval_is_released_and_reported() -> None:
    """The approval was spent on the lost credential: asking again would be refused."""
    script = Script(lost, replayed("cred_1"))
    with pytest.raises(ApiError) as caught:
        await _ask(script, approval_id="apr_1")
    assert (caught.value.reason, caught.value.problem["credential_id"]) == (
        "client.answer_lost",
        "cred_1",
    )
    assert "approval was spent" in caught.value.detail
    assert script.released == ["cred_1"]


async def test_a_credential_still_being_minted_is_released_once_it_is_issued() -> None:
    script = Script(lost, replayed("cred_1"), minted("cred_2"))
    script.release_answers.append(
        web.json_response(
            {
                "complete": False,
                "still_live": [{"credential_id": "cred_1", "reason": "mint_in_flight"}],
            },
            status=207,
        )
    )
    credential, _ = await _ask(script)
    assert credential.credential_id == "cred_2"
    assert script.released == ["cred_1", "cred_1"]


async def test_a_key_the_caller_reused_is_a_replay_not_a_lost_answer() -> None:
    """The caller's own key produced a credential before this call: nothing of this call was
    lost, so nothing is released."""
    script = Script(replayed("cred_0"))
    with pytest.raises(ApiError) as caught:
        await _ask(script, idempotency_key="caller-key")
    assert caught.value.reason == "idempotency.replayed"
    assert script.keys == ["caller-key"]
    assert script.released == []


async def test_refusals_are_not_asked_again_and_retries_are_bounded() -> None:
    refused = Script(lambda _: _problem(403, "policy_denied", "policy.deny"))
    with pytest.raises(ApiError) as caught:
        await _ask(refused)
    assert (caught.value.status, len(refused.keys)) == (403, 1)

    down = Script(*([unavailable] * 4))
    with pytest.raises(ApiError) as caught:
        await _ask(down)
    assert (caught.value.status, len(down.keys)) == (503, 4)  # the first try and 3 retries


def limited(retry_after: str) -> Callable[[web.Request], web.Response]:
    def answer(_: web.Request) -> web.Response:
        response = _problem(429, "limit_exceeded", "limit.live_per_identity")
        response.headers["Retry-After"] = retry_after
        return response

    return answer


async def test_a_limit_that_frees_soon_is_waited_for_and_one_far_off_is_raised_at_once() -> None:
    soon = Script(limited("0"), minted())
    credential, _ = await _ask(soon)
    assert (credential.credential_id, len(soon.keys)) == ("cred_1", 2)

    far = Script(limited("600"), minted())
    with pytest.raises(ApiError) as caught:
        await _ask(far)
    assert (caught.value.status, caught.value.reason) == (429, "limit.live_per_identity")
    assert len(far.keys) == 1  # not asked again: waiting 30 s would not free a slot


async def test_retry_after_is_honoured_within_bounds() -> None:
    client = TaskleaseClient("http://127.0.0.1:1", _Auth(), backoff=0.25)
    said = ApiError(503, "x", "x", "", {"retry_after": "7"})
    assert client._delay(0, said) == 7.0
    assert client._delay(0, ApiError(503, "x", "x", "", {"retry_after": "3600"})) == 30.0
    plain = ApiError(503, "x", "x", "", {})
    assert 0.125 <= client._delay(0, plain) <= 0.375
    assert 0.5 <= client._delay(2, plain) <= 1.5
    with pytest.raises(ValueError, match="negative"):
        TaskleaseClient("http://x", _Auth(), retries=-1)
