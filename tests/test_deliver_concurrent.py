"""Deliver passes side by side: two at once never claim the same message, a pass never
recovers another live pass's claims, and the backlog is read in bounded batches."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.delivery import steps
from pipeline.delivery.claims import deliver_pass
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Message
from pipeline.records.ledger.states import MessageMove, MessageState, transition_messages
from pipeline.records.run_context import LedgerContext, ledger_sessions
from tests.smtp_servers import (
    Receiver,
    Script,
    arrived_message_ids,
    deliver,
    deliver_process,
    deliver_settings,
    seed_run,
    smtp_server,
)

pytestmark = pytest.mark.timeout(300)
IPS = ("127.0.0.32", "127.0.0.33")


def test_two_deliver_processes_at_once_send_each_message_once(tmp_path: Path, ledger_url: str):
    receiver = Receiver(Script(data_delay=0.002))
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url, IPS, 2)
        seed_run(settings, 400)
        children = [deliver_process(settings) for _ in range(2)]
        outputs = [child.communicate(timeout=240) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    arrived = arrived_message_ids(receiver)
    with open_ledger(settings.ledger_url)() as session:
        messages = session.scalars(select(Message)).all()
    assert {m.state for m in messages} == {MessageState.ACCEPTED}
    assert not any(m.possible_duplicate for m in messages)
    assert set(arrived) == {m.message_id for m in messages} and set(arrived.values()) == {1}


def test_a_pass_leaves_a_live_pass_claims_alone_and_recovers_them_once_it_is_gone(
    tmp_path: Path, ledger_url: str
):
    receiver = Receiver(Script())
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url, IPS[:1])
        seed_run(settings, 3)
        ctx = LedgerContext(settings, ledger_sessions(settings.ledger_url))
        with deliver_pass(ctx) as owner:
            # A live pass has claimed s00001's message and is mid-transaction.
            with ctx.sessions.begin() as session:
                claimed = session.scalars(
                    select(Message).where(Message.statement_id == "s00001")
                ).one()
                move = MessageMove(claimed.message_id, MessageState.PLANNED,
                                   values={"tries": 1, "claimed_by": owner.name})  # fmt: skip
                transition_messages(session, [move], MessageState.SENDING, actor="test")
            other = deliver_process(settings)
            time.sleep(3)
            with ctx.sessions() as session:
                assert session.get_one(Message, claimed.message_id).state == MessageState.SENDING
            assert claimed.message_id not in arrived_message_ids(receiver)
        other.communicate(timeout=120)
        assert other.returncode == 0
        deliver(settings)
    with ctx.sessions() as session:
        recovered = session.get_one(Message, claimed.message_id)
        assert recovered.state == MessageState.ACCEPTED and recovered.possible_duplicate
    assert set(arrived_message_ids(receiver).values()) == {1}
    assert len(receiver.arrivals) == 3


def test_the_backlog_is_read_in_bounded_batches_and_a_suspension_spans_them(
    tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(steps, "DUE_BATCH", 4)
    loaded: list[int] = []
    due_batch = steps.due_batch

    def recording_due_batch(*args: object, **kwargs: object) -> object:
        batch = due_batch(*args, **kwargs)  # type: ignore[arg-type]
        loaded.append(len(batch))
        return batch

    monkeypatch.setattr(steps, "due_batch", recording_due_batch)
    # The second message's reply suspends its lane: the rest of the pass holds the lane's
    # messages, in this batch and in every later one.
    receiver = Receiver(Script(rcpt_replies={"member1@example.org": "421 4.7.28 blocked"}))
    suspend = ('\n[[backoff]]\nname = "blocked"\npattern = "blocked"\nthreshold_per_hour = 1\n'
               'action = "suspend"\nduration_minutes = 240\n')  # fmt: skip
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url, IPS[:1])
        Path(settings.sending_policy_file).write_text(
            Path(settings.sending_policy_file).read_text() + suspend
        )
        seed_run(settings, 10)
        counts = deliver(settings)
    assert max(loaded) <= 4 and sum(loaded) == 10
    assert (counts["accepted"], counts["deferred"], counts["held"]) == (1, 1, 8)
    assert len(receiver.arrivals) == 1
