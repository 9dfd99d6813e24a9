"""A deliver pass (`send_due`) on SQLite and PostgreSQL: due work whatever run made it, late
suppressions, an ambiguous end of DATA, messages that cannot be composed, a full database.

Every count that matters is taken at the receiver, a real SMTP server on loopback.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, update

from pipeline.config import Settings
from pipeline.records.atrest import new_key_line, parse_keys, write_encrypted
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import (
    AuditEvent,
    DeliverabilityAlert,
    Message,
    Run,
    Statement,
    Suppression,
)
from pipeline.records.ledger.states import MessageState
from pipeline.runner import run_stage
from tests.conftest import REPO
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

pytestmark = pytest.mark.timeout(180)


def messages_by_recipient(settings: Settings) -> dict[str, Message]:
    with open_ledger(settings.ledger_url)() as session:
        return {m.recipient: m for m in session.scalars(select(Message))}


def make_due(settings: Settings) -> None:
    """As if the retry back-off had passed."""
    with open_ledger(settings.ledger_url).begin() as session:
        session.execute(update(Message).values(next_attempt_at=datetime.now(UTC)))


def test_messages_deferred_by_an_earlier_run_go_out_on_a_later_pass(tmp_path, ledger_url):
    outage = {f"member{n}@example.org": "421 4.3.2 service not available" for n in range(3)}
    receiver = Receiver(Script(rcpt_replies=outage))
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url)
        seed_run(settings, 3, run_id="run_a")
        assert run_stage(settings, "run_a", "send")["deferred"] == 3
        # A later run (a new drop) exists; the deferred messages are run A's.
        with open_ledger(settings.ledger_url).begin() as session:
            session.add(Run(run_id="run_b", started_at=datetime.now(UTC), drop="landing"))
        make_due(settings)
        receiver.script.rcpt_replies.clear()
        assert run_stage(settings, "run_b", "send")["accepted"] == 3
    assert set(arrived_message_ids(receiver).values()) == {1}
    assert len(receiver.arrivals) == 3
    assert {m.state for m in messages_by_recipient(settings).values()} == {MessageState.ACCEPTED}


def test_an_address_suppressed_meanwhile_is_suppressed_when_due_not_sent(tmp_path, ledger_url):
    receiver = Receiver(Script())
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url)
        seed_run(settings, 3)
        with open_ledger(settings.ledger_url).begin() as session:
            session.add(Suppression(address="member1@example.org", reason="hard_bounce",
                                    created_at=datetime.now(UTC)))  # fmt: skip
        counts = deliver(settings)
    assert counts["accepted"] == 2 and counts["suppressed"] == 1
    assert sorted(a.recipients for a in receiver.arrivals) == [
        ("member0@example.org",),
        ("member2@example.org",),
    ]
    assert messages_by_recipient(settings)["member1@example.org"].state == MessageState.SUPPRESSED


def test_a_connection_lost_after_the_final_dot_retries_as_a_possible_duplicate(
    tmp_path, ledger_url
):
    # The server takes the message, then drops the connection instead of answering.
    receiver = Receiver(Script(drop_in_data=frozenset({"member1@example.org"})))
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url)
        seed_run(settings, 3)
        assert deliver(settings)["deferred"] == 1
        lost = messages_by_recipient(settings)["member1@example.org"]
        assert lost.state == MessageState.DEFERRED and lost.possible_duplicate
        others = [m for r, m in messages_by_recipient(settings).items() if r != lost.recipient]
        assert not any(m.possible_duplicate for m in others)
        receiver.script.drop_in_data = frozenset()
        make_due(settings)
        assert deliver(settings)["accepted"] == 1
    retried = messages_by_recipient(settings)["member1@example.org"]
    assert retried.state == MessageState.ACCEPTED and retried.possible_duplicate


def break_member1(settings: Settings, fault: str) -> None:
    """Make statement s00001's message impossible to compose or to hand to this server."""
    pdf = settings.runs_dir / "rsend" / "pdf" / "s00001.pdf"
    if fault == "pdf_missing":
        pdf.unlink()
    elif fault == "pdf_corrupted":
        blob = bytearray(pdf.read_bytes())
        blob[-5] ^= 0xFF
        pdf.write_bytes(bytes(blob))
    elif fault == "key_missing":
        # Sealed under a key the data directory's keyring does not hold.
        other = parse_keys(new_key_line("retired"), source="test")
        write_encrypted(pdf, (REPO / "tests" / "data" / "tiny.pdf").read_bytes(), other, "s00001")
    else:
        assert fault == "non_ascii_address"
        with open_ledger(settings.ledger_url).begin() as session:
            session.execute(update(Message).where(Message.statement_id == "s00001")
                            .values(recipient="josé@exämple.com"))  # fmt: skip


