"""The approval model (core/approvals.py): digest binding, quorum, separation of duties,
expiry, withdrawal, single use, and the stored form."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from broker.core.approvals import (
    STORED_APPROVAL_FIELDS,
    Approval,
    ApprovalStatus,
    ApprovalSubject,
    Verdict,
    approval_view,
    check_approval_id,
    decode_approval,
    encode_approval,
)
from broker.core.model import DelegationChain, DelegationHop
from broker.errors import ApprovalRefusedError, ApprovalStateError, BadRequestError

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
BOB = "oidc:https://idp.test#bob"
CAROL = "oidc:https://idp.test#carol"
BOT = "spiffe://tasklease.test/approval-bot/chatops"
CHAIN = DelegationChain(
    (
        DelegationHop("owner", "alice@example.test", verified=False),
        DelegationHop("orchestrator", ORCH, verified=True),
        DelegationHop("agent", AGENT, verified=True),
    )
)


def subject(**changes: object) -> ApprovalSubject:
    fields: dict[str, object] = {
        "workflow_id": "wf-1",
        "task_id": "t-1",
        "target": "prod-db",
        "ttl_seconds": 300,
        "holder": AGENT,
        "params": {},
    }
    fields.update(changes)
    return ApprovalSubject(**fields)  # type: ignore[arg-type]


def opened(quorum: int = 1, validity: timedelta = timedelta(hours=1)) -> Approval:
    return Approval.open(
        subject=subject(),
        owner="alice@example.test",
        chain=CHAIN,
        now=NOW,
        validity=validity,
        quorum=quorum,
        policy_ids=("restricted-needs-approval",),
        reasons=("restricted targets need an approval",),
        justification="read the orders table",
    )


def approve(approval: Approval, who: str, at: datetime = NOW, display: str = "") -> Approval:
    return approval.decide(approver=who, display=display or who, verdict=Verdict.APPROVE, now=at)


# --------------------------------------------------------------------------- digest


def test_the_digest_is_sha256_of_the_request_and_stable() -> None:
    digest = subject().digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert subject().digest() == digest
    assert (
        subject(params={"b": "2", "a": "1"}).digest()
        == subject(params={"a": "1", "b": "2"}).digest()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"workflow_id": "wf-2"},
        {"task_id": "t-2"},
        {"target": "demo-db"},
        {"ttl_seconds": 301},
        {"holder": "spiffe://tasklease.test/agent/other"},
        {"params": {"public_key": "ssh-ed25519 AAAA other"}},
    ],
    ids=["run", "task", "target", "ttl", "holder", "params"],
)
def test_every_part_of_the_request_changes_the_digest(change: dict[str, object]) -> None:
    assert subject(**change).digest() != subject().digest()


def test_an_approval_bound_to_another_request_is_refused() -> None:
    approved = approve(opened(), BOB)
    other = subject(ttl_seconds=3600).digest()
    with pytest.raises(ApprovalRefusedError) as caught:
        approved.check_usable(other, NOW)
    assert caught.value.reason == "approval.digest_mismatch"
    approved.check_usable(subject().digest(), NOW)


def test_an_approval_cannot_be_built_with_a_digest_of_another_subject() -> None:
    with pytest.raises(ValueError, match="digest does not match"):
        dataclasses.replace(opened(), digest=subject(task_id="t-9").digest())


# --------------------------------------------------------------------------- quorum


def test_one_approval_reaches_a_quorum_of_one() -> None:
    approval = approve(opened(), BOB)
    assert (approval.state, approval.approvers, approval.version) == (
        ApprovalStatus.APPROVED,
        (BOB,),
        2,
    )


def test_a_quorum_of_two_needs_two_distinct_approvers() -> None:
    first = approve(opened(quorum=2), BOB)
    assert first.state is ApprovalStatus.PENDING
    with pytest.raises(ApprovalStateError) as early:
        first.check_usable(first.digest, NOW)
    assert early.value.reason == "approval.quorum_not_reached"
    with pytest.raises(ApprovalStateError) as twice:
        approve(first, BOB)
    assert twice.value.reason == "approval.duplicate_approver"
    second = approve(first, BOT)
    assert (second.state, second.approvers) == (ApprovalStatus.APPROVED, (BOB, BOT))
    second.check_usable(second.digest, NOW)


def test_a_deny_is_final() -> None:
    denied = opened(quorum=2).decide(
        approver=BOB, display="bob", verdict=Verdict.DENY, now=NOW, comment="not today"
    )
    assert (denied.state, denied.closed_by, denied.close_comment) == (
        ApprovalStatus.DENIED,
        BOB,
        "not today",
    )
    for step in (
        lambda: approve(denied, CAROL),
        lambda: denied.withdraw(by=AGENT, now=NOW),
        lambda: denied.check_usable(denied.digest, NOW),
    ):
        with pytest.raises(ApprovalStateError) as caught:
            step()
        assert caught.value.reason == "approval.denied"


def test_an_approved_approval_takes_no_more_votes() -> None:
    approved = approve(opened(), BOB)
    with pytest.raises(ApprovalStateError) as caught:
        approved.decide(approver=CAROL, display="carol", verdict=Verdict.DENY, now=NOW)
    assert caught.value.reason == "approval.not_pending"


# --------------------------------------------------------------------------- separation of duties


@pytest.mark.parametrize(
    ("approver", "display"),
    [
        (AGENT, AGENT),  # the requesting workload
        ("alice@example.test", "alice@example.test"),  # the owner, by principal id
        ("oidc:https://idp.test#u-1", "Alice@Example.test"),  # the owner's e-mail as display
    ],
    ids=["requester", "owner-principal", "owner-display"],
)
def test_separation_of_duties(approver: str, display: str) -> None:
    with pytest.raises(ApprovalRefusedError) as caught:
        opened().decide(approver=approver, display=display, verdict=Verdict.APPROVE, now=NOW)
    assert caught.value.reason == "approval.sod_violation"


def test_an_owner_given_as_a_principal_id_is_matched_exactly() -> None:
    approval = dataclasses.replace(opened(), owner=BOB)
    with pytest.raises(ApprovalRefusedError):
        approve(approval, BOB, display="bob@example.test")
    assert approve(approval, CAROL).state is ApprovalStatus.APPROVED


# --------------------------------------------------------------------------- expiry


def test_expiry_is_derived_and_refuses_every_step() -> None:
    approval = approve(opened(validity=timedelta(minutes=10)), BOB)
    end = NOW + timedelta(minutes=10)
    assert approval.status_at(end - timedelta(microseconds=1)) is ApprovalStatus.APPROVED
    assert approval.status_at(end) is ApprovalStatus.EXPIRED
    with pytest.raises(ApprovalStateError) as caught:
        approval.check_usable(approval.digest, end)
    assert caught.value.reason == "approval.expired"
    pending = opened(validity=timedelta(minutes=10))
    with pytest.raises(ApprovalStateError) as late:
        approve(pending, BOB, at=end)
    assert late.value.reason == "approval.expired"


def test_recording_an_expiry() -> None:
    approval = opened(validity=timedelta(minutes=10))
    with pytest.raises(ValueError, match="not due to expire"):
        approval.expire(NOW)
    expired = approval.expire(NOW + timedelta(minutes=11))
    assert (expired.state, expired.closed_at, expired.version) == (
        ApprovalStatus.EXPIRED,
        approval.expires_at,
        2,
    )


# --------------------------------------------------------------------------- withdraw, single use


def test_a_withdrawn_approval_cannot_be_used_or_decided() -> None:
    withdrawn = approve(opened(), BOB).withdraw(by=AGENT, now=NOW, comment="not needed")
    assert (withdrawn.state, withdrawn.closed_by) == (ApprovalStatus.WITHDRAWN, AGENT)
    for step in (
        lambda: withdrawn.check_usable(withdrawn.digest, NOW),
        lambda: approve(withdrawn, CAROL),
        lambda: withdrawn.withdraw(by=AGENT, now=NOW),
    ):
        with pytest.raises(ApprovalStateError) as caught:
            step()
        assert caught.value.reason == "approval.withdrawn"


def test_an_approval_is_used_once() -> None:
    approved = approve(opened(), BOB)
    used = approved.consume(digest=approved.digest, credential_id="cred_1", now=NOW)
    assert (used.state, used.credential_id, used.version) == (ApprovalStatus.USED, "cred_1", 3)
    with pytest.raises(ApprovalStateError) as caught:
        used.consume(digest=used.digest, credential_id="cred_2", now=NOW)
    assert caught.value.reason == "approval.used"
    assert "cred_1" in caught.value.detail


def test_a_used_approval_can_still_be_withdrawn() -> None:
    used = approve(opened(), BOB).consume(digest=opened().digest, credential_id="cred_1", now=NOW)
    withdrawn = used.withdraw(by=BOB, now=NOW + timedelta(minutes=1))
    assert (withdrawn.state, withdrawn.credential_id) == (ApprovalStatus.WITHDRAWN, "cred_1")


def test_a_pending_approval_cannot_be_used() -> None:
    with pytest.raises(ApprovalStateError) as caught:
        opened().consume(digest=opened().digest, credential_id="cred_1", now=NOW)
    assert caught.value.reason == "approval.quorum_not_reached"


def test_a_use_that_minted_nothing_is_released_back_to_approved() -> None:
    approved = approve(opened(), BOB)
    used = approved.consume(digest=approved.digest, credential_id="cred_1", now=NOW)
    later = NOW + timedelta(minutes=5)
    released = used.release(credential_id="cred_1", version=used.version, now=later)
    assert (released.state, released.credential_id, released.version) == (
        ApprovalStatus.APPROVED,
        "",
        used.version + 1,
    )
    assert (released.closed_at, released.closed_by, released.close_comment) == (None, "", "")
    # Everything else is as approved: the same votes, expiry and binding; usable again.
    assert dataclasses.replace(released, version=approved.version) == approved
    released.check_usable(approved.digest, later)
    again = released.consume(digest=approved.digest, credential_id="cred_2", now=later)
    assert (again.state, again.credential_id) == (ApprovalStatus.USED, "cred_2")


def test_only_the_same_unchanged_unexpired_use_is_released() -> None:
    approved = approve(opened(validity=timedelta(minutes=10)), BOB)
    used = approved.consume(digest=approved.digest, credential_id="cred_1", now=NOW)
    released = used.release(credential_id="cred_1", version=used.version, now=NOW)
    reused = released.consume(digest=approved.digest, credential_id="cred_2", now=NOW)
    refusals = {
        "another credential": lambda: used.release(
            credential_id="cred_2", version=used.version, now=NOW
        ),
        "another version": lambda: used.release(
            credential_id="cred_1", version=used.version - 1, now=NOW
        ),
        # Released once already (not idempotent: the version moved, it is no longer used).
        "twice": lambda: released.release(credential_id="cred_1", version=used.version, now=NOW),
        # Used again since, by a second credential: the first use cannot be released.
        "a second use": lambda: reused.release(
            credential_id="cred_1", version=used.version, now=NOW
        ),
        "a later release of the second use, at the old version": lambda: reused.release(
            credential_id="cred_2", version=used.version, now=NOW
        ),
        "withdrawn": lambda: used.withdraw(by=BOB, now=NOW).release(
            credential_id="cred_1", version=used.version, now=NOW
        ),
        "never used": lambda: approved.release(credential_id="", version=approved.version, now=NOW),
        "expired": lambda: used.release(
            credential_id="cred_1", version=used.version, now=NOW + timedelta(minutes=10)
        ),
    }
    for why, step in refusals.items():
        with pytest.raises(ApprovalStateError) as caught:
            step()
        assert caught.value.reason == "approval.not_releasable", why
    # The second use itself is releasable by its own credential and version.
    assert reused.release(credential_id="cred_2", version=reused.version, now=NOW).state is (
        ApprovalStatus.APPROVED
    )


# --------------------------------------------------------------------------- forms


def test_the_stored_form_round_trips_every_field() -> None:
    assert {f.name for f in dataclasses.fields(Approval)} == STORED_APPROVAL_FIELDS
    rich = approve(
        approve(opened(quorum=2), BOB, display="Bob"),
        BOT,
        at=NOW + timedelta(seconds=5),
    ).consume(digest=opened().digest, credential_id="cred_9", now=NOW + timedelta(seconds=9))
    assert decode_approval(encode_approval(rich)) == rich
    plain = opened()
    assert decode_approval(encode_approval(plain)) == plain


@pytest.mark.parametrize("raw", ["", "{}", '{"v":1}', "[1,2]", '{"id":"apr_x"}'])
def test_garbage_is_not_an_approval(raw: str) -> None:
    with pytest.raises(ValueError):
        decode_approval(raw)


def test_the_view_shows_no_parameter_values() -> None:
    approval = Approval.open(
        subject=subject(params={"public_key": "ssh-ed25519 AAAAC3Nza"}),
        owner="alice@example.test",
        chain=CHAIN,
        now=NOW,
        validity=timedelta(hours=1),
    )
    view = approval_view(approval, NOW)
    assert view["params"] == ["public_key"]
    assert "AAAAC3Nza" not in str(view)
    assert (view["state"], view["quorum"], view["approver_count"]) == ("pending", 1, 0)
    assert approval_view(approval, NOW + timedelta(hours=2))["state"] == "expired"


@pytest.mark.parametrize("value", ["", "apr_", "apr_XYZ", "apr_" + "0" * 23, 7, "../x"])
def test_approval_ids_are_checked_before_any_lookup(value: object) -> None:
    with pytest.raises(BadRequestError):
        check_approval_id(value)


def test_a_quorum_is_clamped_to_1_through_10() -> None:
    assert opened(quorum=0).quorum == 1
    assert opened(quorum=99).quorum == 10
