"""The reconciler's inventory of task tokens (``VaultMinter.task_tokens``) against a scripted
OpenBao HTTP layer: tokens revoked while the inventory reads (OpenBao then answers 400, or 403
for a token being revoked) are skipped; a policy that denies every lookup is an error, never an
empty inventory."""

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
