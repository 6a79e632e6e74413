"""The Ledger contract: every test runs against InMemoryLedger and against RedisLedger on the
real Redis of the local stack, so the fake the unit tests use behaves like production.

Redis runs with ``appendfsync always`` for these tests (ensured here, restored afterwards):
that is what the default durability mode needs on Redis 7.0, and every activation checks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.adapters.redis_ledger import STORED_LEASE_FIELDS
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    RunState,
    Sensitivity,
    TargetKind,
    WorkflowRun,
)
from broker.core.ports import IdempotencyBinding, IssuanceLimits, LeaseSelector, Ledger
from broker.errors import BadRequestError, ConflictError, LimitExceededError, NotFoundError
from tests.contract.conftest import Ledgers

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/planner"
ORCHESTRATOR = "spiffe://tasklease.test/orchestrator/ci"
VISIBILITY = timedelta(seconds=30)


# --------------------------------------------------------------------------- fixtures
# `ledgers` (one opener per implementation) lives in conftest.py.


@pytest.fixture
def ledger(ledgers: Ledgers) -> Ledger:
    return ledgers.new()


def make_run(workflow_id: str = "wf-1", **changes: object) -> WorkflowRun:
    run = WorkflowRun(
        id=workflow_id,
        owner="alice@example.com",
        purpose="nightly reconciliation, TICKET-42",
        started_by=ORCHESTRATOR,
        created_at=NOW,
        deadline=NOW + timedelta(hours=2),
    )
    return dataclasses.replace(run, **changes)  # type: ignore[arg-type]


def make_lease(credential_id: str = "cred_a", **changes: object) -> Lease:
    lease = Lease(
        credential_id=credential_id,
        workflow_id="wf-1",
        task_id="task-1",
        target="db-orders",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.INTERNAL,
        holder=AGENT,
        owner="alice@example.com",
        chain=DelegationChain(
            (
                DelegationHop("owner", "alice@example.com", verified=False),
                DelegationHop("orchestrator", ORCHESTRATOR, verified=True),
                DelegationHop("agent", AGENT, verified=True),
            )
        ),
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=15),
    )
    if "issued_at" in changes and "expires_at" not in changes:
        changes["expires_at"] = changes["issued_at"] + timedelta(minutes=15)  # type: ignore[operator]
    return dataclasses.replace(lease, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- what is stored


def test_the_redis_ledger_stores_exactly_the_lease_fields() -> None:
    """A field added to Lease (a secret, say) fails here until the codec decides about it."""
    assert {field.name for field in dataclasses.fields(Lease)} == STORED_LEASE_FIELDS


# --------------------------------------------------------------------------- runs


async def test_a_run_is_created_once_and_read_back(ledger: Ledger) -> None:
    run = make_run(labels={"team": "payments"}, participants=(f"{AGENT}/*",))
    assert await ledger.create_run(run) is True
    assert await ledger.create_run(make_run(purpose="another")) is False
    assert run == await ledger.get_run("wf-1")
    assert await ledger.get_run("wf-unknown") is None


async def test_saving_a_run_records_its_end(ledger: Ledger) -> None:
    await ledger.create_run(make_run())
    ended = make_run(state=RunState.COMPLETED, ended_at=NOW + timedelta(hours=1), outcome="ok")
    await ledger.save_run(ended)
    assert ended == await ledger.get_run("wf-1")


async def test_an_orchestrator_starts_at_most_its_rate_of_runs(ledger: Ledger) -> None:
    for number in range(3):  # the bucket holds three
        assert await ledger.create_run(make_run(f"wf-r{number}"), per_minute=3) is True
    with pytest.raises(LimitExceededError) as caught:
        await ledger.create_run(make_run("wf-r3"), per_minute=3)
    assert (caught.value.reason, caught.value.limit) == ("limit.runs_per_identity", 3)
    assert 19 <= caught.value.retry_after <= 20  # a token every 20 s
    assert await ledger.get_run("wf-r3") is None  # nothing written
    # Another orchestrator has a bucket of its own; a taken id takes no token.
    other = "spiffe://tasklease.test/orchestrator/other"
    assert await ledger.create_run(make_run("wf-o1", started_by=other), per_minute=3) is True
    assert await ledger.create_run(make_run("wf-r0"), per_minute=3) is False
    # A token is back 20 s later; without a limit, nothing is counted.
    later = NOW + timedelta(seconds=20)
    assert await ledger.create_run(make_run("wf-r3", created_at=later), per_minute=3) is True
    assert await ledger.create_run(make_run("wf-r4", created_at=later)) is True


async def test_saving_an_unknown_run_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError):
        await ledger.save_run(make_run("wf-nowhere"))


@pytest.mark.parametrize("bad", ["", "wf{1}", "wf 1", "x" * 129])
async def test_ids_that_could_confuse_a_key_are_rejected(ledger: Ledger, bad: str) -> None:
    with pytest.raises(BadRequestError):
        await ledger.get_lease(bad)
    with pytest.raises(BadRequestError):
        await ledger.get_run(bad)


# --------------------------------------------------------------------------- write-ahead, activate


async def test_write_ahead_then_activate_records_the_vault_references(ledger: Ledger) -> None:
    lease = make_lease()
    await ledger.write_ahead(lease)
    assert lease == await ledger.get_lease("cred_a")

    active = await ledger.activate(
        "cred_a", token_accessor="acc-1", vault_lease_ids=("database/creds/orders/l1",)
    )

    expected = dataclasses.replace(
        lease,
        state=LeaseState.ACTIVE,
        token_accessor="acc-1",
        vault_lease_ids=("database/creds/orders/l1",),
    )
    assert expected == active
    assert expected == await ledger.get_lease("cred_a")


async def test_every_lease_field_round_trips(ledger: Ledger) -> None:
    lease = make_lease(
        approval_id="appr-7",
        revocable=False,
        kind=TargetKind.SSH,
        tool="ssh",
        justification="rotate the host keys — OPS-42",
    )
    await ledger.write_ahead(lease)
    await ledger.activate("cred_a", token_accessor="acc-1", vault_lease_ids=("ssh/sign/l1", "l2"))
    final = dataclasses.replace(
        lease,
        state=LeaseState.REVOKED,
        token_accessor="acc-1",
        vault_lease_ids=("ssh/sign/l1", "l2"),
        revoke_reason="workflow.completed",
        attempts=3,
        last_error="database unreachable — retried",
        revoked_at=NOW + timedelta(minutes=3, microseconds=7),
    )
    await ledger.save_lease(final)
    assert final == await ledger.get_lease("cred_a")


async def test_write_ahead_again_is_a_no_op_but_another_lease_with_that_id_conflicts(
    ledger: Ledger,
) -> None:
    await ledger.write_ahead(make_lease())
    await ledger.write_ahead(make_lease())
    with pytest.raises(ConflictError) as caught:
        await ledger.write_ahead(make_lease(holder="spiffe://tasklease.test/agent/other"))
    assert caught.value.reason == "lease.exists"
    with pytest.raises(ConflictError):
        await ledger.write_ahead(make_lease(workflow_id="wf-2"))
    assert make_lease() == await ledger.get_lease("cred_a")
    assert await ledger.find_leases(LeaseSelector(workflow_id="wf-2")) == []


async def test_write_ahead_only_records_issuing_leases(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="issuing"):
        await ledger.write_ahead(make_lease(state=LeaseState.ACTIVE))


async def test_an_orphaned_issuing_lease_is_due_at_its_expiry(ledger: Ledger) -> None:
    """A mint whose answer was lost never activates; the sweeper still finds its lease."""
    await ledger.write_ahead(make_lease())
    expiry = NOW + timedelta(minutes=15)
    assert (
        await ledger.claim_due(expiry - timedelta(microseconds=1), limit=10, visibility=VISIBILITY)
        == []
    )
    assert await ledger.claim_due(expiry, limit=10, visibility=VISIBILITY) == ["cred_a"]


async def test_activate_with_the_written_lease_is_the_same_as_without(ledger: Ledger) -> None:
    lease = make_lease()
    await ledger.write_ahead(lease)
    active = await ledger.activate(
        "cred_a", token_accessor="acc-1", vault_lease_ids=("l1",), written=lease
    )
    assert active == dataclasses.replace(
        lease, state=LeaseState.ACTIVE, token_accessor="acc-1", vault_lease_ids=("l1",)
    )
    assert active == await ledger.get_lease("cred_a")


async def test_activate_with_a_stale_written_lease_reads_the_record(ledger: Ledger) -> None:
    """The hint is only a guess: a record changed meanwhile (tombstoned, marked revoked) wins."""
    lease = make_lease()
    await ledger.write_ahead(lease)
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + timedelta(seconds=1))
    with pytest.raises(ConflictError) as caught:
        await ledger.activate("cred_a", token_accessor="acc-1", vault_lease_ids=(), written=lease)
    assert caught.value.reason == "lease.tombstoned"
    stored = await ledger.get_lease("cred_a")
    assert stored is not None
    assert (stored.state, stored.token_accessor) == (LeaseState.ISSUING, "acc-1")
    with pytest.raises(ConflictError):  # a hint naming another record changes nothing
        await ledger.activate(
            "cred_a", token_accessor="acc-2", vault_lease_ids=(), written=make_lease()
        )


async def test_a_refused_mint_discards_its_write_ahead_record_and_index_entries(
    ledger: Ledger,
) -> None:
    """SECURITY 24: a mint Vault definitely refused leaves no record behind."""
    lease = make_lease()
    await ledger.write_ahead(lease)
    assert await ledger.discard(lease) is True
    assert await ledger.get_lease("cred_a") is None
    assert await ledger.find_leases(LeaseSelector(workflow_id="wf-1")) == []
    assert await ledger.find_leases(LeaseSelector(holder=AGENT)) == []
    assert await ledger.find_leases(LeaseSelector(everything=True)) == []
    later = NOW + timedelta(hours=1)
    assert await ledger.claim_due(later, limit=10, visibility=VISIBILITY) == []
    assert await ledger.discard(lease) is False


async def test_discard_keeps_a_record_that_changed_since_it_was_written(ledger: Ledger) -> None:
    lease = make_lease()
    await ledger.write_ahead(lease)
    await ledger.activate("cred_a", token_accessor="acc-1", vault_lease_ids=())
    assert await ledger.discard(lease) is False
    stored = await ledger.get_lease("cred_a")
    assert stored is not None
    assert stored.state is LeaseState.ACTIVE
    assert await ledger.claim_due(NOW + timedelta(hours=1), limit=10, visibility=VISIBILITY) == [
        "cred_a"
    ]


async def test_activating_an_unknown_lease_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError):
        await ledger.activate("cred_nowhere", token_accessor="acc", vault_lease_ids=())


async def test_activate_again_with_the_same_references_is_a_retry(ledger: Ledger) -> None:
    await ledger.write_ahead(make_lease())
    first = await ledger.activate("cred_a", token_accessor="acc-1", vault_lease_ids=("l1",))
    again = await ledger.activate("cred_a", token_accessor="acc-1", vault_lease_ids=("l1",))
    assert first == again
    with pytest.raises(ConflictError) as caught:
        await ledger.activate("cred_a", token_accessor="acc-2", vault_lease_ids=("l2",))
    assert caught.value.reason == "lease.not_issuing"


async def test_a_revoked_lease_cannot_be_activated(ledger: Ledger) -> None:
    lease = make_lease()
    await ledger.write_ahead(lease)
    await ledger.save_lease(dataclasses.replace(lease, state=LeaseState.REVOKING))
    with pytest.raises(ConflictError) as caught:
        await ledger.activate("cred_a", token_accessor="acc-1", vault_lease_ids=())
    assert caught.value.reason == "lease.not_issuing"
    assert (await ledger.get_lease("cred_a") or lease).state == LeaseState.REVOKING


# --------------------------------------------------------------------------- tombstones


async def test_activation_on_a_tombstoned_task_is_refused_and_the_lease_is_due_at_once(
    ledger: Ledger,
) -> None:
    """Forced revocation raced a mint: the late credential is refused, its lease stays
    issuing with the Vault references recorded, and the very next sweep claims it."""
    await ledger.write_ahead(make_lease())
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + timedelta(hours=2))

    with pytest.raises(ConflictError) as caught:
        await ledger.activate("cred_a", token_accessor="acc-late", vault_lease_ids=("l-late",))

    assert caught.value.reason == "lease.tombstoned"
    stored = await ledger.get_lease("cred_a")
    assert stored is not None
    assert (
        stored.state,
        stored.token_accessor,
        stored.vault_lease_ids,
    ) == (LeaseState.ISSUING, "acc-late", ("l-late",))
    assert await ledger.claim_due(NOW, limit=10, visibility=VISIBILITY) == ["cred_a"]


async def test_a_tombstone_covers_leases_written_before_its_end_only(ledger: Ledger) -> None:
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + timedelta(minutes=10))
    await ledger.write_ahead(make_lease("cred_in", issued_at=NOW + timedelta(minutes=9)))
    await ledger.write_ahead(make_lease("cred_after", issued_at=NOW + timedelta(minutes=10)))
    await ledger.write_ahead(make_lease("cred_other_task", task_id="task-2"))

    with pytest.raises(ConflictError):
        await ledger.activate("cred_in", token_accessor="a1", vault_lease_ids=())
    assert (
        await ledger.activate("cred_after", token_accessor="a2", vault_lease_ids=())
    ).state == LeaseState.ACTIVE
    assert (
        await ledger.activate("cred_other_task", token_accessor="a3", vault_lease_ids=())
    ).state == LeaseState.ACTIVE


async def test_the_later_tombstone_wins(ledger: Ledger) -> None:
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + timedelta(hours=1))
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + timedelta(minutes=1))
    await ledger.write_ahead(make_lease(issued_at=NOW + timedelta(minutes=30)))
    with pytest.raises(ConflictError):
        await ledger.activate("cred_a", token_accessor="acc", vault_lease_ids=())


async def test_a_late_credential_on_a_lease_marked_revoked_makes_it_live_again(
    ledger: Ledger,
) -> None:
    """The revoker found nothing to revoke and closed the lease; then the mint answered."""
    lease = make_lease()
    await ledger.write_ahead(lease)
    await ledger.tombstone_task("wf-1", "task-1", until=NOW + timedelta(hours=2))
    closed = dataclasses.replace(lease, state=LeaseState.REVOKED, revoked_at=NOW)
    await ledger.save_lease(closed)
    with pytest.raises(ConflictError):
        await ledger.activate("cred_a", token_accessor="acc-late", vault_lease_ids=())
    stored = await ledger.get_lease("cred_a")
    assert stored is not None
    assert (
        stored.state,
        stored.token_accessor,
        stored.revoked_at,
    ) == (LeaseState.REVOKING, "acc-late", None)


# --------------------------------------------------------------------------- save_lease


async def test_save_lease_records_a_state_transition(ledger: Ledger) -> None:
    await ledger.write_ahead(make_lease())
    active = await ledger.activate("cred_a", token_accessor="acc", vault_lease_ids=("l1",))
    revoking = dataclasses.replace(
        active, state=LeaseState.REVOKING, attempts=1, revoke_reason="ttl"
    )
    await ledger.save_lease(revoking)
    assert revoking == await ledger.get_lease("cred_a")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"holder": "spiffe://tasklease.test/agent/other"}, "lease.identity_changed"),
        ({"task_id": "task-9"}, "lease.identity_changed"),
        ({"workflow_id": "wf-2"}, "lease.identity_changed"),
        ({"token_accessor": ""}, "lease.stale_write"),
        ({"vault_lease_ids": ()}, "lease.stale_write"),
        ({"state": LeaseState.ISSUING}, "lease.stale_write"),
    ],
)
async def test_save_lease_refuses_rewrites_that_would_corrupt_the_ledger(
    ledger: Ledger, change: dict[str, object], reason: str
) -> None:
    await ledger.write_ahead(make_lease())
    active = await ledger.activate("cred_a", token_accessor="acc", vault_lease_ids=("l1",))
    with pytest.raises(ConflictError) as caught:
        await ledger.save_lease(dataclasses.replace(active, **change))  # type: ignore[arg-type]
    assert reason == caught.value.reason
    assert active == await ledger.get_lease("cred_a")


async def test_a_revoked_lease_stays_revoked(ledger: Ledger) -> None:
    lease = make_lease()
    await ledger.write_ahead(lease)
    revoked = dataclasses.replace(lease, state=LeaseState.REVOKED, revoked_at=NOW)
    await ledger.save_lease(revoked)
    with pytest.raises(ConflictError):
        await ledger.save_lease(dataclasses.replace(lease, state=LeaseState.ACTIVE))


async def test_saving_an_unknown_lease_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError):
        await ledger.save_lease(make_lease("cred_nowhere"))


# --------------------------------------------------------------------------- find_leases

# Six leases over two runs, three tasks, three holders, two owners, two targets.
POPULATION = {
    "cred_1": {},
    "cred_2": {"task_id": "task-2", "holder": f"{AGENT}/sub-1"},
    "cred_3": {"holder": "spiffe://tasklease.test/agent/reviewer", "target": "vault-kv"},
    "cred_4": {
        "workflow_id": "wf-2",
        "owner": "bob@example.com",
        "sensitivity": Sensitivity.RESTRICTED,
        "target": "vault-kv",
    },
    "cred_5": {"workflow_id": "wf-2", "owner": "bob@example.com", "holder": f"{AGENT}/sub-2"},
    "cred_6": {"workflow_id": "wf-2", "task_id": "task-2", "sensitivity": Sensitivity.RESTRICTED},
}


async def _populate(ledger: Ledger) -> None:
    for offset, (cid, changes) in enumerate(POPULATION.items()):
        await ledger.write_ahead(
            make_lease(cid, issued_at=NOW + timedelta(seconds=offset), **changes)
        )
    await ledger.activate("cred_5", token_accessor="acc-5", vault_lease_ids=())


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (LeaseSelector(workflow_id="wf-2"), ["cred_4", "cred_5", "cred_6"]),
        (LeaseSelector(workflow_id="wf-1", task_id="task-2"), ["cred_2"]),
        (LeaseSelector(task_id="task-2"), ["cred_2", "cred_6"]),
        (LeaseSelector(holder=AGENT), ["cred_1", "cred_4", "cred_6"]),
        (LeaseSelector(holder_prefix=f"{AGENT}/"), ["cred_2", "cred_5"]),
        (LeaseSelector(holder_prefix=AGENT), ["cred_1", "cred_2", "cred_4", "cred_5", "cred_6"]),
        (LeaseSelector(owner="bob@example.com"), ["cred_4", "cred_5"]),
        (LeaseSelector(target="vault-kv"), ["cred_3", "cred_4"]),
        (LeaseSelector(sensitivity=Sensitivity.RESTRICTED), ["cred_4", "cred_6"]),
        (
            LeaseSelector(owner="bob@example.com", states=frozenset({LeaseState.ACTIVE})),
            ["cred_5"],
        ),
        (LeaseSelector(workflow_id="wf-2", target="vault-kv", holder=AGENT), ["cred_4"]),
        (LeaseSelector(everything=True), list(POPULATION)),
        (LeaseSelector(holder="spiffe://tasklease.test/nobody"), []),
        (LeaseSelector(holder_prefix="spiffe://other.test/"), []),
    ],
)
async def test_find_leases_by_each_selector_field(
    ledger: Ledger, selector: LeaseSelector, expected: list[str]
) -> None:
    await _populate(ledger)
    found = await ledger.find_leases(selector)
    assert expected == [lease.credential_id for lease in found]


@pytest.mark.parametrize(
    "selector",
    [
        LeaseSelector(),
        LeaseSelector(states=frozenset({LeaseState.ACTIVE})),
        LeaseSelector(holder_prefix=""),
    ],
)
async def test_find_leases_needs_a_field_or_everything(
    ledger: Ledger, selector: LeaseSelector
) -> None:
    with pytest.raises(BadRequestError) as caught:
        await ledger.find_leases(selector)
    assert caught.value.reason == "selector.unbounded"


async def test_find_leases_returns_at_most_limit_matches_oldest_first(ledger: Ledger) -> None:
    await _populate(ledger)
    found = await ledger.find_leases(LeaseSelector(workflow_id="wf-2"), limit=2)
    ids = [lease.credential_id for lease in found]
    assert len(ids) == 2
    assert set(ids) <= {"cred_4", "cred_5", "cred_6"}
    assert sorted(found, key=lambda lease: lease.issued_at) == found


async def test_find_leases_reads_past_one_scan_batch(ledger: Ledger) -> None:
    """More leases than one index read returns: all are found, none twice."""
    for number in range(1200):
        await ledger.write_ahead(
            make_lease(f"cred_{number:04d}", issued_at=NOW + timedelta(microseconds=number))
        )
    found = await ledger.find_leases(LeaseSelector(sensitivity=Sensitivity.INTERNAL), limit=10_000)
    assert [f"cred_{n:04d}" for n in range(1200)] == [lease.credential_id for lease in found]


# --------------------------------------------------------------------------- iter_leases


async def _batches(ledger: Ledger, selector: LeaseSelector, batch: int) -> list[list[str]]:
    return [
        [lease.credential_id for lease in found]
        async for found in ledger.iter_leases(selector, batch=batch)
    ]


async def _write_all(ledger: Ledger, leases: list[Lease]) -> None:
    for start in range(0, len(leases), 200):
        await asyncio.gather(*(ledger.write_ahead(x) for x in leases[start : start + 200]))


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (LeaseSelector(workflow_id="wf-2"), ["cred_4", "cred_5", "cred_6"]),
        (LeaseSelector(workflow_id="wf-1", task_id="task-2"), ["cred_2"]),
        (LeaseSelector(task_id="task-2"), ["cred_2", "cred_6"]),
        (LeaseSelector(holder=AGENT), ["cred_1", "cred_4", "cred_6"]),
        (LeaseSelector(holder_prefix=AGENT), ["cred_1", "cred_2", "cred_4", "cred_5", "cred_6"]),
        (LeaseSelector(owner="bob@example.com"), ["cred_4", "cred_5"]),
        (LeaseSelector(target="vault-kv"), ["cred_3", "cred_4"]),
        (LeaseSelector(sensitivity=Sensitivity.RESTRICTED), ["cred_4", "cred_6"]),
        (
            LeaseSelector(owner="bob@example.com", states=frozenset({LeaseState.ACTIVE})),
            ["cred_5"],
        ),
        (LeaseSelector(everything=True), list(POPULATION)),
        (LeaseSelector(holder="spiffe://tasklease.test/nobody"), []),
    ],
)
async def test_iter_leases_yields_what_find_leases_finds_in_batches(
    ledger: Ledger, selector: LeaseSelector, expected: list[str]
) -> None:
    await _populate(ledger)
    batches = await _batches(ledger, selector, 2)
    assert all(1 <= len(found) <= 2 for found in batches)
    assert sorted(expected) == sorted(cid for found in batches for cid in found)


# 1 200 leases over two runs, 600 holders (more than one page of the holder index) and two
# owners, all for one target: every index holds more than one SCAN batch.
MANY = 1200


def _many() -> list[Lease]:
    return [
        make_lease(
            f"cred_{n:04d}",
            workflow_id=f"wf-{n % 2 + 1}",
            holder=f"{AGENT}/w{n % 600:03d}",
            owner=f"owner-{n % 2}@example.com",
            issued_at=NOW + timedelta(microseconds=n),
        )
        for n in range(MANY)
    ]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (LeaseSelector(everything=True), range(MANY)),
        (LeaseSelector(sensitivity=Sensitivity.INTERNAL), range(MANY)),
        (LeaseSelector(workflow_id="wf-1"), range(0, MANY, 2)),
        (LeaseSelector(target="db-orders"), range(MANY)),
        (LeaseSelector(owner="owner-1@example.com"), range(1, MANY, 2)),
        (LeaseSelector(holder_prefix=f"{AGENT}/w"), range(MANY)),
        (
            LeaseSelector(holder_prefix=f"{AGENT}/w1"),
            [n for n in range(MANY) if 100 <= n % 600 < 200],
        ),
    ],
)
async def test_iter_leases_yields_every_match_once_in_bounded_batches(
    ledger: Ledger, selector: LeaseSelector, expected: range | list[int]
) -> None:
    """More matches than one batch and than one index read: each exactly once."""
    await _write_all(ledger, _many())
    batches = await _batches(ledger, selector, 250)
    ids = [cid for found in batches for cid in found]
    assert all(1 <= len(found) <= 250 for found in batches)
    assert len(batches) >= -(-len(expected) // 250)
    assert len(ids) == len(set(ids))
    assert sorted(f"cred_{n:04d}" for n in expected) == sorted(ids)


async def test_leases_changing_during_an_iteration_come_at_most_once(ledger: Ledger) -> None:
    """Leases revoked, discarded and written while a run's leases are read: none comes twice,
    every one that matched throughout comes, each as it matched when read. (Most of the run's
    leases are discarded mid-iteration, so Redis shrinks the run's hash mid-scan; a scan that
    does return members again is forced in tests/integration/test_redis_ledger_scan.py.)"""
    leases = [
        make_lease(f"cred_{n:04d}", issued_at=NOW + timedelta(microseconds=n)) for n in range(1500)
    ]
    await _write_all(ledger, leases)
    written = [
        make_lease(f"cred_new_{n:02d}", issued_at=NOW + timedelta(seconds=1, microseconds=n))
        for n in range(50)
    ]
    issuing = LeaseSelector(workflow_id="wf-1", states=frozenset({LeaseState.ISSUING}))
    seen: list[Lease] = []
    changed: set[str] = set()
    async for found in ledger.iter_leases(issuing, batch=100):
        if not seen:
            # After the first batch: revoke a few of the others, discard most of the rest
            # (the first batch stays: a repeat of it would show), write new ones.
            first = {x.credential_id for x in found}
            rest = [x for x in leases if x.credential_id not in first]
            for lease in rest[::50]:
                revoking = dataclasses.replace(lease, state=LeaseState.REVOKING, revoke_reason="x")
                await ledger.save_lease(revoking)
                changed.add(lease.credential_id)
            for number, lease in enumerate(rest):
                if number % 20 and lease.credential_id not in changed:
                    assert await ledger.discard(lease)
                    changed.add(lease.credential_id)
            await _write_all(ledger, written)
        seen.extend(found)
    ids = [x.credential_id for x in seen]
    assert len(ids) == len(set(ids))
    assert all(x.state is LeaseState.ISSUING for x in seen)
    assert {x.credential_id for x in leases} - changed <= set(ids)
    assert set(ids) <= {x.credential_id for x in leases + written}


async def test_holders_added_during_a_prefix_iteration_bring_no_lease_twice(
    ledger: Ledger,
) -> None:
    """The holder index is read a page at a time; holders that sort first, added between two
    pages, must not make the next page repeat holders of the first."""
    leases = _many()
    await _write_all(ledger, leases)
    seen: list[str] = []
    async for found in ledger.iter_leases(LeaseSelector(holder_prefix=f"{AGENT}/w"), batch=50):
        if not seen:
            await _write_all(
                ledger,
                [
                    make_lease(f"cred_early_{n:03d}", holder=f"{AGENT}/w-{n:03d}")
                    for n in range(150)
                ],
            )
        seen.extend(x.credential_id for x in found)
    assert len(seen) == len(set(seen))
    assert {x.credential_id for x in leases} <= set(seen)


async def test_an_iteration_stopped_early_can_be_closed(ledger: Ledger) -> None:
    await _populate(ledger)
    iteration = ledger.iter_leases(LeaseSelector(everything=True), batch=1)
    first = await anext(iteration)
    await iteration.aclose()
    assert len(first) == 1


@pytest.mark.parametrize(
    ("selector", "batch", "reason"),
    [
        (LeaseSelector(), 10, "selector.unbounded"),
        (LeaseSelector(states=frozenset({LeaseState.ACTIVE})), 10, "selector.unbounded"),
        (LeaseSelector(everything=True), 0, "selector.limit"),
        (LeaseSelector(everything=True), 10_001, "selector.limit"),
    ],
)
async def test_iter_leases_refuses_an_unbounded_selector_or_batch(
    ledger: Ledger, selector: LeaseSelector, batch: int, reason: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        await _batches(ledger, selector, batch)
    assert caught.value.reason == reason


# --------------------------------------------------------------------------- idempotency


_RUN = LeaseSelector(workflow_id="wf-1")


def _bind(key: str, fingerprint: str = "fp-1") -> IdempotencyBinding:
    return IdempotencyBinding(key, fingerprint, timedelta(hours=1))


async def test_an_idempotency_key_returns_its_credential_for_the_same_request(
    ledger: Ledger,
) -> None:
    assert await ledger.write_ahead(make_lease("cred_a"), idempotency=_bind("agent|k1")) is None
    # The key is bound: the second lease is not written, the first credential is named.
    assert await ledger.write_ahead(make_lease("cred_b"), idempotency=_bind("agent|k1")) == (
        "cred_a"
    )
    assert await ledger.get_lease("cred_b") is None
    assert await ledger.write_ahead(make_lease("cred_c"), idempotency=_bind("agent|k2")) is None
    assert {lease.credential_id for lease in await ledger.find_leases(_RUN)} == {
        "cred_a",
        "cred_c",
    }


async def test_a_write_ahead_retried_with_its_own_key_is_a_no_op(ledger: Ledger) -> None:
    lease = make_lease("cred_a")
    assert await ledger.write_ahead(lease, idempotency=_bind("agent|k1")) is None
    assert await ledger.write_ahead(lease, idempotency=_bind("agent|k1")) is None
    assert await ledger.get_lease("cred_a") == lease


async def test_an_idempotency_key_reused_for_another_request_conflicts(ledger: Ledger) -> None:
    await ledger.write_ahead(make_lease("cred_a"), idempotency=_bind("agent|k1"))
    with pytest.raises(ConflictError) as caught:
        await ledger.write_ahead(make_lease("cred_b"), idempotency=_bind("agent|k1", "fp-2"))
    assert caught.value.reason == "idempotency.key_reused"
    assert await ledger.get_lease("cred_b") is None
    assert await ledger.write_ahead(make_lease("cred_b"), idempotency=_bind("agent|k1")) == (
        "cred_a"
    )


async def test_a_taken_credential_id_binds_no_idempotency_key(ledger: Ledger) -> None:
    await ledger.write_ahead(make_lease("cred_a"))
    with pytest.raises(ConflictError) as caught:
        await ledger.write_ahead(
            make_lease("cred_a", task_id="task-2"), idempotency=_bind("agent|k1")
        )
    assert caught.value.reason == "lease.exists"
    # The key stayed free: a request with it writes its own lease.
    assert await ledger.write_ahead(make_lease("cred_b"), idempotency=_bind("agent|k1")) is None


async def test_a_forgotten_idempotency_key_can_be_bound_again(ledger: Ledger) -> None:
    await ledger.write_ahead(make_lease("cred_a"), idempotency=_bind("agent|k1"))
    await ledger.forget_idempotency("agent|k1", "cred_other")  # bound to another: kept
    assert await ledger.write_ahead(make_lease("cred_b"), idempotency=_bind("agent|k1")) == (
        "cred_a"
    )
    await ledger.forget_idempotency("agent|k1", "cred_a")
    assert await ledger.write_ahead(make_lease("cred_b"), idempotency=_bind("agent|k1")) is None
    await ledger.forget_idempotency("agent|never", "cred_a")  # unbound: nothing happens


def test_an_idempotency_binding_needs_a_positive_ttl() -> None:
    with pytest.raises(ValueError, match="positive"):
        IdempotencyBinding("agent|k1", "fp-1", timedelta(0))


# --------------------------------------------------------------------------- live limits

_TWO = IssuanceLimits(per_identity=2)


async def test_a_holder_at_its_live_limit_gets_nothing_written(ledger: Ledger) -> None:
    await ledger.write_ahead(make_lease("cred_a"), limits=_TWO)
    await ledger.write_ahead(
        make_lease("cred_b", issued_at=NOW + timedelta(minutes=5)), limits=_TWO
    )
    third = make_lease("cred_c", issued_at=NOW + timedelta(minutes=6))
    with pytest.raises(LimitExceededError) as caught:
        await ledger.write_ahead(third, limits=_TWO)
    assert caught.value.reason == "limit.live_per_identity"
    assert caught.value.limit == 2
    # cred_a, the earliest to expire, ends at NOW + 15 min: 9 minutes after the request.
    assert caught.value.retry_after == 9 * 60
    assert await ledger.get_lease("cred_c") is None
    # Another holder is not counted against this one; without limits nothing is refused.
    await ledger.write_ahead(make_lease("cred_d", holder=f"{AGENT}-2"), limits=_TWO)
    await ledger.write_ahead(make_lease("cred_e"))


async def test_a_revoked_lease_frees_its_slot(ledger: Ledger) -> None:
    first = make_lease("cred_a")
    await ledger.write_ahead(first, limits=IssuanceLimits(per_identity=1))
    with pytest.raises(LimitExceededError):
        await ledger.write_ahead(make_lease("cred_b"), limits=IssuanceLimits(per_identity=1))
    active = await ledger.activate("cred_a", token_accessor="acc-a", vault_lease_ids=())
    await ledger.save_lease(
        dataclasses.replace(active, state=LeaseState.REVOKING, revoke_reason="released")
    )
    with pytest.raises(LimitExceededError):  # revoking is still live
        await ledger.write_ahead(make_lease("cred_b"), limits=IssuanceLimits(per_identity=1))
    revoking = await ledger.get_lease("cred_a")
    assert revoking is not None
    await ledger.save_lease(dataclasses.replace(revoking, state=LeaseState.REVOKED, revoked_at=NOW))
    await ledger.write_ahead(make_lease("cred_b"), limits=IssuanceLimits(per_identity=1))


async def test_an_expired_or_discarded_lease_frees_its_slot(ledger: Ledger) -> None:
    one = IssuanceLimits(per_identity=1)
    first = make_lease("cred_a")
    await ledger.write_ahead(first, limits=one)
    assert await ledger.discard(first) is True
    second = make_lease("cred_b")
    await ledger.write_ahead(second, limits=one)
    # Asked for at the very moment cred_b expires: it no longer counts.
    await ledger.write_ahead(make_lease("cred_c", issued_at=second.expires_at), limits=one)


async def test_a_lease_counts_until_the_end_of_the_minute_it_expires_in(ledger: Ledger) -> None:
    """Counts are kept per expiry minute: a limit errs on the side of refusing, by < 60 s."""
    one = IssuanceLimits(per_identity=1)
    first = make_lease("cred_a", expires_at=NOW + timedelta(minutes=15, seconds=30))
    await ledger.write_ahead(first, limits=one)
    after_expiry = first.expires_at + timedelta(seconds=10)
    with pytest.raises(LimitExceededError) as caught:
        await ledger.write_ahead(make_lease("cred_b", issued_at=after_expiry), limits=one)
    assert caught.value.retry_after == 20  # the minute ends at NOW + 16 min
    await ledger.write_ahead(
        make_lease("cred_b", issued_at=NOW + timedelta(minutes=16)), limits=one
    )


async def test_a_target_limit_counts_that_target_only(ledger: Ledger) -> None:
    per_target = IssuanceLimits(per_identity=10, per_target=1)
    await ledger.write_ahead(make_lease("cred_a"), limits=per_target)
    with pytest.raises(LimitExceededError) as caught:
        await ledger.write_ahead(make_lease("cred_b"), limits=per_target)
    assert caught.value.reason == "limit.live_per_target"
    assert caught.value.limit == 1
    await ledger.write_ahead(make_lease("cred_c", target="db-billing"), limits=per_target)
    # The identity-wide limit counts every target.
    with pytest.raises(LimitExceededError) as caught:
        await ledger.write_ahead(make_lease("cred_d", target="db-x"), limits=_TWO)
    assert caught.value.reason == "limit.live_per_identity"


async def test_a_retry_or_a_replay_at_the_limit_is_not_refused(ledger: Ledger) -> None:
    one = IssuanceLimits(per_identity=1)
    lease = make_lease("cred_a")
    assert await ledger.write_ahead(lease, idempotency=_bind("agent|k1"), limits=one) is None
    # The same write again (its answer was lost) is no second credential.
    assert await ledger.write_ahead(lease, idempotency=_bind("agent|k1"), limits=one) is None
    # A key bound already names its credential before any limit is looked at.
    replay = make_lease("cred_b")
    assert await ledger.write_ahead(replay, idempotency=_bind("agent|k1"), limits=one) == ("cred_a")
    with pytest.raises(LimitExceededError):
        await ledger.write_ahead(replay, idempotency=_bind("agent|k2"), limits=one)
    # The refused request bound nothing: its key is free once a slot is.
    active = await ledger.activate("cred_a", token_accessor="acc-a", vault_lease_ids=())
    await ledger.save_lease(dataclasses.replace(active, state=LeaseState.REVOKED, revoked_at=NOW))
    assert await ledger.write_ahead(replay, idempotency=_bind("agent|k2"), limits=one) is None


async def test_an_identity_is_issued_at_most_its_rate(ledger: Ledger) -> None:
    """A token bucket of ``per_minute`` tokens, one more every 60/per_minute s."""
    two = IssuanceLimits(per_minute=2)
    await ledger.write_ahead(make_lease("cred_a"), limits=two)
    await ledger.write_ahead(make_lease("cred_b"), limits=two)
    with pytest.raises(LimitExceededError) as caught:
        await ledger.write_ahead(make_lease("cred_c"), limits=two)
    assert (caught.value.reason, caught.value.limit, caught.value.retry_after) == (
        "limit.rate_per_identity",
        2,
        30,
    )
    assert await ledger.get_lease("cred_c") is None
    # Another identity has a bucket of its own; a retried write takes no token.
    await ledger.write_ahead(make_lease("cred_d", holder=f"{AGENT}-2"), limits=two)
    await ledger.write_ahead(make_lease("cred_a"), limits=two)
    with pytest.raises(LimitExceededError):
        await ledger.write_ahead(
            make_lease("cred_c", issued_at=NOW + timedelta(seconds=29)), limits=two
        )
    # 30 s later one token is back, and only one.
    later = NOW + timedelta(seconds=30)
    await ledger.write_ahead(make_lease("cred_c", issued_at=later), limits=two)
    with pytest.raises(LimitExceededError):
        await ledger.write_ahead(make_lease("cred_e", issued_at=later), limits=two)
    # A request a live limit refuses takes no token.
    full = IssuanceLimits(per_identity=3, per_minute=2)
    much_later = NOW + timedelta(minutes=5)
    with pytest.raises(LimitExceededError) as caught:
        await ledger.write_ahead(make_lease("cred_f", issued_at=much_later), limits=full)
    assert caught.value.reason == "limit.live_per_identity"
    await ledger.write_ahead(make_lease("cred_f", issued_at=much_later), limits=two)
    await ledger.write_ahead(make_lease("cred_g", issued_at=much_later), limits=two)


def test_live_limits_are_bounded() -> None:
    with pytest.raises(ValueError, match="per_identity"):
        IssuanceLimits(per_identity=-1)
    with pytest.raises(ValueError, match="per_target"):
        IssuanceLimits(per_target=10**7)


# --------------------------------------------------------------------------- due index


async def _schedule_all(ledger: Ledger, due: dict[str, datetime]) -> None:
    for start in range(0, len(due), 100):
        chunk = list(due.items())[start : start + 100]
        await asyncio.gather(*(ledger.schedule(cid, at) for cid, at in chunk))


async def test_claim_due_returns_the_oldest_first_across_buckets_up_to_limit(
    ledger: Ledger,
) -> None:
    # Ids spread over every bucket; due times interleave them.
    due = {f"cred_{n:03d}": NOW - timedelta(seconds=(n * 37) % 101) for n in range(60)}
    due["cred_future"] = NOW + timedelta(microseconds=1)
    await _schedule_all(ledger, due)

    claimed = await ledger.claim_due(NOW, limit=10, visibility=VISIBILITY)

    oldest = sorted((at, cid) for cid, at in due.items() if at <= NOW)[:10]
    assert [cid for _, cid in oldest] == claimed


async def test_items_due_at_the_same_time_come_in_id_order(ledger: Ledger) -> None:
    await _schedule_all(ledger, {f"cred_{n}": NOW for n in (5, 3, 9, 1)})
    assert await ledger.claim_due(NOW, limit=10, visibility=VISIBILITY) == [
        "cred_1",
        "cred_3",
        "cred_5",
        "cred_9",
    ]


async def test_a_claim_that_is_not_acknowledged_comes_back_after_the_visibility_timeout(
    ledger: Ledger,
) -> None:
    """SECURITY 35: the sweeper crashed after claiming."""
    await _schedule_all(ledger, {"cred_a": NOW, "cred_b": NOW})
    assert await ledger.claim_due(NOW, limit=10, visibility=VISIBILITY) == ["cred_a", "cred_b"]
    assert (
        await ledger.claim_due(
            NOW + VISIBILITY - timedelta(microseconds=1), limit=10, visibility=VISIBILITY
        )
        == []
    )
    assert await ledger.claim_due(NOW + VISIBILITY, limit=10, visibility=VISIBILITY) == [
        "cred_a",
        "cred_b",
    ]


async def test_an_expired_claim_keeps_its_place_in_the_queue(ledger: Ledger) -> None:
    """A returned item is as old as when it was first due: it goes before newer items."""
    await ledger.schedule("cred_old", NOW - timedelta(hours=1))
    assert await ledger.claim_due(NOW, limit=1, visibility=VISIBILITY) == ["cred_old"]
    await ledger.schedule("cred_new", NOW)
    later = NOW + timedelta(minutes=5)
    assert await ledger.claim_due(later, limit=1, visibility=VISIBILITY) == ["cred_old"]


async def test_unschedule_takes_a_revoked_lease_out_of_the_due_index(ledger: Ledger) -> None:
    await ledger.schedule("cred_a", NOW)
    await ledger.schedule("cred_b", NOW)
    assert await ledger.claim_due(NOW, limit=1, visibility=VISIBILITY) == ["cred_a"]
    await ledger.unschedule("cred_a")  # claimed: the claim goes too
    await ledger.unschedule("cred_b")  # due: the entry goes
    await ledger.unschedule("cred_none")  # absent: nothing happens
    later = NOW + VISIBILITY + timedelta(seconds=1)
    assert await ledger.claim_due(later, limit=10, visibility=VISIBILITY) == []


async def test_ack_ends_a_claim_for_good(ledger: Ledger) -> None:
    await _schedule_all(ledger, {"cred_a": NOW, "cred_b": NOW})
    await ledger.claim_due(NOW, limit=10, visibility=VISIBILITY)
    await ledger.ack("cred_a")
    await ledger.ack("cred_unknown")
    assert await ledger.claim_due(NOW + timedelta(hours=1), limit=10, visibility=VISIBILITY) == [
        "cred_b"
    ]


async def test_schedule_replaces_the_due_time_and_ends_a_claim(ledger: Ledger) -> None:
    await ledger.schedule("cred_a", NOW)
    await ledger.schedule("cred_a", NOW + timedelta(minutes=10))
    assert await ledger.claim_due(NOW + timedelta(minutes=9), limit=10, visibility=VISIBILITY) == []

    later = NOW + timedelta(minutes=10)
    assert await ledger.claim_due(later, limit=10, visibility=VISIBILITY) == ["cred_a"]
    # A failed revocation backs off: rescheduled (then acknowledged) while claimed.
    await ledger.schedule("cred_a", later + timedelta(seconds=5))
    await ledger.ack("cred_a")
    assert (
        await ledger.claim_due(later + timedelta(seconds=4), limit=10, visibility=VISIBILITY) == []
    )
    assert await ledger.claim_due(
        later + timedelta(seconds=5), limit=10, visibility=VISIBILITY
    ) == ["cred_a"]


async def test_two_concurrent_claimers_share_1000_due_items_without_overlap(
    ledgers: Ledgers,
) -> None:
    """SECURITY 34: two replicas sweeping at once never hold the same item."""
    first = ledgers.new()
    second = ledgers.twin(first)
    due = {f"cred_{n:04d}": NOW - timedelta(milliseconds=n) for n in range(1000)}
    await _schedule_all(first, due)

    async def drain(ledger: Ledger) -> list[str]:
        taken: list[str] = []
        for _ in range(60):  # 1000 / 37 rounds suffice for one claimer alone; bounded
            batch = await ledger.claim_due(NOW, limit=37, visibility=timedelta(minutes=5))
            if not batch:
                break
            taken.extend(batch)
        return taken

    a, b = await asyncio.gather(drain(first), drain(second))

    assert set() == set(a) & set(b)
    assert sorted(due) == sorted(a + b)


async def test_a_frozen_clock_claims_items_due_exactly_now(ledger: Ledger) -> None:
    await ledger.schedule("cred_a", NOW)
    assert await ledger.claim_due(NOW, limit=1, visibility=VISIBILITY) == ["cred_a"]
    await ledger.schedule("cred_a", NOW)
    assert await ledger.claim_due(NOW, limit=1, visibility=VISIBILITY) == ["cred_a"]


async def test_a_clock_stepping_back_neither_claims_early_nor_releases_claims(
    ledger: Ledger,
) -> None:
    """SECURITY 36: time is the caller's; a backwards step changes nothing it should not."""
    await _schedule_all(ledger, {"cred_a": NOW, "cred_b": NOW + timedelta(hours=1)})
    jumped = NOW + timedelta(days=1)
    assert await ledger.claim_due(jumped, limit=10, visibility=VISIBILITY) == ["cred_a", "cred_b"]
    await ledger.schedule("cred_c", NOW)
    # Back to NOW: cred_a and cred_b stay claimed (their deadline is a day ahead).
    assert await ledger.claim_due(NOW, limit=10, visibility=VISIBILITY) == ["cred_c"]
    assert await ledger.claim_due(NOW - timedelta(hours=1), limit=10, visibility=VISIBILITY) == []


