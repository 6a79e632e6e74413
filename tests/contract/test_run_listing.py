"""Listing runs, as a contract: latest over first (deadline, or end when earlier), filtered by
owner, orchestrator and state, a page at a time with a cursor that never repeats nor skips a
run (runs over at the same microsecond included), and a bounded read however selective the
filter. Every test runs against InMemoryLedger and RedisLedger on the stack's Redis."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from broker.core.model import RunState, WorkflowRun
from broker.core.ports import RUN_EXAMINE_FACTOR, Ledger, RunCursor, RunPage, RunQuery
from broker.errors import BadRequestError
from tests.contract.conftest import Ledgers
from tests.contract.test_ledger import NOW, make_run

MINUTE = timedelta(minutes=1)


@pytest.fixture
def ledger(ledgers: Ledgers) -> Ledger:
    return ledgers.new()


def _ids(page: RunPage) -> list[str]:
    return [run.id for run in page.runs]


async def _every_page(ledger: Ledger, query: RunQuery) -> tuple[list[str], int]:
    """Follow the cursors to the end: every run id listed, and how many pages it took."""
    listed: list[str] = []
    pages = 0
    while True:
        page = await ledger.list_runs(query)
        pages += 1
        listed += _ids(page)
        if page.next is None:
            return listed, pages
        query = dataclasses.replace(query, after=page.next)
        assert pages < 100, "the cursor does not advance"


async def test_runs_come_latest_over_first(ledger: Ledger) -> None:
    await ledger.create_run(make_run("wf-soon", deadline=NOW + 10 * MINUTE))
    await ledger.create_run(make_run("wf-late", deadline=NOW + 50 * MINUTE))
    await ledger.create_run(make_run("wf-mid", deadline=NOW + 30 * MINUTE))
    page = await ledger.list_runs(RunQuery())
    assert (_ids(page), page.next) == (["wf-late", "wf-mid", "wf-soon"], None)
    assert page.runs[0] == await ledger.get_run("wf-late")


async def test_a_run_that_ended_early_is_placed_at_its_end(ledger: Ledger) -> None:
    await ledger.create_run(make_run("wf-a", deadline=NOW + 50 * MINUTE))
    await ledger.create_run(make_run("wf-b", deadline=NOW + 40 * MINUTE))
    run = await ledger.get_run("wf-a")
    assert run is not None
    await ledger.save_run(
        dataclasses.replace(
            run, state=RunState.COMPLETED, ended_at=NOW + 5 * MINUTE, outcome="completed"
        )
    )
    page = await ledger.list_runs(RunQuery())
    assert _ids(page) == ["wf-b", "wf-a"]
    assert page.runs[1].state is RunState.COMPLETED


async def test_filters_select_by_owner_orchestrator_and_state(ledger: Ledger) -> None:
    await ledger.create_run(make_run("wf-alice", deadline=NOW + 50 * MINUTE))
    await ledger.create_run(make_run("wf-bob", owner="bob@example.com"))
    await ledger.create_run(
        make_run("wf-other-orch", started_by="spiffe://tasklease.test/orchestrator/other")
    )
    ended = await ledger.get_run("wf-alice")
    assert ended is not None
    await ledger.save_run(
        dataclasses.replace(ended, state=RunState.FAILED, ended_at=NOW, outcome="failed")
    )
    assert _ids(await ledger.list_runs(RunQuery(owner="bob@example.com"))) == ["wf-bob"]
    orchestrator = "spiffe://tasklease.test/orchestrator/other"
    assert _ids(await ledger.list_runs(RunQuery(started_by=orchestrator))) == ["wf-other-orch"]
    failed = RunQuery(states=frozenset({RunState.FAILED}))
    assert _ids(await ledger.list_runs(failed)) == ["wf-alice"]
    active_alice = RunQuery(owner="alice@example.com", states=frozenset({RunState.ACTIVE}))
    assert _ids(await ledger.list_runs(active_alice)) == ["wf-other-orch"]


async def test_labels_must_all_match(ledger: Ledger) -> None:
    await ledger.create_run(make_run("wf-both", labels={"ticket": "OPS-1", "team": "fin"}))
    await ledger.create_run(make_run("wf-ticket", labels={"ticket": "OPS-1"}))
    await ledger.create_run(make_run("wf-other", labels={"ticket": "OPS-2"}))
    await ledger.create_run(make_run("wf-none"))
    ticket = RunQuery(labels=(("ticket", "OPS-1"),))
    assert sorted(_ids(await ledger.list_runs(ticket))) == ["wf-both", "wf-ticket"]
    both = RunQuery(labels=(("ticket", "OPS-1"), ("team", "fin")))
    assert _ids(await ledger.list_runs(both)) == ["wf-both"]
    empty_value = RunQuery(labels=(("team", ""),))
    assert _ids(await ledger.list_runs(empty_value)) == []


async def test_pages_follow_one_another_without_repeats_or_gaps(ledger: Ledger) -> None:
    expected: list[str] = []
    for n in range(7):
        await ledger.create_run(make_run(f"wf-{n}", deadline=NOW + (n + 1) * MINUTE))
        expected.insert(0, f"wf-{n}")
    first = await ledger.list_runs(RunQuery(limit=3))
    assert _ids(first) == expected[:3]
    assert first.next is not None
    assert first.next.workflow_id == expected[2]
    listed, pages = await _every_page(ledger, RunQuery(limit=3))
    assert (listed, pages) == (expected, 3)


async def test_runs_over_at_the_same_instant_are_each_listed_once(ledger: Ledger) -> None:
    """Equal scores: the cursor's id places it among them (ids descending)."""
    same = [f"wf-tie-{n}" for n in range(5)]
    for run_id in same:
        await ledger.create_run(make_run(run_id, deadline=NOW + 20 * MINUTE))
    await ledger.create_run(make_run("wf-after", deadline=NOW + 10 * MINUTE))
    await ledger.create_run(make_run("wf-before", deadline=NOW + 30 * MINUTE))
    listed, _ = await _every_page(ledger, RunQuery(limit=2))
    assert listed == ["wf-before", *sorted(same, reverse=True), "wf-after"]


