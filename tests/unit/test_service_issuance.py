"""The issuance use case with fakes: in-memory ledger, a fake minter, the real Cedar policies."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.config_files import load_policy_engine, load_target_catalog
from broker.adapters.memory_ledger import InMemoryLedger
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, HumanIdentity, WorkloadIdentity
from broker.core.model import CredentialRequest, Lease, LeaseState
from broker.core.ports import (
    IdempotencyBinding,
    IssuanceLimits,
    LeaseSelector,
    MintedCredential,
    MintSpec,
    RevokeOutcome,
)
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.errors import (
    ConflictError,
    ForbiddenError,
    IdempotentReplayError,
    LedgerUnavailableError,
    MintOutcomeUnknownError,
    NotFoundError,
    PolicyDeniedError,
    UnavailableError,
    VaultUnavailableError,
)
from broker.service import CredentialBroker

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
POLICY = load_policy_engine(Path("config/policies"))
TARGETS = load_target_catalog(Path("config/targets.toml"))


class FrozenClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


class FakeMinter:
    def __init__(
        self, *, fail: Exception | None = None, fail_finish: Exception | None = None
    ) -> None:
        self.fail = fail
        self.fail_finish = fail_finish
        self.finished = 0
        self.minted: list[MintSpec] = []
        self.revoked: list[str] = []

    async def _finish(self) -> None:
        if self.fail_finish is not None:
            raise self.fail_finish
        self.finished += 1

    async def mint(self, spec: MintSpec) -> MintedCredential:
        if self.fail is not None:
            raise self.fail
        self.minted.append(spec)
        return MintedCredential(
            token_accessor=f"acc-{len(self.minted)}",
            vault_lease_ids=("database/creds/x/1",),
            expires_at=NOW + spec.ttl,
            secret={"password": "s3cret"},
            finish=self._finish,
        )

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.revoked.append(token_accessor)
        return RevokeOutcome(confirmed=True)


class FailingActivateLedger(InMemoryLedger):
    async def activate(
        self,
        credential_id: str,
        *,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        written: Lease | None = None,
    ) -> Lease:
        raise LedgerUnavailableError("not acknowledged", reason="ledger.not_acknowledged")


def workload(
    spiffe_id: str,
    *roles: Role,
    method: AuthMethod = AuthMethod.X509_SVID,
    expires: datetime = NOW + timedelta(hours=1),
) -> Caller:
    return Caller(WorkloadIdentity(SpiffeId.parse(spiffe_id), expires, method), frozenset(roles))


AGENT_CALLER = workload(AGENT, Role.AGENT)
ORCH_CALLER = workload(ORCH, Role.ORCHESTRATOR)


def broker(
    *,
    minter: FakeMinter | None = None,
    ledger: InMemoryLedger | None = None,
    clock: FrozenClock | None = None,
) -> CredentialBroker:
    return CredentialBroker(
        policy=POLICY,
        minter=minter or FakeMinter(),
        ledger=ledger or InMemoryLedger(),
        targets=TARGETS,
        clock=clock or FrozenClock(),
    )


async def start_run(
    service: CredentialBroker,
    run_id: str = "wf-1",
    participants: tuple[str, ...] = (AGENT,),
    **labels: str,
) -> None:
    await service.start_workflow(
        ORCH_CALLER,
        workflow_id=run_id,
        owner="alice",
        purpose="tests",
        deadline=NOW + timedelta(minutes=30),
        labels=labels,
        participants=participants,
    )


def request(
    target: str = "demo-db", ttl: int = 300, idempotency_key: str | None = None
) -> CredentialRequest:
    return CredentialRequest(
        workflow_id="wf-1",
        task_id="t-1",
        target=target,
        ttl=timedelta(seconds=ttl),
        idempotency_key=idempotency_key,
    )


PARAMS: Mapping[str, str] = {}


async def test_issues_and_records_an_active_lease() -> None:
    minter, ledger = FakeMinter(), InMemoryLedger()
    service = broker(minter=minter, ledger=ledger)
    await start_run(service)
    issued = await service.request_credential(AGENT_CALLER, request(), params=PARAMS)
    assert issued.secret == {"password": "s3cret"}
    lease = await ledger.get_lease(issued.lease.credential_id)
    assert lease is not None
    assert (lease.state, lease.token_accessor, lease.holder, lease.owner) == (
        LeaseState.ACTIVE,
        "acc-1",
        AGENT,
        "alice",
    )
    assert [h.role for h in lease.chain.hops] == ["owner", "orchestrator", "agent"]
    (spec,) = minter.minted
    assert spec.ttl == timedelta(seconds=300)


async def test_ttl_is_bounded_by_target_deadline_and_jwt_svid_expiry() -> None:
    minter = FakeMinter()
    service = broker(minter=minter)
    await start_run(service)
    jwt_caller = workload(
        AGENT, Role.AGENT, method=AuthMethod.JWT_SVID, expires=NOW + timedelta(seconds=90)
    )
    await service.request_credential(jwt_caller, request(ttl=3600), params=PARAMS)
    await service.request_credential(AGENT_CALLER, request(ttl=3600), params=PARAMS)
    # JWT-SVID expiry (90 s), then demo-db's max_ttl (15 min).
    assert [s.ttl for s in minter.minted] == [timedelta(seconds=90), timedelta(minutes=15)]


@pytest.mark.parametrize(
    ("setup", "error", "reason"),
    [
        ("unknown-run", NotFoundError, "workflow.not_found"),
        ("unknown-target", NotFoundError, "target.unknown"),
        ("past-deadline", ConflictError, "workflow.not_active"),
        ("not-participant", PolicyDeniedError, "policy.deny"),
        ("restricted", ForbiddenError, "policy.needs_approval"),
        ("not-an-agent", ForbiddenError, "auth.role_required"),
        ("a-person", ForbiddenError, "auth.workload_required"),
    ],
)
async def test_refusals_mint_nothing(setup: str, error: type[Exception], reason: str) -> None:
    minter, clock = FakeMinter(), FrozenClock()
    service = broker(minter=minter, clock=clock)
    caller, req = AGENT_CALLER, request()
    if setup != "unknown-run":
        other = ("spiffe://tasklease.test/agent/other",)
        participants = other if setup == "not-participant" else (AGENT,)
        await start_run(service, participants=participants, ticket="OPS-1234")
    if setup == "unknown-target":
        req = request(target="nope")
    elif setup == "past-deadline":
        clock.current = NOW + timedelta(hours=1)
    elif setup == "restricted":
        req = request(target="prod-db")
    elif setup == "not-an-agent":
        caller = ORCH_CALLER
    elif setup == "a-person":
        caller = Caller(HumanIdentity("https://idp", "u", "u", NOW), frozenset({Role.AGENT}))
    with pytest.raises(error) as caught:
        await service.request_credential(caller, req, params=PARAMS)
    assert caught.value.reason == reason  # type: ignore[attr-defined]
    assert minter.minted == []


async def test_a_superseded_replica_issues_nothing() -> None:
    """While other replicas run newer decision inputs (broker/superseded.py) the request is
    refused before anything is read, decided, written or minted."""

    def superseded() -> None:
        raise UnavailableError("superseded", reason="policy.superseded")

    minter, ledger = FakeMinter(), InMemoryLedger()
    service = CredentialBroker(
        policy=POLICY,
        minter=minter,
        ledger=ledger,
        targets=TARGETS,
        clock=FrozenClock(),
        refuse_if_superseded=superseded,
    )
    await start_run(service)
    with pytest.raises(UnavailableError) as caught:
        await service.request_credential(
            AGENT_CALLER, request(idempotency_key="k-1"), params=PARAMS
        )
    assert (caught.value.reason, caught.value.status) == ("policy.superseded", 503)
    assert minter.minted == []
    assert await ledger.find_leases(LeaseSelector(workflow_id="wf-1")) == []


async def test_an_idempotency_key_never_mints_twice() -> None:
    minter = FakeMinter()
    service = broker(minter=minter)
    await start_run(service)
    first = await service.request_credential(
        AGENT_CALLER, request(idempotency_key="k1"), params=PARAMS
    )
    with pytest.raises(IdempotentReplayError) as caught:
        await service.request_credential(AGENT_CALLER, request(idempotency_key="k1"), params=PARAMS)
    assert caught.value.credential_id == first.lease.credential_id
    with pytest.raises(ConflictError) as reused:
        await service.request_credential(
            AGENT_CALLER, request(target="demo-kv", idempotency_key="k1"), params=PARAMS
        )
    assert reused.value.reason == "idempotency.key_reused"
    assert len(minter.minted) == 1


async def test_a_failed_acknowledgement_revokes_and_returns_no_secret() -> None:
    minter = FakeMinter()
    service = broker(minter=minter, ledger=FailingActivateLedger())
    await start_run(service)
    with pytest.raises(LedgerUnavailableError):
        await service.request_credential(AGENT_CALLER, request(), params=PARAMS)
    assert minter.revoked == ["acc-1"]


async def test_a_mint_failure_leaves_no_active_lease() -> None:
    ledger = InMemoryLedger()
    service = broker(
        minter=FakeMinter(fail=VaultUnavailableError("sealed", reason="vault.sealed")),
        ledger=ledger,
    )
    await start_run(service)
    with pytest.raises(VaultUnavailableError):
        await service.request_credential(AGENT_CALLER, request(), params=PARAMS)
    _, leases = await service.get_workflow(ORCH_CALLER, "wf-1")
    assert [x for x in leases if x.state is LeaseState.ACTIVE] == []


async def test_a_refused_mint_leaves_no_record_and_frees_the_idempotency_key() -> None:
    """SECURITY 24: sealed / 403 / 429 on mint → a clear error and no record."""
    ledger = InMemoryLedger()
    minter = FakeMinter(fail=VaultUnavailableError("sealed", reason="vault.sealed"))
    service = broker(minter=minter, ledger=ledger)
    await start_run(service)
    keyed = request(idempotency_key="retry-1")
    with pytest.raises(VaultUnavailableError):
        await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert (await service.get_workflow(ORCH_CALLER, "wf-1"))[1] == []
    minter.fail = None
    issued = await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert issued.lease.state is LeaseState.ACTIVE


class WriteAheadAnswerLostOnce(InMemoryLedger):
    """The first write-ahead runs (record and idempotency binding written), then its answer
    is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def write_ahead(
        self,
        lease: Lease,
        *,
        idempotency: IdempotencyBinding | None = None,
        limits: IssuanceLimits | None = None,
    ) -> str | None:
        written = await super().write_ahead(lease, idempotency=idempotency, limits=limits)
        if self.failures:
            self.failures -= 1
            raise LedgerUnavailableError("redis is down (test)", reason="ledger.unreachable")
        return written


