"""Reconcile policy and the verify-before-resend workflow, on SQLite and PostgreSQL."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.delivery.policy import parse_policy
from pipeline.errors import IllegalTransition
from pipeline.records.ledger import open_ledger, paused_routes
from pipeline.records.ledger.models import (
    AuditEvent,
    Base,
    Bounce,
    DeliverabilityAlert,
    Incident,
    Message,
    ResendCase,
    Statement,
    StateTransition,
    Suppression,
)
from pipeline.records.ledger.states import (
    CASE_TRANSITIONS,
    CaseState,
    MessageState,
    mark_resend_accepted,
)
from pipeline.returns import cases, reconcile
from pipeline.returns.bounces import BounceClass
from tests.ledger_seed import seed_run_and_file
from tests.smtp_servers import policy_toml

SENDING = parse_policy(tomllib.loads(policy_toml(("127.0.0.2", "127.0.0.3"), 1)))
POLICY = reconcile.load_policy()


@pytest.fixture
def sessions(ledger_url: str) -> sessionmaker[Session]:
    return open_ledger(ledger_url)


def _accepted(session: Session, n: int, *, email: str = "old@example.org", ip: str = "127.0.0.2"):
    now = datetime.now(UTC)
    session.add(
        Statement(
            statement_id=f"s{n}",
            run_id="r1",
            file_id=1,
            member_id=f"M{n}",
            channel="email",
            email=email,
            claim_lines=1,
            member_owes=0,
        )
    )
    session.flush()
    message = Message(
        message_id=f"m{n}",
        statement_id=f"s{n}",
        run_id="r1",
        attempt=1,
        recipient=email,
        source_ip=ip,
        ehlo_name="mta",
        state=MessageState.ACCEPTED,
        created_at=now,
        updated_at=now,
    )
    session.add(message)
    session.flush()
    return message


def _bounce(session: Session, message: Message, cls: BounceClass, status: str = "5.1.1"):
    bounce = Bounce(
        dedupe_key=f"k{message.message_id}{cls}{datetime.now(UTC).timestamp()}",
        message_id=message.message_id,
        received_at=datetime.now(UTC),
        bounce_class=cls,
        status_code=status,
        recipient=message.recipient,
    )
    session.add(bounce)
    session.flush()
    return bounce


def _hard_bounced_case(session: Session, n: int = 1) -> ResendCase:
    message = _accepted(session, n)
    assert reconcile.reconcile_bounce(
        session, _bounce(session, message, BounceClass.HARD_BOUNCE), POLICY
    )
    return session.get_one(ResendCase, reconcile.case_id_for(message.message_id))


def test_the_whole_case_workflow(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        case = _hard_bounced_case(session)
        message = session.get_one(Message, "m1")
        assert message.state == MessageState.BOUNCED
        assert session.get(Suppression, "old@example.org") is not None
        # Nothing is planned for an unverified or unapproved case.
        assert cases.plan_approved_resends(session, SENDING) == 0
        with pytest.raises(cases.CaseActionRefused, match="only a verified case"):
            cases.approve(session, case.case_id, actor="bob")
        cases.verify(
            session,
            case.case_id,
            actor="alice",
            channel="phone",
            evidence="called member on file number",
            address="New@Example.net",
        )
        assert cases.plan_approved_resends(session, SENDING) == 0
        with pytest.raises(cases.CaseActionRefused, match="must not be the verifier"):
            cases.approve(session, case.case_id, actor="alice")
        cases.approve(session, case.case_id, actor="bob")
        assert cases.plan_approved_resends(session, SENDING) == 1
        assert cases.plan_approved_resends(session, SENDING) == 0  # once only
        resend = session.scalars(select(Message).where(Message.attempt == 2)).one()
        assert (resend.case_id, resend.recipient, resend.state) == (
            case.case_id,
            "New@example.net",
            MessageState.PLANNED,
        )
        assert case.state == CaseState.RESEND_PLANNED
        resend.state = MessageState.ACCEPTED
        mark_resend_accepted(session, resend)
        cases.close(session, case.case_id, actor="alice", reason="delivered")
        assert (case.verified_by, case.approved_by, case.verified_channel) == (
            "alice",
            "bob",
            "phone",
        )
    with sessions() as session:
        trail = [
            (t.to_state, t.actor)
            for t in session.scalars(
                select(StateTransition)
                .where(StateTransition.entity_kind == "case")
                .order_by(StateTransition.transition_id)
            )
        ]
        assert trail == [
            ("verified", "alice"),
            ("resend_planned", "plan"),
            ("resent", "send"),
            ("closed", "alice"),
        ]
        events = session.scalars(select(AuditEvent)).all()
        actions = [e.action for e in events]
        for wanted in (
            "resend_case_opened",
            "case_verified",
            "case_approved",
            "resend_planned",
            "case_closed",
            "address_suppressed",
        ):
            assert wanted in actions
        # Audit detail carries ids only: no address, old or new.
        assert not any("@" in e.detail for e in events)


def test_an_approved_resend_honours_todays_warm_up_caps(sessions: sessionmaker[Session]):
    # One IP in its first warm-up day (cap 1) whose only slot today is taken already: the
    # resend spills to tomorrow, as a first attempt would, instead of going over the cap.
    toml = policy_toml(("127.0.0.2",), 1).replace("daily_cap = [1000000]", "daily_cap = [1, 5]")
    today = datetime.now(UTC).date()
    warming = parse_policy(tomllib.loads(toml.replace(
        'weight = 1\n', f"weight = 1\nwarmup_start = {today.isoformat()}\n", 1)))  # fmt: skip
    with sessions.begin() as session:
        seed_run_and_file(session)
        case = _hard_bounced_case(session)
        session.get_one(Message, "m1").send_day = today  # today's one slot on 127.0.0.2
        cases.verify(session, case.case_id, actor="alice", channel="phone",
                     evidence="called member", address="new@example.net")  # fmt: skip
        cases.approve(session, case.case_id, actor="bob")
        assert cases.plan_approved_resends(session, warming) == 1
        resend = session.scalars(select(Message).where(Message.attempt == 2)).one()
        assert (resend.source_ip, resend.send_day) == ("127.0.0.2", today + timedelta(days=1))


def test_verification_input_is_checked_without_echoing_it(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        case = _hard_bounced_case(session)
        for kwargs, error in [
            ({"channel": "email", "evidence": "x", "address": "a@example.net"}, "channel"),
            ({"channel": "phone", "evidence": " ", "address": "a@example.net"}, "evidence"),
            ({"channel": "phone", "evidence": "x", "address": "secret-not-an-address"}, "valid"),
        ]:
            with pytest.raises(cases.CaseActionRefused, match=error) as raised:
                cases.verify(session, case.case_id, actor="alice", **kwargs)
            assert "secret" not in str(raised.value)
        assert case.state == CaseState.NEEDS_VERIFICATION


def test_a_suppressed_verified_address_is_never_resent(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        case = _hard_bounced_case(session)
        cases.verify(
            session,
            case.case_id,
            actor="alice",
            channel="portal",
            evidence="member confirmed in portal",
            address="old@example.org",
        )
        with pytest.raises(cases.CaseActionRefused, match="suppressed"):
            cases.approve(session, case.case_id, actor="bob")
        cases.route_to_print(session, case.case_id, actor="bob", reason="address bad")
        assert case.state == CaseState.PRINT_FALLBACK


def test_a_resend_that_bounces_again_reopens_then_prints(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        case = _hard_bounced_case(session)
        for attempt, address in ((2, "a@example.net"), (3, "b@example.net")):
            cases.verify(
                session,
                case.case_id,
                actor="alice",
                channel="phone",
                evidence="called",
                address=address,
            )
            cases.approve(session, case.case_id, actor="bob")
            cases.plan_approved_resends(session, SENDING)
            resend = session.scalars(select(Message).where(Message.attempt == attempt)).one()
            resend.state = MessageState.ACCEPTED
            mark_resend_accepted(session, resend)
            reconcile.reconcile_bounce(
                session, _bounce(session, resend, BounceClass.HARD_BOUNCE), POLICY
            )
        # max_failures = 2: the first resend's bounce reopened it, the second sent it to print.
        assert case.state == CaseState.PRINT_FALLBACK and case.failures == 3


def test_complaint_suppresses_routes_to_print_and_opens_an_incident(
    sessions: sessionmaker[Session],
):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        reconcile.reconcile_bounce(
            session, _bounce(session, message, BounceClass.COMPLAINT, ""), POLICY
        )
        case = session.get_one(ResendCase, reconcile.case_id_for("m1"))
        incident = session.scalars(select(Incident)).one()
        assert case.state == CaseState.PRINT_FALLBACK
        assert session.get_one(Suppression, "old@example.org").reason == "complaint"
        due = incident.due_at - incident.opened_at
        assert due == timedelta(days=60) and incident.case_id == case.case_id


def test_policy_block_alerts_per_ip_and_provider_and_requeues_on_ack(
    sessions: sessionmaker[Session],
):
    with sessions.begin() as session:
        seed_run_and_file(session)
        for n in range(3):
            message = _accepted(session, n, email=f"u{n}@bigmail.example")
            reconcile.reconcile_bounce(
                session, _bounce(session, message, BounceClass.POLICY_BLOCK, "5.7.1"), POLICY
            )
        alert = session.scalars(select(DeliverabilityAlert)).one()
        assert (alert.kind, alert.source_ip, alert.provider, alert.count) == (
            "policy_block",
            "127.0.0.2",
            "bigmail.example",
            3,
        )
        # The address is not in doubt: no suppression, no case, nothing requeued before the ack.
        assert session.scalars(select(Suppression)).all() == []
        assert session.scalars(select(ResendCase)).all() == []
        assert session.scalars(select(Message).where(Message.attempt == 2)).all() == []
        assert (
            reconcile.acknowledge_alert(session, alert.alert_id, actor="ops", policy=SENDING) == 3
        )
        with pytest.raises(cases.CaseActionRefused):
            reconcile.acknowledge_alert(session, alert.alert_id, actor="ops", policy=SENDING)


def test_soft_bounces_open_a_case_only_at_the_limit(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        opened = [
            reconcile.reconcile_bounce(
                session, _bounce(session, message, BounceClass.SOFT_BOUNCE, "4.2.2"), POLICY
            )
            for _ in range(POLICY.soft_max_bounces)
        ]
        assert opened == [False] * (POLICY.soft_max_bounces - 1) + [True]
        assert session.get(Suppression, "old@example.org") is None


def test_bounce_rate_over_pause_holds_the_route(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        messages = [_accepted(session, n, email=f"u{n}@isp.example") for n in range(40)]
        for message in messages[:1]:
            reconcile.reconcile_bounce(
                session, _bounce(session, message, BounceClass.HARD_BOUNCE), POLICY
            )
        assert reconcile.monitor_bounce_rates(session, POLICY) == {"warn": 1, "pause": 0}
        for message in messages[1:3]:
            reconcile.reconcile_bounce(
                session, _bounce(session, message, BounceClass.HARD_BOUNCE), POLICY
            )
        assert reconcile.monitor_bounce_rates(session, POLICY) == {"warn": 0, "pause": 1}
        assert paused_routes(session) == {("127.0.0.2", "isp.example")}


def test_bounce_rate_counts_the_window_and_not_what_an_acknowledgement_settled(
    sessions: sessionmaker[Session],
):
    """The returns loop runs the monitor every few minutes over every run: outcomes older than
    the window do not count, and an acknowledged pause is not raised again by the same
    evidence (only new outcomes on that route count)."""
    with sessions.begin() as session:
        seed_run_and_file(session)
        messages = [_accepted(session, n, email=f"u{n}@isp.example") for n in range(40)]
        for message in messages[:3]:
            reconcile.reconcile_bounce(
                session, _bounce(session, message, BounceClass.HARD_BOUNCE), POLICY
            )
        later = datetime.now(UTC) + POLICY.rate_window + timedelta(minutes=1)
        assert reconcile.monitor_bounce_rates(session, POLICY, later) == {"warn": 0, "pause": 0}
        assert reconcile.monitor_bounce_rates(session, POLICY) == {"warn": 0, "pause": 1}
        (alert,) = session.scalars(select(DeliverabilityAlert)).all()
        reconcile.acknowledge_alert(session, alert.alert_id, actor="ops", policy=SENDING)
        assert paused_routes(session) == set()
        assert reconcile.monitor_bounce_rates(session, POLICY) == {"warn": 0, "pause": 0}
        assert paused_routes(session) == set()


def test_an_acknowledged_requeue_and_an_approved_resend_join_the_statements_run(
    sessions: sessionmaker[Session],
):
    """No run is needed to plan them: each new attempt belongs to its statement's run."""
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        reconcile.reconcile_bounce(
            session, _bounce(session, message, BounceClass.HARD_BOUNCE), POLICY
        )
        case_id = reconcile.case_id_for(message.message_id)
        cases.verify(
            session, case_id, actor="alice", channel="phone", evidence="called", address="n@x.org"
        )
        cases.approve(session, case_id, actor="bob")
        assert cases.plan_approved_resends(session, SENDING) == 1
        resend = session.scalars(select(Message).where(Message.case_id == case_id)).one()
        assert (resend.run_id, resend.attempt, resend.state) == ("r1", 2, "planned")