async def test_a_selective_filter_reads_a_bounded_stretch_and_says_where_to_go_on(
    ledger: Ledger,
) -> None:
    """With limit 1 a page examines at most RUN_EXAMINE_FACTOR entries: the one matching run
    far down the index takes several pages, some empty, and is listed once."""
    count = RUN_EXAMINE_FACTOR * 2 + 3
    for n in range(count):
        owner = "carol@example.com" if n == 0 else "alice@example.com"
        deadline = NOW + (n + 1) * MINUTE
        await ledger.create_run(make_run(f"wf-{n:03}", owner=owner, deadline=deadline))
    query = RunQuery(owner="carol@example.com", limit=1)
    first = await ledger.list_runs(query)
    assert (_ids(first), first.next is not None) == ([], True)
    listed, pages = await _every_page(ledger, query)
    assert (listed, pages) == (["wf-000"], 3)


async def test_a_cursor_past_the_end_lists_nothing(ledger: Ledger) -> None:
    await ledger.create_run(make_run("wf-1"))
    page = await ledger.list_runs(RunQuery(after=RunCursor(0, "wf-0")))
    assert page == RunPage((), None)


async def test_an_empty_ledger_lists_nothing(ledger: Ledger) -> None:
    assert await ledger.list_runs(RunQuery()) == RunPage((), None)


@pytest.mark.parametrize("limit", [0, -1, 501])
def test_a_limit_out_of_range_is_refused(limit: int) -> None:
    with pytest.raises(BadRequestError, match="limit must be 1-500"):
        RunQuery(limit=limit)


def test_label_filters_are_bounded_and_name_valid_keys() -> None:
    with pytest.raises(BadRequestError, match="at most 32 labels"):
        RunQuery(labels=tuple((f"k{n}", "v") for n in range(33)))
    with pytest.raises(BadRequestError, match="label key"):
        RunQuery(labels=(("bad key", "v"),))


def test_a_cursor_names_a_valid_run_id() -> None:
    with pytest.raises(BadRequestError):
        RunCursor(1, "not a valid id\n")


async def test_listing_returns_the_stored_runs(ledger: Ledger) -> None:
    run: WorkflowRun = make_run("wf-full", labels={"ticket": "OPS-1"})
    await ledger.create_run(run)
    (listed,) = (await ledger.list_runs(RunQuery())).runs
    assert listed == run
