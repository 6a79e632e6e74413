"""The reconciler's inventory of task tokens (``VaultMinter.task_tokens``) against a scripted
OpenBao HTTP layer: tokens revoked while the inventory reads (OpenBao then answers 400, or 403
for a token being revoked) are skipped; a policy that denies every lookup is an error, never an
empty inventory. A revoke's confirmation waits out such a 403, or a token still found, briefly
before it calls the token still there."""

from __future__ import annotations

from typing import Any

import pytest

from broker.adapters.vault import VaultMinter
from broker.adapters.vault_http import VaultResponseError
from broker.errors import VaultUnavailableError

_TASK = {"tasklease": "1", "credential_id": "cred_live"}


class ScriptedHttp:
    """``LIST auth/token/accessors`` and one answer per accessor's lookup."""

    def __init__(self, answers: dict[str, dict[str, Any] | VaultResponseError]) -> None:
        self.answers = answers

    async def call(self, what: str, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert (method, path) == ("LIST", "auth/token/accessors")
        return {"data": {"keys": list(self.answers)}}

    async def raw(self, method: str, path: str, *, body: dict[str, str]) -> dict[str, Any]:
        assert (method, path) == ("POST", "auth/token/lookup-accessor")
        answer = self.answers[body["accessor"]]
        if isinstance(answer, VaultResponseError):
            raise answer
        return answer


def _minter(answers: dict[str, dict[str, Any] | VaultResponseError]) -> VaultMinter:
    minter = VaultMinter.__new__(VaultMinter)  # no OpenBao session: the HTTP layer is scripted
    minter._http = ScriptedHttp(answers)  # type: ignore[assignment]
    return minter


def _token(meta: dict[str, str]) -> dict[str, Any]:
    return {"data": {"meta": meta, "creation_time": 1_800_000_000, "expire_time": None}}


async def test_tokens_revoked_while_the_inventory_reads_are_skipped() -> None:
    minter = _minter(
        {
            "acc-broker": _token({}),  # not a task token
            "acc-live": _token(_TASK),
            "acc-gone": VaultResponseError(400, ["invalid accessor"]),
            "acc-revoking": VaultResponseError(403, ["permission denied"]),
        }
    )
    [token] = await minter.task_tokens(limit=100)
    assert (token.accessor, token.credential_id) == ("acc-live", "cred_live")


async def test_a_policy_that_denies_every_lookup_is_an_error_not_an_empty_inventory() -> None:
    denied = VaultResponseError(403, ["permission denied"])
    minter = _minter({"acc-1": denied, "acc-2": denied})
    with pytest.raises(VaultUnavailableError):
        await minter.task_tokens(limit=100)


async def test_other_lookup_failures_fail_the_inventory() -> None:
    minter = _minter(
        {"acc-live": _token(_TASK), "acc-x": VaultResponseError(500, ["internal error"])}
    )
    with pytest.raises(VaultUnavailableError):
        await minter.task_tokens(limit=100)


class RevokingHttp:
    """A revoke, then lookups of the token answered from a script (OpenBao's 403 while the
    revocation runs, then 400 invalid accessor once it is gone)."""

    def __init__(self, lookups: list[VaultResponseError | dict[str, Any]]) -> None:
        self.lookups = lookups
        self.asked = 0

    async def call(self, what: str, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert (method, path) == ("POST", "auth/token/revoke-accessor")
        return {}

    async def raw(self, method: str, path: str, *, body: dict[str, str]) -> dict[str, Any]:
        assert (method, path) == ("POST", "auth/token/lookup-accessor")
        answer = self.lookups[min(self.asked, len(self.lookups) - 1)]
        self.asked += 1
        if isinstance(answer, VaultResponseError):
            raise answer
        return answer


def _revoking(lookups: list[VaultResponseError | dict[str, Any]]) -> tuple[VaultMinter, Any]:
    minter = VaultMinter.__new__(VaultMinter)
    http = RevokingHttp(lookups)
    minter._http = http  # type: ignore[assignment]
    return minter, http


@pytest.fixture
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    async def instantly(_: float) -> None:
        return None

    monkeypatch.setattr("broker.adapters.vault.asyncio.sleep", instantly)


_REVOKING = VaultResponseError(403, ["permission denied"])
_GONE = VaultResponseError(400, ["invalid accessor"])


@pytest.mark.usefixtures("no_pauses")
async def test_a_revocation_still_running_is_confirmed_once_it_ends() -> None:
    minter, http = _revoking([_REVOKING, _REVOKING, _GONE])
    outcome = await minter.revoke(token_accessor="acc-1", vault_lease_ids=())
    assert (outcome.confirmed, outcome.still_live, http.asked) == (True, (), 3)


@pytest.mark.usefixtures("no_pauses")
async def test_a_token_still_found_a_moment_after_its_revocation_is_confirmed_once_gone() -> None:
    minter, http = _revoking([_token(_TASK), _token(_TASK), _GONE])
    outcome = await minter.revoke(token_accessor="acc-1", vault_lease_ids=())
    assert (outcome.confirmed, http.asked) == (True, 3)


@pytest.mark.usefixtures("no_pauses")
async def test_a_token_still_found_is_not_confirmed_and_a_lasting_403_is_an_error() -> None:
    minter, _ = _revoking([_REVOKING, _token(_TASK)])
    outcome = await minter.revoke(token_accessor="acc-1", vault_lease_ids=())
    assert (outcome.confirmed, outcome.still_live) == (False, ("token:acc-1",))
    minter, http = _revoking([_REVOKING])
    with pytest.raises(VaultUnavailableError) as caught:
        await minter.revoke(token_accessor="acc-1", vault_lease_ids=())
    assert caught.value.reason == "vault.forbidden"
    assert http.asked == 6  # the first lookup and five more after pauses