async def test_an_overdue_backlog_drains_oldest_first_in_bounded_batches(ledger: Ledger) -> None:
    """SECURITY 37: broker and Redis were down for a day."""
    due = {
        f"cred_{n:03d}": NOW - timedelta(days=1) + timedelta(minutes=(n * 7) % 300)
        for n in range(300)
    }
    await _schedule_all(ledger, due)
    batches = []
    for _ in range(10):
        batch = await ledger.claim_due(NOW, limit=50, visibility=VISIBILITY)
        if not batch:
            break
        batches.append(batch)
        for cid in batch:
            await ledger.ack(cid)
    drained = [due[cid] for batch in batches for cid in batch]
    assert [len(batch) for batch in batches] == [50] * 6
    assert sorted(drained) == drained


@pytest.mark.parametrize(("limit", "visibility"), [(0, VISIBILITY), (1, timedelta(0))])
async def test_claim_due_needs_a_positive_limit_and_visibility(
    ledger: Ledger, limit: int, visibility: timedelta
) -> None:
    with pytest.raises(ValueError, match="positive"):
        await ledger.claim_due(NOW, limit=limit, visibility=visibility)


# --------------------------------------------------------------------------- property


class DueModel:
    """The due index as plainly as it can be said."""

    def __init__(self) -> None:
        self.due: dict[str, int] = {}
        self.claimed: dict[str, tuple[int, int]] = {}  # id → (deadline, due)

    def schedule(self, cid: str, at: int) -> None:
        self.claimed.pop(cid, None)
        self.due[cid] = at

    def claim(self, now: int, limit: int, visibility: int) -> list[str]:
        for cid, (deadline, at) in list(self.claimed.items()):
            if deadline <= now:
                del self.claimed[cid]
                self.due[cid] = at
        chosen = sorted((at, cid) for cid, at in self.due.items() if at <= now)[:limit]
        for at, cid in chosen:
            del self.due[cid]
            self.claimed[cid] = (now + visibility, at)
        return [cid for _, cid in chosen]

    def ack(self, cid: str) -> None:
        self.claimed.pop(cid, None)