async def test_a_failed_write_ahead_frees_the_idempotency_key() -> None:
    """Nothing was minted, so the key is not left bound to a credential that never existed:
    the retry with the same key mints (not a replay of nothing), exactly once."""
    ledger = WriteAheadAnswerLostOnce()
    minter = FakeMinter()
    service = broker(minter=minter, ledger=ledger)
    await start_run(service)
    keyed = request(idempotency_key="retry-wa")
    with pytest.raises(LedgerUnavailableError):
        await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert minter.minted == []
    issued = await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert issued.lease.state is LeaseState.ACTIVE
    with pytest.raises(IdempotentReplayError) as replay:
        await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert replay.value.credential_id == issued.lease.credential_id
    assert len(minter.minted) == 1


class ActivateFailsOnce(InMemoryLedger):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def activate(self, credential_id: str, **kwargs: Any) -> Lease:
        if self.failures:
            self.failures -= 1
            raise LedgerUnavailableError(
                "not acknowledged (test)", reason="ledger.not_acknowledged"
            )
        return await super().activate(credential_id, **kwargs)


@pytest.mark.parametrize("failing", ["activation", "finish"])
async def test_a_credential_revoked_before_it_was_handed_out_frees_the_idempotency_key(
    failing: str,
) -> None:
    """Minted, then revoked because it could not be recorded (or finished): nothing was handed
    out, so the retry with the same key mints a new credential instead of a 409 replay of one
    nobody holds; a third try is a replay of the new one."""
    ledger = ActivateFailsOnce() if failing == "activation" else InMemoryLedger()
    minter = FakeMinter(
        fail_finish=VaultUnavailableError("outlives the task", reason="vault.outlives_task")
        if failing == "finish"
        else None
    )
    service = broker(minter=minter, ledger=ledger)
    await start_run(service)
    keyed = request(idempotency_key="retry-act")
    with pytest.raises((LedgerUnavailableError, VaultUnavailableError)):
        await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert minter.revoked == ["acc-1"]
    minter.fail_finish = None
    issued = await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert issued.lease.state is LeaseState.ACTIVE
    with pytest.raises(IdempotentReplayError) as replay:
        await service.request_credential(AGENT_CALLER, keyed, params=PARAMS)
    assert replay.value.credential_id == issued.lease.credential_id
    assert len(minter.minted) == 2