ACTORS = st.sampled_from(["alice", "bob"])


class CaseMachine(RuleBasedStateMachine):
    """Random operator actions: a resend only ever follows verification and a second person's
    approval, goes to the verified address, and the case never leaves its transition table."""

    def __init__(self) -> None:
        super().__init__()
        engine = create_engine("sqlite://")
        Base.metadata.create_all(engine)
        self.session = Session(engine)
        seed_run_and_file(self.session)
        self.case = _hard_bounced_case(self.session)
        self.history: list[str] = [self.case.state]

    def _try(self, action, *args, **kwargs) -> None:
        try:
            action(self.session, self.case.case_id, *args, **kwargs)
        except (cases.CaseActionRefused, IllegalTransition):
            pass
        self.history.append(self.case.state)

    @rule(actor=ACTORS, address=st.sampled_from(["old@example.org", "new@example.net"]))
    def verify(self, actor, address):
        self._try(cases.verify, actor=actor, channel="phone", evidence="called", address=address)

    @rule(actor=ACTORS)
    def approve(self, actor):
        self._try(cases.approve, actor=actor)

    @precondition(lambda self: len(self.history) > 8)  # explore the resend path first
    @rule(actor=ACTORS)
    def unreachable(self, actor):
        self._try(cases.mark_unreachable, actor=actor, note="no answer")

    @precondition(lambda self: len(self.history) > 8)  # explore the resend path first
    @rule(actor=ACTORS)
    def to_print(self, actor):
        self._try(cases.route_to_print, actor=actor, reason="ops")

    @precondition(lambda self: len(self.history) > 8)  # explore the resend path first
    @rule(actor=ACTORS)
    def close(self, actor):
        self._try(cases.close, actor=actor, reason="ops")

    @rule()
    def plan(self):
        cases.plan_approved_resends(self.session, SENDING)
        self.history.append(self.case.state)

    @precondition(lambda self: self.case.state == CaseState.RESEND_PLANNED)
    @rule(bounce=st.booleans())
    def send_latest(self, bounce):
        latest = self.session.scalars(
            select(Message)
            .where(Message.case_id == self.case.case_id)
            .order_by(Message.attempt.desc())
        ).first()
        assert latest is not None
        latest.state = MessageState.ACCEPTED
        mark_resend_accepted(self.session, latest)
        if bounce:
            reconcile.reconcile_bounce(
                self.session, _bounce(self.session, latest, BounceClass.HARD_BOUNCE), POLICY
            )
        self.history.append(self.case.state)

    @invariant()
    def follows_the_table(self):
        for before, after in zip(self.history, self.history[1:], strict=False):
            assert before == after or CaseState(after) in CASE_TRANSITIONS[CaseState(before)]

    @invariant()
    def an_approval_is_never_the_verifiers(self):
        if self.case.approved_by is not None:
            assert self.case.verified_address is not None
            assert self.case.approved_by != self.case.verified_by

    @invariant()
    def every_resend_was_verified_and_approved_by_another(self):
        resends = self.session.scalars(select(Message).where(Message.attempt > 1)).all()
        planned = [
            t
            for t in self.session.scalars(
                select(StateTransition).where(StateTransition.to_state == "resend_planned")
            )
        ]
        assert len(resends) == len(planned)
        for message in resends:
            assert message.case_id == self.case.case_id
            assert message.recipient != "old@example.org"  # suppressed: never resent
        if resends and self.case.state == CaseState.RESEND_PLANNED:
            assert self.case.approved_by not in (None, self.case.verified_by)
            assert resends[-1].recipient == self.case.verified_address

    def teardown(self) -> None:
        self.session.close()


TestCaseMachine = CaseMachine.TestCase
TestCaseMachine.settings = hsettings(max_examples=100, stateful_step_count=20, deadline=None)


def test_a_not_me_reply_is_a_suspected_misdelivery(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        seed_run_and_file(session)
        message = _accepted(session, 1)
        reply = _bounce(session, message, BounceClass.NOT_BOUNCE, "")
        reply.diagnostic = "Hello, I think you sent this to the wrong person. Not me!"
        reconcile.reconcile_bounce(session, reply, POLICY)
        other = _accepted(session, 2, email="other@example.org")
        thanks = _bounce(session, other, BounceClass.NOT_BOUNCE, "")
        thanks.diagnostic = "Thank you, received."
        reconcile.reconcile_bounce(session, thanks, POLICY)
        [incident] = session.scalars(select(Incident)).all()
        assert incident.message_id == "m1"
        assert session.get_one(ResendCase, reconcile.case_id_for("m1")).state == "print_fallback"
        assert session.get(ResendCase, reconcile.case_id_for("m2")) is None
