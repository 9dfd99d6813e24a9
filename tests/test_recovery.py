"""A message caught mid-transaction by a crash is sent again and marked a possible duplicate."""

from __future__ import annotations

from sqlalchemy import select

from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Message
from pipeline.records.ledger.states import MessageState, transition_message
from pipeline.runner import STAGES, run_stage, start_run
from tests.conftest import sample_drop


def test_interrupted_send_is_recovered_at_least_once(sink, tmp_path):
    run_id = start_run(sink, sample_drop(tmp_path))
    for stage in STAGES[: STAGES.index("send")]:
        run_stage(sink, run_id, stage)
    sessions = open_ledger(sink.ledger_url)
    with sessions.begin() as session:
        # As if the process died after recording `sending`, before the server's answer.
        victim = session.scalars(select(Message).order_by(Message.message_id)).first()
        assert victim is not None
        transition_message(session, victim, MessageState.SENDING, actor="test")
        victim_id = victim.message_id

    counts = run_stage(sink, run_id, "send")

    assert counts["accepted"] == 11
    with sessions() as session:
        recovered = session.get_one(Message, victim_id)
        assert recovered.state == MessageState.ACCEPTED and recovered.possible_duplicate
        others = session.scalars(select(Message).where(Message.message_id != victim_id)).all()
        assert not any(m.possible_duplicate for m in others)