@pytest.mark.parametrize(
    "fault", ["pdf_missing", "pdf_corrupted", "key_missing", "non_ascii_address"]
)
def test_a_message_that_cannot_be_composed_fails_alone_and_visibly(tmp_path, ledger_url, fault):
    receiver = Receiver(Script())  # no SMTPUTF8 offered
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url)
        seed_run(settings, 5)
        break_member1(settings, fault)
        counts = deliver(settings)
        assert counts["failed"] == 1 and counts["accepted"] == 4
        # Reruns send nothing again: not the failed message, not its neighbours.
        for _ in range(2):
            make_due(settings)
            assert sum(deliver(settings).values()) == 0
    arrived = arrived_message_ids(receiver)
    assert len(arrived) == 4 and set(arrived.values()) == {1}
    sessions = open_ledger(settings.ledger_url)
    with sessions() as session:
        states = {m.statement_id: m.state for m in session.scalars(select(Message))}
        assert states.pop("s00001") == MessageState.FAILED
        assert set(states.values()) == {MessageState.ACCEPTED}
        # The member still gets the statement: on paper.
        assert session.get_one(Statement, "s00001").channel == "print"
        [alert] = session.scalars(select(DeliverabilityAlert)).all()
        assert (alert.kind, alert.count, alert.acknowledged_at) == ("message_failed", 1, None)
        failed = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "message_failed")
        ).all()
        assert [e.entity_id for e in failed] == [m.message_id for m in session.scalars(
            select(Message).where(Message.statement_id == "s00001"))]  # fmt: skip
        # The reason names the fault's kind, never the address or a record value.
        assert "@" not in failed[0].detail and "josé" not in failed[0].detail


def test_a_non_ascii_address_goes_out_where_the_server_offers_smtputf8(tmp_path, ledger_url):
    receiver = Receiver(Script())
    with smtp_server(receiver, tmp_path / "certs", smtputf8=True) as port:
        settings = deliver_settings(tmp_path, port, ledger_url)
        seed_run(settings, 2)
        break_member1(settings, "non_ascii_address")
        assert deliver(settings)["accepted"] == 2
    assert sorted(a.recipients for a in receiver.arrivals) == [
        ("josé@exämple.com",),
        ("member0@example.org",),
    ]


def fill_database_after(settings: Settings, ledger_url: str, accepted: int) -> str:
    """Make the database refuse writes once about `accepted` messages are recorded accepted:
    SQLite gets a page limit a little above its size (the child sets it on each connection;
    'database or disk is full'), PostgreSQL a trigger that raises disk_full. Returns the child's
    setup code."""
    if ledger_url.startswith("sqlite"):
        with open_ledger(settings.ledger_url)() as session:
            pages = session.connection().exec_driver_sql("PRAGMA page_count").scalar_one()
        return (
            "from sqlalchemy import Engine, event\n"
            "event.listen(Engine, 'connect', lambda dbapi, _: "
            f"dbapi.execute('PRAGMA max_page_count = {pages + 3}'))"
        )
    with psycopg.connect(ledger_url.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute(f"""
            CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              IF (SELECT count(*) FROM state_transitions WHERE to_state = 'accepted')
                  >= {accepted} THEN
                RAISE EXCEPTION 'could not extend file: No space left on device'
                  USING ERRCODE = 'disk_full';
              END IF;
              RETURN NULL;
            END $$;
            CREATE TRIGGER disk_full AFTER INSERT ON state_transitions
              FOR EACH STATEMENT EXECUTE FUNCTION disk_full();
        """)  # fmt: skip
    return ""


def free_database(ledger_url: str) -> None:
    if ledger_url.startswith("postgresql"):
        with psycopg.connect(ledger_url.replace("+psycopg", ""), autocommit=True) as connection:
            connection.execute("DROP TRIGGER disk_full ON state_transitions")


def test_a_full_database_ends_the_pass_with_one_line_and_a_consistent_ledger(
    tmp_path: Path, ledger_url: str
):
    ips, connections = ("127.0.0.30", "127.0.0.31"), 2
    receiver = Receiver(Script())
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = deliver_settings(tmp_path, port, ledger_url, ips, connections)
        seed_run(settings, 300)
        setup = fill_database_after(settings, ledger_url, accepted=60)
        child = deliver_process(settings, setup)
        out, err = child.communicate(timeout=120)  # a hang fails here
        assert child.returncode == 1, out + err
        # One line, the last (the lines before are warnings logged along the way).
        assert "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert "ledger" in line and "full" in line.lower(), err
        arrived_before = set(arrived_message_ids(receiver))
        assert 0 < len(arrived_before) < 300
        by_recipient = messages_by_recipient(settings)
        sending = [m for m in by_recipient.values() if m.state == MessageState.SENDING]
        # Only what was mid-transaction: at most one message per connection.
        assert len(sending) <= len(ips) * connections
        free_database(ledger_url)
        counts = deliver(settings)
    assert counts["accepted"] == 300 - sum(
        m.state == MessageState.ACCEPTED for m in by_recipient.values()
    )
    final = messages_by_recipient(settings)
    assert {m.state for m in final.values()} == {MessageState.ACCEPTED}
    arrived = arrived_message_ids(receiver)
    assert set(arrived) == {m.message_id for m in final.values()}
    duplicates = {message_id for message_id, n in arrived.items() if n > 1}
    assert duplicates <= {m.message_id for m in final.values() if m.possible_duplicate}
