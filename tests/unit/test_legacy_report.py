"""The legacy burn-down: the tally (pure), the reporter over the in-memory ledger, the route's
JSON against its OpenAPI view, and the per-target request counter of the issuance middleware.
On the real stack: tests/integration/test_legacy_report.py."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter
from typer.testing import CliRunner

from broker.adapters.memory_ledger import InMemoryLedger
from broker.cli import app
from broker.core.authn import Caller
from broker.core.legacy import LegacyTally, burn_down_order
from broker.core.model import Lease, LeaseState, Sensitivity, Target, TargetKind
from broker.core.roles import Role
from broker.errors import BadRequestError, ForbiddenError
from broker.http import responses
from broker.http.report_routes import legacy_report_json
from broker.legacy import LegacyReporter
from tests.contract.test_ledger import make_lease, make_run
from tests.unit.test_service_issuance import workload

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # the contract suite's
ADMIN = workload("spiffe://tasklease.test/admin/demo", Role.ADMIN)
AGENT_A = "spiffe://tasklease.test/agent/a"
AGENT_B = "spiffe://tasklease.test/agent/b"


def target(name: str, *, legacy: bool = True) -> Target:
    return Target(
        name=name,
        kind=TargetKind.VAULT_TOKEN,
        policies=(f"target-{name}",),
        system="crm",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=15),
        legacy=legacy,
    )


CRM = target("legacy-crm")
FTP = target("legacy-ftp")
DB = target("demo-db", legacy=False)


def lease(
    cid: str,
    *,
    target: str = "legacy-crm",
    holder: str = AGENT_A,
    owner: str = "alice@example.test",
    run: str = "wf-1",
    issued: timedelta = timedelta(0),
    ttl: timedelta = timedelta(minutes=5),
    state: LeaseState = LeaseState.ACTIVE,
) -> Lease:
    return dataclasses.replace(
        make_lease(cid, workflow_id=run),
        target=target,
        holder=holder,
        owner=owner,
        issued_at=NOW + issued,
        expires_at=NOW + issued + ttl,
        state=state,
    )


# --------------------------------------------------------------------------- the tally


def test_the_tally_counts_credentials_runs_holders_owners_and_live_ones() -> None:
    tally = LegacyTally(target=CRM, now=NOW + timedelta(minutes=10))
    for item in (
        lease("c1", issued=-timedelta(hours=2)),  # expired
        lease("c2", issued=timedelta(minutes=8), run="wf-2"),  # live
        lease("c3", holder=AGENT_B, owner="bob@example.test", issued=timedelta(minutes=9)),
        lease("c4", issued=timedelta(minutes=9), state=LeaseState.REVOKED),  # revoked early
        lease("c5", target="demo-db"),  # another target's: ignored
    ):
        tally.add(item)

    usage = tally.usage()

    assert (usage.credentials, usage.live, usage.runs) == (4, 2, 2)
    assert (usage.first_issued_at, usage.last_issued_at) == (
        NOW - timedelta(hours=2),
        NOW + timedelta(minutes=9),
    )
    assert [(u.who, u.credentials, u.last_issued_at) for u in usage.holders] == [
        (AGENT_A, 3, NOW + timedelta(minutes=9)),
        (AGENT_B, 1, NOW + timedelta(minutes=9)),
    ]
    assert [(u.who, u.credentials) for u in usage.owners] == [
        ("alice@example.test", 3),
        ("bob@example.test", 1),
    ]
    assert (usage.holder_count, usage.owner_count, usage.complete, usage.unused) == (
        2,
        2,
        True,
        False,
    )


def test_since_leaves_out_what_was_issued_before() -> None:
    tally = LegacyTally(target=CRM, now=NOW, since=NOW - timedelta(hours=1))
    tally.add(lease("old", issued=-timedelta(hours=3)))
    tally.add(lease("new", issued=-timedelta(minutes=1)))
    usage = tally.usage()
    assert (usage.credentials, usage.first_issued_at) == (1, NOW - timedelta(minutes=1))


def test_only_the_top_holders_are_named_but_all_are_counted() -> None:
    tally = LegacyTally(target=CRM, now=NOW)
    for n in range(5):
        for k in range(n + 1):  # agent-n holds n + 1 credentials
            tally.add(lease(f"c{n}-{k}", holder=f"spiffe://tasklease.test/agent/{n}"))
    usage = tally.usage(top=2)
    assert [(u.who.rsplit("/", 1)[1], u.credentials) for u in usage.holders] == [("4", 5), ("3", 4)]
    assert (usage.holder_count, usage.credentials) == (5, 15)


def test_an_unused_target_sorts_last_and_says_so() -> None:
    used_long_ago, used_lately = LegacyTally(target=CRM, now=NOW), LegacyTally(target=FTP, now=NOW)
    used_long_ago.add(lease("a", issued=-timedelta(days=20)))
    used_lately.add(lease("b", target="legacy-ftp", issued=-timedelta(days=1)))
    unused = LegacyTally(target=target("legacy-zip"), now=NOW).usage()
    ordered = burn_down_order([unused, used_long_ago.usage(), used_lately.usage()])
    assert [u.target.name for u in ordered] == ["legacy-ftp", "legacy-crm", "legacy-zip"]
    assert (unused.unused, unused.first_issued_at, unused.holders) == (True, None, ())


# --------------------------------------------------------------------------- the reporter


async def ledger_with(*leases: Lease) -> InMemoryLedger:
    ledger = InMemoryLedger()
    for run_id in sorted({item.workflow_id for item in leases}):
        await ledger.create_run(make_run(run_id))
    for item in leases:
        await ledger.write_ahead(dataclasses.replace(item, state=LeaseState.ISSUING))
        await ledger.save_lease(item)
    return ledger


class Clock:
    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current


def reporter(
    ledger: InMemoryLedger, catalog: dict[str, Target], *, scan_limit: int = 1000
) -> LegacyReporter:
    return LegacyReporter(
        ledger=ledger,
        targets=lambda: catalog,
        clock=Clock(NOW + timedelta(minutes=1)),
        ledger_retention=timedelta(days=30),
        scan_limit=scan_limit,
    )


async def test_the_report_covers_every_legacy_target_of_the_catalog_in_force() -> None:
    ledger = await ledger_with(
        lease("c1"),
        lease("c2", holder=AGENT_B, run="wf-2"),
        lease("c3", target="demo-db"),  # not legacy: not reported
    )
    catalog = {"legacy-crm": CRM, "legacy-ftp": FTP, "demo-db": DB}
    report = await reporter(ledger, catalog).report(ADMIN)

    assert [u.target.name for u in report.targets] == ["legacy-crm", "legacy-ftp"]
    crm, ftp = report.targets
    assert (crm.credentials, crm.live, crm.runs, crm.holder_count, crm.complete) == (
        2,
        2,
        2,
        2,
        True,
    )
    assert ftp.unused
    assert (report.generated_at, report.since, report.ledger_retention.days) == (
        NOW + timedelta(minutes=1),
        None,
        30,
    )
    # A hot reload that drops the legacy flag (or the target) drops it from the report.
    catalog["legacy-ftp"] = dataclasses.replace(FTP, legacy=False)
    assert [u.target.name for u in (await reporter(ledger, catalog).report(ADMIN)).targets] == [
        "legacy-crm"
    ]


async def test_a_read_stopped_at_its_bound_is_marked_incomplete() -> None:
    ledger = await ledger_with(*(lease(f"c{n}") for n in range(5)))
    full = await reporter(ledger, {"legacy-crm": CRM}, scan_limit=5).report(ADMIN)
    cut = await reporter(ledger, {"legacy-crm": CRM}, scan_limit=3).report(ADMIN)
    assert (full.targets[0].credentials, full.targets[0].complete) == (5, True)
    assert (cut.targets[0].credentials, cut.targets[0].complete) == (3, False)


@pytest.mark.parametrize("role", [Role.AGENT, Role.ORCHESTRATOR, Role.APPROVER])
async def test_only_admins_read_it(role: Role) -> None:
    caller: Caller = workload("spiffe://tasklease.test/x/y", role)
    with pytest.raises(ForbiddenError) as caught:
        await reporter(InMemoryLedger(), {"legacy-crm": CRM}).report(caller)
    assert caught.value.reason == "auth.role_required"


async def test_since_in_the_future_is_a_bad_request() -> None:
    with pytest.raises(BadRequestError) as caught:
        await reporter(InMemoryLedger(), {}).report(ADMIN, since=NOW + timedelta(hours=1))
    assert caught.value.reason == "query.invalid"


async def test_the_json_is_the_documented_view() -> None:
    ledger = await ledger_with(lease("c1"), lease("c2", holder=AGENT_B))
    report = await reporter(ledger, {"legacy-crm": CRM, "legacy-ftp": FTP}).report(
        ADMIN, since=NOW - timedelta(days=7)
    )
    body = legacy_report_json(report)
    TypeAdapter(responses.LegacyReportView).validate_python(body)
    assert body["since"] == (NOW - timedelta(days=7)).isoformat()
    first = body["targets"][0]
    assert first["target"]["name"] == "legacy-crm"
    assert first["target"]["legacy"] is True
    assert first["holders"][0] == {
        "who": AGENT_A,
        "credentials": 1,
        "last_issued_at": NOW.isoformat(),
    }
    assert body["targets"][1]["unused"] is True
    assert body["targets"][1]["last_issued_at"] is None


# --------------------------------------------------------------------------- the CLI's options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "is not an RFC 3339 time with an offset"),
        (["--since", "2030-01-01T00:00:00"], "is not an RFC 3339 time with an offset"),
        (["--since", "2030-01-01T00:00:00Z", "--days", "1"], "give --since or --days, not both"),
        (["--days", "0"], "--days"),
    ],
)
def test_report_legacy_refuses_a_bad_window_before_calling_the_broker(
    args: list[str], message: str
) -> None:
    """A usage error (exit 2) with no connection attempted (the URL points nowhere)."""
    result = CliRunner().invoke(
        app,
        ["--url", "https://127.0.0.1:9", "report", "legacy", *args],
        env={"SPIFFE_ENDPOINT_SOCKET": "", "COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
