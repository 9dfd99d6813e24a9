"""The send stage through the runner and the ledger, on SQLite and PostgreSQL: deferral
schedule, expiry, TLS fallback, a suspended lane."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.delivery.policy import load_policy
from pipeline.ops.sink import ensure_certificates
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Message, Statement
from pipeline.records.ledger.states import MessageState
from pipeline.runner import run_stage
from tests.smtp_servers import (
    Receiver,
    Script,
    deliver_settings,
    policy_toml,
    seed_run,
    smtp_server,
)

IPS = ("127.0.0.28", "127.0.0.29")


def settings_for(
    tmp_path: Path, port: int, database_url: str, fallback: str = "notification"
) -> Settings:
    return deliver_settings(tmp_path, port, database_url, IPS, 1, fallback)


def test_a_deferral_waits_its_backoff_then_expires_past_max_age(tmp_path, ledger_url):
    receiver = Receiver(Script(rcpt_replies={"member0@example.org": "451 4.3.0 try later"}))
    retry = load_policy().retry
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = settings_for(tmp_path, port, ledger_url)
        run_id = seed_run(settings, 3)
        assert run_stage(settings, run_id, "send")["deferred"] == 1
        sessions = open_ledger(settings.ledger_url)
        with sessions() as session:
            query = select(Message).where(Message.recipient == "member0@example.org")
            deferred = session.scalars(query).one()
            assert deferred.state == MessageState.DEFERRED and deferred.tries == 1
            assert deferred.next_attempt_at is not None
            wait = deferred.next_attempt_at.replace(tzinfo=UTC) - datetime.now(UTC)
            assert timedelta(seconds=retry.first_delay_seconds - 60) < wait
            assert wait <= timedelta(seconds=retry.first_delay_seconds)
        # Not due yet: the next send leaves it alone.
        assert sum(run_stage(settings, run_id, "send").values()) == 0
        with sessions.begin() as session:
            old = session.get_one(Message, deferred.message_id)
            old.next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
            old.created_at = datetime.now(UTC) - timedelta(seconds=retry.max_age_seconds)
        assert run_stage(settings, run_id, "send")["expired"] == 1
        with sessions() as session:
            expired = session.get_one(Message, deferred.message_id)
            assert expired.state == MessageState.EXPIRED and expired.tries == 2
    assert len(receiver.arrivals) == 2


@pytest.mark.parametrize(("fallback", "channel", "notices"), [("notification", "email", 2),
                                                           ("print", "print", 0)])  # fmt: skip
def test_without_tls_the_member_gets_the_portal_notice_or_print(
    tmp_path, ledger_url, fallback, channel, notices
):
    ensure_certificates(tmp_path / "certs", "127.0.0.1")
    receiver = Receiver(Script())
    with smtp_server(receiver, None) as port:
        settings = settings_for(tmp_path, port, ledger_url, fallback)
        run_id = seed_run(settings, 2)
        assert run_stage(settings, run_id, "send")["fallback"] == 2
    sessions = open_ledger(settings.ledger_url)
    with sessions() as session:
        assert {m.state for m in session.scalars(select(Message))} == {MessageState.FALLBACK}
        # Print when no notice could go out (or by policy); else the member has the notice.
        assert {s.channel for s in session.scalars(select(Statement))} == {channel}
    assert len(receiver.arrivals) == notices
    for arrival in receiver.arrivals:
        # No PHI: no attachment, no address or statement id anywhere in the content.
        assert b"application/pdf" not in arrival.content
        assert b"@example.org" not in arrival.content and b"s0000" not in arrival.content


def test_a_suspended_lane_leaves_its_queue_planned_until_the_suspension_ends(tmp_path, ledger_url):
    receiver = Receiver(Script(rcpt_replies={"member0@example.org": "421 4.7.28 blocked"}))
    suspend = (
        '\n[[backoff]]\nname = "blocked"\npattern = "blocked"\nthreshold_per_hour = 1\n'
        'action = "suspend"\nduration_minutes = 240\n'
    )
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = settings_for(tmp_path, port, ledger_url)
        Path(settings.sending_policy_file).write_text(policy_toml(IPS[:1], 1) + suspend)
        run_id = seed_run(settings, 4)
        counts = run_stage(settings, run_id, "send")
    # The lane goes in message-id order: what it sent before the block went out, the rest waits.
    assert counts["deferred"] == 1 and counts["held"] >= 1
    assert counts["accepted"] + counts["held"] == 3 == len(receiver.arrivals) + counts["held"]
    with open_ledger(settings.ledger_url)() as session:
        held = session.scalars(select(Message).where(Message.state == MessageState.PLANNED)).all()
        assert len(held) == counts["held"] and all(m.tries == 0 for m in held)
        for message in held:  # not before the suspension ends; never attempted, no transition
            assert message.next_attempt_at is not None
            wait = message.next_attempt_at.replace(tzinfo=UTC) - datetime.now(UTC)
            assert timedelta(minutes=239) < wait <= timedelta(minutes=240)
