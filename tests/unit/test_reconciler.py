"""Reconciler decisions with fakes: what is revoked, kept, skipped, and what a failure does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker.adapters.memory_ledger import InMemoryLedger
from broker.core.model import DelegationChain, Lease, LeaseState, Sensitivity, TargetKind
from broker.core.ports import MintedCredential, MintSpec, RevokeOutcome, TaskToken
from broker.errors import VaultUnavailableError
from broker.reconciler import Reconciler

NOW = datetime(2030, 1, 1, tzinfo=UTC)
OLD = NOW - timedelta(minutes=10)


class Clock:
    def now(self) -> datetime:
        return NOW


class Inventory:
    def __init__(self, *tokens: TaskToken) -> None:
        self.tokens = list(tokens)

    async def task_tokens(self, *, limit: int) -> list[TaskToken]:
        return self.tokens[:limit]


class Minter:
    def __init__(self, outcomes: dict[str, object]) -> None:
        self.outcomes = outcomes
        self.revoked: list[str] = []

    async def mint(self, spec: MintSpec) -> MintedCredential:
        raise AssertionError("the reconciler never mints")

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        outcome = self.outcomes.get(token_accessor, RevokeOutcome(confirmed=True))
        if isinstance(outcome, Exception):
            raise outcome
        self.revoked.append(token_accessor)
        assert isinstance(outcome, RevokeOutcome)
        return outcome


def lease(credential_id: str) -> Lease:
    return Lease(
        credential_id=credential_id,
        workflow_id="wf",
        task_id="t",
        target="demo-db",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.INTERNAL,
        holder="spiffe://a.test/agent/x",
        owner="alice",
        chain=DelegationChain(()),
        issued_at=OLD,
        expires_at=NOW + timedelta(hours=1),
        state=LeaseState.ISSUING,
    )


async def test_decisions_per_token() -> None:
    ledger = InMemoryLedger()
    for item in (lease("c-known"), lease("c-issuing")):
        await ledger.write_ahead(item)
    await ledger.activate("c-known", token_accessor="a-known", vault_lease_ids=())
    tokens = [
        TaskToken("a-known", "c-known", OLD, None),  # recorded → kept
        TaskToken("a-absent", "c-absent", OLD, None),  # unknown credential → revoked
        TaskToken("a-issuing", "c-issuing", OLD, None),  # never recorded its accessor → revoked
        TaskToken("a-nometa", "", OLD, None),  # no credential id → revoked
        TaskToken("a-young", "c-young", NOW, None),  # may be minting right now → skipped
        TaskToken("a-fails", "c-fails", OLD, None),  # Vault error → reported, not revoked
        TaskToken("a-unconfirmed", "c-x", OLD, None),  # revoke not confirmed → failed
    ]
    minter = Minter(
        {
            "a-fails": VaultUnavailableError("sealed", reason="vault.sealed"),
            "a-unconfirmed": RevokeOutcome(confirmed=False, still_live=("token:a-unconfirmed",)),
        }
    )
    reconciler = Reconciler(
        inventory=Inventory(*tokens),
        minter=minter,
        ledger=ledger,
        locks=ledger,
        clock=Clock(),
        grace=timedelta(minutes=2),
    )
    report = await reconciler.reconcile()
    assert report.ran
    assert (report.examined, report.known, report.skipped_recent) == (7, 1, 1)
    assert set(report.revoked) == {"a-absent", "a-issuing", "a-nometa"}
    assert set(report.failed) == {"a-fails", "a-unconfirmed"}


async def test_a_held_lock_means_no_pass() -> None:
    ledger = InMemoryLedger()
    await ledger.try_lock("reconciler", "other", ttl=timedelta(minutes=1))
    minter = Minter({})
    reconciler = Reconciler(
        inventory=Inventory(TaskToken("a", "c", OLD, None)),
        minter=minter,
        ledger=ledger,
        locks=ledger,
        clock=Clock(),
    )
    assert (await reconciler.reconcile()).ran is False
    assert minter.revoked == []
