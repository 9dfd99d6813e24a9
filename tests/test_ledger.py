"""The ledger on SQLite and PostgreSQL: migrations match the models; the state machines hold."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import IllegalTransition
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import (
    Base,
    Message,
    ResendCase,
    Run,
    Statement,
    StateTransition,
)  # fmt: skip
from pipeline.records.ledger.states import (
    CASE_TRANSITIONS,
    MESSAGE_TRANSITIONS,
    CaseState,
    MessageMove,
    MessageState,
    transition_case,
    transition_message,
    transition_messages,
)  # fmt: skip
from tests.ledger_seed import seed_run_and_file
from tests.test_deliver_states import ALLOWED


@pytest.fixture
def sessions(ledger_url: str) -> sessionmaker[Session]:
    return open_ledger(ledger_url)


def test_migrations_produce_the_models_schema(sessions: sessionmaker[Session]):
    with sessions() as session:
        context = MigrationContext.configure(session.connection())
        assert compare_metadata(context, Base.metadata) == []


def test_migrating_twice_is_harmless(ledger_url: str):
    open_ledger(ledger_url)
    open_ledger(ledger_url)


def _message(session: Session, n: int) -> Message:
    now = datetime.now(UTC)
    if session.get(Run, "r1") is None:
        seed_run_and_file(session)
    session.add(
        Statement(
            statement_id=f"s{n}",
            run_id="r1",
            file_id=1,
            member_id="M",
            channel="email",
            email="x@example.com",
            claim_lines=1,
            member_owes=0,
        )
    )
    session.flush()
    message = Message(message_id=f"m{n}", statement_id=f"s{n}", run_id="r1", attempt=1,
                      recipient="x@example.com", source_ip="127.0.0.2", ehlo_name="mta",
                      state=MessageState.PLANNED, created_at=now, updated_at=now)  # fmt: skip
    session.add(message)
    session.flush()
    return message


def test_a_legal_path_is_recorded_step_by_step(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        message = _message(session, 1)
        for state in (MessageState.SENDING, MessageState.ACCEPTED, MessageState.BOUNCED):
            transition_message(session, message, state, actor="test", reason="why")
    with sessions() as session:
        rows = session.scalars(select(StateTransition).order_by(StateTransition.transition_id))
        assert [(t.from_state, t.to_state) for t in rows] == [
            ("planned", "sending"), ("sending", "accepted"), ("accepted", "bounced"),
        ]  # fmt: skip


def test_an_illegal_transition_raises_and_changes_nothing(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        message = _message(session, 1)
        # A bounced message is never sent again: a resend is a new attempt through a case.
        transition_message(session, message, MessageState.SENDING, actor="test")
        transition_message(session, message, MessageState.BOUNCED, actor="test")
        with pytest.raises(IllegalTransition, match="bounced -> sending"):
            transition_message(session, message, MessageState.SENDING, actor="test")
        assert message.state == MessageState.BOUNCED


def test_bulk_transitions_record_each_move_and_refuse_a_stale_state(
    sessions: sessionmaker[Session],
):
    with sessions.begin() as session:
        for n in (1, 2, 3):
            _message(session, n)
    claims = [MessageMove(f"m{n}", MessageState.PLANNED, values={"tries": 1}) for n in (1, 2)]
    with sessions.begin() as session:
        transition_messages(session, claims, MessageState.SENDING, actor="send")
        transition_messages(
            session,
            [MessageMove("m1", MessageState.SENDING, "SMTP 250", {"smtp_code": 250})],
            MessageState.ACCEPTED,
            actor="send",
        )
    with sessions() as session:
        rows = session.scalars(select(Message).order_by(Message.message_id)).all()
        assert [(m.state, m.tries, m.smtp_code) for m in rows] == [
            ("accepted", 1, 250), ("sending", 1, None), ("planned", 0, None),
        ]  # fmt: skip
        moves = session.scalars(select(StateTransition).order_by(StateTransition.transition_id))
        assert [(t.entity_id, t.from_state, t.to_state, t.reason) for t in moves] == [
            ("m1", "planned", "sending", ""), ("m2", "planned", "sending", ""),
            ("m1", "sending", "accepted", "SMTP 250"),
        ]  # fmt: skip

    # The state machine is checked first; then every row must still be in its from state
    # (m2 is sending, not planned), or the whole batch is refused.
    with pytest.raises(IllegalTransition, match="accepted -> sending"):
        with sessions.begin() as session:
            transition_messages(session, [MessageMove("m1", MessageState.ACCEPTED)],
                                MessageState.SENDING, actor="send")  # fmt: skip
    stale = [MessageMove(f"m{n}", MessageState.PLANNED) for n in (3, 2)]
    with pytest.raises(IllegalTransition, match="1 of a batch"):
        with sessions.begin() as session:
            transition_messages(session, stale, MessageState.SENDING, actor="send")
    with sessions() as session:
        assert session.get_one(Message, "m3").state == MessageState.PLANNED
        assert len(session.scalars(select(StateTransition)).all()) == 3


def test_a_case_cannot_be_resent_before_verification(sessions: sessionmaker[Session]):
    with sessions.begin() as session:
        message = _message(session, 1)
        now = datetime.now(UTC)
        case = ResendCase(case_id="c1", message_id=message.message_id, statement_id="s1",
                          state=CaseState.NEEDS_VERIFICATION, opened_at=now, updated_at=now,
                          reason="hard_bounce")  # fmt: skip
        session.add(case)
        for premature in (CaseState.RESEND_PLANNED, CaseState.RESENT):
            with pytest.raises(IllegalTransition):
                transition_case(session, case, premature, actor="test")
        transition_case(session, case, CaseState.VERIFIED, actor="ops")
        transition_case(session, case, CaseState.RESEND_PLANNED, actor="ops")
        assert case.state == CaseState.RESEND_PLANNED


def test_every_state_is_in_its_table():
    assert set(MESSAGE_TRANSITIONS) == set(MessageState)
    assert set(CASE_TRANSITIONS) == set(CaseState)
    # Nothing leads back to planned: a message row is sent at most once.
    assert all(MessageState.PLANNED not in targets for targets in MESSAGE_TRANSITIONS.values())


@given(steps=st.lists(st.sampled_from(list(MessageState)), max_size=12))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)  # fmt: skip
def test_random_transition_sequences_follow_the_table(sessions, steps):
    """Legal steps apply and are recorded; illegal ones raise and leave the state as it was.
    Legal means listed in the hand-written ALLOWED, not in the table under test."""
    with sessions() as session:
        message = _message(session, 1)
        expected, recorded = MessageState.PLANNED, []
        for target in steps:
            if (expected.value, target.value) in ALLOWED:
                transition_message(session, message, target, actor="prop")
                recorded.append((expected.value, target.value))
                expected = target
            else:
                with pytest.raises(IllegalTransition):
                    transition_message(session, message, target, actor="prop")
            assert message.state == expected
        session.flush()
        history = session.scalars(
            select(StateTransition).where(StateTransition.entity_id == "m1")
            .order_by(StateTransition.transition_id)
        )  # fmt: skip
        assert [(t.from_state, t.to_state) for t in history] == recorded
        session.rollback()