async def test_the_minters_last_step_runs_before_the_secret_is_returned() -> None:
    minter = FakeMinter()
    service = broker(minter=minter)
    await start_run(service)
    await service.request_credential(AGENT_CALLER, request(), params=PARAMS)
    assert minter.finished == 1


async def test_an_unfinished_mint_is_revoked_and_its_record_left_due() -> None:
    """A lease that cannot be bounded to the task (SECURITY 22): nothing is handed out, the
    credential is revoked, and its record says why and is due for the sweeper to confirm."""
    ledger = InMemoryLedger()
    minter = FakeMinter(
        fail_finish=VaultUnavailableError("outlives the task", reason="vault.outlives_task")
    )
    service = broker(minter=minter, ledger=ledger)
    await start_run(service)
    with pytest.raises(VaultUnavailableError):
        await service.request_credential(AGENT_CALLER, request(), params=PARAMS)
    assert minter.revoked == ["acc-1"]
    [lease] = (await service.get_workflow(ORCH_CALLER, "wf-1"))[1]
    assert (lease.state, lease.revoke_reason) == (LeaseState.REVOKING, "mint_unfinished")
    assert await ledger.claim_due(NOW + timedelta(hours=1), limit=5, visibility=timedelta(1)) == [
        lease.credential_id
    ]


