"""No failed statement falls through: every failure ends, within the reconcile policy's times, in
a resend case with a due time or in print (pipeline.returns.deadlines), on SQLite and
PostgreSQL; and a property test over any sequence of outcomes, bounces, reviews and
acknowledgements."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import IllegalTransition
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import (
    AuditEvent,
    Base,
    Bounce,
    DeliverabilityAlert,
    Message,
    ResendCase,
    Statement,
    Suppression,
)
from pipeline.records.ledger.states import CaseState, MessageState, mark_resend_accepted
from pipeline.returns import cases, deadlines, reconcile
from pipeline.returns.bounces import BounceClass
from tests.ledger_seed import seed_run_and_file
from tests.test_cases import POLICY, SENDING, _accepted, _bounce

LATER = timedelta(days=365)


@pytest.fixture
def sessions(ledger_url: str) -> sessionmaker[Session]:
    return open_ledger(ledger_url)


def _reconcile_and_sweep(session: Session, at: datetime) -> dict[str, int]:
    for bounce in session.scalars(select(Bounce).where(Bounce.reconciled.is_(False))).all():
        reconcile.reconcile_bounce(session, bounce, POLICY)
    return deadlines.sweep(session, POLICY, now=at)


def _case_of(session: Session, message: Message) -> ResendCase | None:
    return session.get(ResendCase, reconcile.case_id_for(message.message_id))


def test_an_unknown_failure_opens_a_case_after_review_time(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        bounce = _bounce(session, message, BounceClass.UNKNOWN, "5.0.0")
        now = datetime.now(UTC)
        _reconcile_and_sweep(session, now + POLICY.unknown_review - timedelta(minutes=1))
        assert message.state == MessageState.ACCEPTED and _case_of(session, message) is None
        counts = _reconcile_and_sweep(session, now + POLICY.unknown_review + timedelta(minutes=1))
        assert counts["failures_escalated"] == 1
        assert message.state == MessageState.BOUNCED
        case = _case_of(session, message)
        assert case is not None and case.state == CaseState.NEEDS_VERIFICATION
        assert "unknown" in case.reason
        # Not suppressed: nobody said the address is bad.
        assert session.get(Suppression, message.recipient) is None
        # Once: the next sweep finds it handled.
        assert _reconcile_and_sweep(session, now + LATER / 2)["failures_escalated"] == 0
        assert bounce.bounce_class == BounceClass.UNKNOWN
        actions = session.scalars(select(AuditEvent.action)).all()
        assert "failure_escalated" in actions and "resend_case_opened" in actions


def test_a_policy_block_not_acknowledged_in_time_opens_a_case(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1, email="u@bigmail.example")
        _bounce(session, message, BounceClass.POLICY_BLOCK, "5.7.1")
        now = datetime.now(UTC)
        _reconcile_and_sweep(session, now + POLICY.policy_block_ack - timedelta(minutes=1))
        assert _case_of(session, message) is None
        _reconcile_and_sweep(session, now + POLICY.policy_block_ack + timedelta(minutes=1))
        case = _case_of(session, message)
        assert case is not None and case.state == CaseState.NEEDS_VERIFICATION
        # A late acknowledgement does not requeue a statement that has its case already.
        alert = session.scalars(select(DeliverabilityAlert)).one()
        assert (
            reconcile.acknowledge_alert(session, alert.alert_id, actor="ops", policy=SENDING) == 0
        )


def test_a_requeued_policy_block_that_fails_again_opens_a_case_at_once(
    sessions: sessionmaker[Session],
):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1, email="u@bigmail.example")
        _bounce(session, message, BounceClass.POLICY_BLOCK, "5.7.1")
        now = datetime.now(UTC)
        _reconcile_and_sweep(session, now)
        alert = session.scalars(select(DeliverabilityAlert)).one()
        assert (
            reconcile.acknowledge_alert(session, alert.alert_id, actor="ops", policy=SENDING) == 1
        )
        requeued = session.scalars(select(Message).where(Message.attempt == 2)).one()
        requeued.state = MessageState.ACCEPTED
        _bounce(session, requeued, BounceClass.POLICY_BLOCK, "5.7.1")
        _reconcile_and_sweep(session, datetime.now(UTC))
        case = _case_of(session, requeued)
        assert case is not None and case.state == CaseState.NEEDS_VERIFICATION


def test_a_lone_soft_bounce_opens_a_case_past_the_soft_age(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        _bounce(session, message, BounceClass.SOFT_BOUNCE, "4.2.2")
        now = datetime.now(UTC)
        _reconcile_and_sweep(session, now)
        assert _case_of(session, message) is None
        _reconcile_and_sweep(session, now + POLICY.soft_max_age + timedelta(minutes=1))
        assert _case_of(session, message) is not None


@pytest.mark.parametrize("state", [MessageState.EXPIRED, MessageState.SUPPRESSED])
def test_an_expired_or_suppressed_first_attempt_opens_a_case(
    sessions: sessionmaker[Session], state: MessageState
):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        message.state = state
        _reconcile_and_sweep(session, datetime.now(UTC))
        case = _case_of(session, message)
        assert case is not None and state in case.reason


def _resend(session: Session) -> tuple[ResendCase, Message]:
    message = _accepted(session, 1)
    _bounce(session, message, BounceClass.HARD_BOUNCE)
    _reconcile_and_sweep(session, datetime.now(UTC))
    case = session.get_one(ResendCase, reconcile.case_id_for(message.message_id))
    cases.verify(
        session, case.case_id, actor="alice", channel="phone", evidence="called", address="n@x.org"
    )
    cases.approve(session, case.case_id, actor="bob")
    cases.plan_approved_resends(session, SENDING)
    resend = session.scalars(select(Message).where(Message.case_id == case.case_id)).one()
    assert case.state == CaseState.RESEND_PLANNED
    return case, resend


@pytest.mark.parametrize(
    ("outcome", "bounce_class", "expected"),
    [
        (MessageState.EXPIRED, None, CaseState.NEEDS_VERIFICATION),
        (MessageState.FALLBACK, None, CaseState.PRINT_FALLBACK),
        # Refused at SMTP time as a block, a temporary problem or unexplained: not left planned.
        (MessageState.BOUNCED, BounceClass.POLICY_BLOCK, CaseState.NEEDS_VERIFICATION),
        (MessageState.BOUNCED, BounceClass.SOFT_BOUNCE, CaseState.NEEDS_VERIFICATION),
        (MessageState.BOUNCED, BounceClass.UNKNOWN, CaseState.NEEDS_VERIFICATION),
    ],
)
def test_a_resend_that_fails_leaves_resend_planned(
    sessions: sessionmaker[Session],
    outcome: MessageState,
    bounce_class: BounceClass | None,
    expected: CaseState,
):
    with sessions.begin() as session:
        seed_run_and_file(session)
        case, resend = _resend(session)
        resend.state = outcome
        if bounce_class is not None:
            _bounce(session, resend, bounce_class, "5.0.0")
        _reconcile_and_sweep(session, datetime.now(UTC))
        assert case.state == expected
        assert case.failures == 2 or expected == CaseState.PRINT_FALLBACK


def test_an_open_case_past_its_due_time_goes_to_print(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        _bounce(session, message, BounceClass.HARD_BOUNCE)
        now = datetime.now(UTC)
        _reconcile_and_sweep(session, now)
        case = session.get_one(ResendCase, reconcile.case_id_for(message.message_id))
        due = deadlines.case_due_at(case, POLICY)
        assert due is not None
        _reconcile_and_sweep(session, due - timedelta(minutes=1))
        assert case.state == CaseState.NEEDS_VERIFICATION
        counts = _reconcile_and_sweep(session, due + timedelta(minutes=1))
        assert counts["overdue_cases_printed"] == 1
        assert case.state == CaseState.PRINT_FALLBACK
        assert deadlines.case_due_at(case, POLICY) is None


def test_operations_reclassify_an_unknown_report(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        bounce = _bounce(session, message, BounceClass.UNKNOWN, "5.0.0")
        _reconcile_and_sweep(session, datetime.now(UTC))
        deadlines.reclassify(session, bounce.bounce_id, BounceClass.HARD_BOUNCE, actor="carol")
        _reconcile_and_sweep(session, datetime.now(UTC))
        assert session.get(Suppression, message.recipient) is not None
        assert _case_of(session, message) is not None
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "bounce_reclassified")
        ).one()
        assert (event.actor, event.entity_id) == ("carol", str(bounce.bounce_id))
        assert "to=hard_bounce" in event.detail
        # Only an unknown report, and only to a class a person can judge.
        with pytest.raises(cases.CaseActionRefused, match="not unknown"):
            deadlines.reclassify(session, bounce.bounce_id, BounceClass.SOFT_BOUNCE, actor="c")
        other = _bounce(session, message, BounceClass.UNKNOWN, "5.0.0")
        with pytest.raises(cases.CaseActionRefused, match="cannot be reclassified as"):
            deadlines.reclassify(session, other.bounce_id, BounceClass.DELIVERED, actor="c")


def test_the_cli_reclassifies_with_an_actor(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.config import Settings
    from pipeline.ops.cli import main

    settings = Settings(data_dir=tmp_path / "data")
    url = settings.ledger_url
    monkeypatch.setenv("EOB_DATA_DIR", str(settings.data_dir))
    with open_ledger(url).begin() as session:
        seed_run_and_file(session)
        bounce = _bounce(session, _accepted(session, 1), BounceClass.UNKNOWN, "5.0.0")
        bounce_id = bounce.bounce_id
    args = ["review", "reclassify", str(bounce_id), "soft_bounce", "--actor", "carol"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with open_ledger(url)() as session:
        stored = session.get_one(Bounce, bounce_id)
        assert (stored.bounce_class, stored.reconciled) == ("soft_bounce", False)
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "not unknown" in again.output


# --- property: whatever happens, every statement ends owned ------------------------------

FAILURES = [
    BounceClass.HARD_BOUNCE,
    BounceClass.SOFT_BOUNCE,
    BounceClass.POLICY_BLOCK,
    BounceClass.UNKNOWN,
]
SEND_OUTCOMES = [
    MessageState.ACCEPTED,
    MessageState.BOUNCED,
    MessageState.EXPIRED,
    MessageState.FALLBACK,
]
STATEMENTS = st.integers(min_value=0, max_value=2)


class FailureMachine(RuleBasedStateMachine):
    """Three statements; any sequence of send outcomes, reports of any class (as DSNs or at
    SMTP time), reviews, acknowledgements, verifications and sweeps. Once the send loop has
    given every attempt an outcome and the sweep has run past every deadline, each statement
    is accepted or delivered, in an open case with a due time, or in print."""

    def __init__(self) -> None:
        super().__init__()
        self.session = Session(create_engine("sqlite://"))
        Base.metadata.create_all(self.session.get_bind())
        seed_run_and_file(self.session)
        for n in range(3):
            _accepted(self.session, n, email=f"u{n}@bigmail.example").state = MessageState.PLANNED
        self.now = datetime.now(UTC)

    def _latest(self, n: int) -> Message:
        return self.session.scalars(
            select(Message).where(Message.statement_id == f"s{n}").order_by(Message.attempt.desc())
        ).first()  # type: ignore[return-value]

    @rule(n=STATEMENTS, outcome=st.sampled_from(SEND_OUTCOMES), cls=st.sampled_from(FAILURES))
    def send(self, n: int, outcome: MessageState, cls: BounceClass) -> None:
        message = self._latest(n)
        if message.state != MessageState.PLANNED:
            return
        self._send(message, outcome, cls, notice=n == 1)

    def _send(self, message: Message, outcome: MessageState, cls: BounceClass, notice: bool):
        # As the send stage records them (pipeline.delivery.steps._record_result).
        message.state = outcome
        if outcome == MessageState.ACCEPTED:
            mark_resend_accepted(self.session, message)
        elif outcome == MessageState.BOUNCED:
            bounce = _bounce(self.session, message, cls, "5.0.0")
            bounce.kind = "smtp"
        elif outcome == MessageState.FALLBACK and not notice:
            self.session.get_one(Statement, message.statement_id).channel = "print"
        self.session.flush()

    @rule(n=STATEMENTS, cls=st.sampled_from([*FAILURES, BounceClass.DELIVERED]))
    def report(self, n: int, cls: BounceClass) -> None:
        message = self._latest(n)
        if message.state == MessageState.ACCEPTED:
            _bounce(self.session, message, cls, "5.0.0")

    @rule(cls=st.sampled_from(FAILURES[:3]))
    def review(self, cls: BounceClass) -> None:
        unknown = self.session.scalars(
            select(Bounce).where(Bounce.bounce_class == BounceClass.UNKNOWN)
        ).first()
        if unknown is not None:
            deadlines.reclassify(self.session, unknown.bounce_id, cls, actor="ops")

    @rule()
    def acknowledge(self) -> None:
        for alert in self.session.scalars(
            select(DeliverabilityAlert).where(DeliverabilityAlert.acknowledged_at.is_(None))
        ).all():
            reconcile.acknowledge_alert(self.session, alert.alert_id, actor="ops", policy=SENDING)

    @rule(n=STATEMENTS, address=st.sampled_from(["u0@bigmail.example", "n@new.example"]))
    def verify_and_approve(self, n: int, address: str) -> None:
        for case in self.session.scalars(
            select(ResendCase).where(ResendCase.statement_id == f"s{n}")
        ).all():
            try:
                cases.verify(
                    self.session,
                    case.case_id,
                    actor="alice",
                    channel="phone",
                    evidence="called",
                    address=address,
                )
                cases.approve(self.session, case.case_id, actor="bob")
            except (cases.CaseActionRefused, IllegalTransition):
                pass
        cases.plan_approved_resends(self.session, SENDING)

    @rule(hours=st.integers(min_value=0, max_value=30))
    def sweep(self, hours: int) -> None:
        self.now += timedelta(hours=hours)
        _reconcile_and_sweep(self.session, self.now)

    def teardown(self) -> None:
        try:
            self._settle_and_check()
        finally:
            self.session.close()

    def _settle_and_check(self) -> None:
        # The send loop gives every planned attempt an outcome (it expires what it cannot send).
        for n in range(3):
            message = self._latest(n)
            if message.state == MessageState.PLANNED:
                self._send(message, MessageState.EXPIRED, BounceClass.UNKNOWN, notice=False)
        # Past every wait of the policy, from now (the simulated clock) and from the wall clock
        # the rows were written with.
        waits = max(POLICY.soft_max_age, POLICY.unknown_review, POLICY.policy_block_ack)
        at = max(self.now, datetime.now(UTC)) + waits + timedelta(hours=1)
        _reconcile_and_sweep(self.session, at)
        for n in range(3):
            assert self._owned(n), f"statement s{n} left without an owner"

    def _owned(self, n: int) -> bool:
        statement = self.session.get_one(Statement, f"s{n}")
        message = self._latest(n)
        open_cases = [
            c
            for c in self.session.scalars(
                select(ResendCase).where(ResendCase.statement_id == statement.statement_id)
            )
            if c.state not in (CaseState.CLOSED, CaseState.PRINT_FALLBACK)
        ]
        in_print = statement.channel == "print" or bool(
            self.session.scalar(
                select(func.count())
                .select_from(ResendCase)
                .where(
                    ResendCase.statement_id == statement.statement_id,
                    ResendCase.state == CaseState.PRINT_FALLBACK,
                )
            )
        )
        if in_print:
            return True
        if any(deadlines.case_due_at(c, POLICY) is not None for c in open_cases):
            return True
        unresolved = self.session.scalar(
            select(func.count())
            .select_from(Bounce)
            .where(
                Bounce.message_id == message.message_id,
                Bounce.bounce_class.in_([str(c) for c in FAILURES]),
            )
        )
        # Accepted or delivered with no failure reported against it; a notice sent in place
        # of a TLS-less email (the member was told where to read it) counts as accepted.
        return message.state in (MessageState.DELIVERED, MessageState.FALLBACK) or (
            message.state == MessageState.ACCEPTED and not unresolved
        )


TestFailureMachine = FailureMachine.TestCase
TestFailureMachine.settings = hsettings(max_examples=60, stateful_step_count=25, deadline=None)