IDS = [f"cred_{n}" for n in range(8)]
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.sampled_from(IDS), st.integers(0, 60)),
        st.tuples(st.just("claim"), st.integers(0, 90), st.integers(1, 4), st.integers(1, 30)),
        st.tuples(st.just("ack"), st.sampled_from(IDS)),
    ),
    max_size=30,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations=OPERATIONS)
async def test_claims_acks_and_schedules_agree_with_the_model(
    ledgers: Ledgers, operations: list[tuple[Any, ...]]
) -> None:
    """Any sequence (clock jumping back and forth in seconds) gives the model's answers."""
    ledger = ledgers.new()
    model = DueModel()
    second = timedelta(seconds=1)
    for operation in operations:
        match operation:
            case ("schedule", str(cid), int(at)):
                model.schedule(cid, at)
                await ledger.schedule(cid, NOW + at * second)
            case ("claim", int(now), int(limit), int(visibility)):
                expected = model.claim(now, limit, visibility)
                actual = await ledger.claim_due(
                    NOW + now * second, limit=limit, visibility=visibility * second
                )
                assert expected == actual
            case ("ack", str(cid)):
                model.ack(cid)
                await ledger.ack(cid)


# --------------------------------------------------------------------------- the run at write-ahead
# The write-ahead looks at the stored run in its own atomic step: a run that ended (or passed
# its deadline) after the request read it refuses the lease, so completion never misses one.