async def test_an_unknown_mint_outcome_keeps_the_write_ahead_record_for_the_sweeper() -> None:
    """SECURITY 23: a token may exist, so its record stays, due at its expiry."""
    ledger = InMemoryLedger()
    minter = FakeMinter(fail=MintOutcomeUnknownError("lost", reason="vault.mint_outcome_unknown"))
    service = broker(minter=minter, ledger=ledger)
    await start_run(service)
    with pytest.raises(MintOutcomeUnknownError):
        await service.request_credential(AGENT_CALLER, request(), params=PARAMS)
    [lease] = (await service.get_workflow(ORCH_CALLER, "wf-1"))[1]
    assert lease.state is LeaseState.ISSUING
    assert await ledger.claim_due(lease.expires_at, limit=5, visibility=timedelta(seconds=5)) == [
        lease.credential_id
    ]


async def test_runs_are_visible_to_their_orchestrator_and_admins_only() -> None:
    service = broker()
    await start_run(service)
    run, _ = await service.get_workflow(ORCH_CALLER, "wf-1")
    assert (run.owner, run.started_by) == ("alice", ORCH)
    admin = workload("spiffe://tasklease.test/admin/demo", Role.ADMIN)
    assert (await service.get_workflow(admin, "wf-1"))[0] == run
    other = workload("spiffe://tasklease.test/orchestrator/other", Role.ORCHESTRATOR)
    with pytest.raises(NotFoundError):
        await service.get_workflow(other, "wf-1")
    with pytest.raises(ConflictError):
        await start_run(service)