async def test_a_run_no_longer_active_refuses_the_write_ahead(ledger: Ledger) -> None:
    run = make_run()
    await ledger.create_run(run)
    assert await ledger.write_ahead(make_lease("cred_a")) is None
    # At its deadline (not marked expired yet): refused, nothing written, the key not bound.
    late = make_lease("cred_b", issued_at=run.deadline)
    with pytest.raises(ConflictError) as caught:
        await ledger.write_ahead(late, idempotency=_bind("agent|k1"), limits=_TWO)
    assert caught.value.reason == "workflow.not_active"
    assert await ledger.get_lease("cred_b") is None
    # Ended: refused; the same write of a lease written before the end is a retry, not refused.
    ended = dataclasses.replace(
        run, state=RunState.COMPLETED, ended_at=NOW + timedelta(minutes=1), outcome="completed"
    )
    await ledger.save_run(ended)
    with pytest.raises(ConflictError) as caught:
        await ledger.write_ahead(make_lease("cred_c", issued_at=NOW + timedelta(minutes=2)))
    assert caught.value.reason == "workflow.not_active"
    assert await ledger.write_ahead(make_lease("cred_a")) is None
    # A run the ledger does not hold is the caller's to check; the refused key is free.
    other = make_lease("cred_d", workflow_id="wf-2")
    assert await ledger.write_ahead(other, idempotency=_bind("agent|k1"), limits=_TWO) is None
