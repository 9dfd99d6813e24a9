"""The whole pipeline on the bundled sample drop, against the live TLS sink, on both ledgers."""

from __future__ import annotations

import csv
import io
import logging
import mailbox
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from pypdf import PdfReader
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.delivery.policy import load_policy
from pipeline.records.atrest import MAGIC, load_keyring, read_decrypted
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Message, ResendCase, Statement, Suppression
from pipeline.records.ledger.states import CaseState, MessageState
from pipeline.runner import run_all
from tests.conftest import REPO, sample_drop

SAMPLE = REPO / "data_samples" / "landing" / "acme" / "claims_2026-10.csv"
UNKNOWN = {"mei.chen@example.net", "kwame.asante@example.net"}


def sink_deliveries(settings: Settings) -> list[mailbox.MaildirMessage]:
    return list(mailbox.Maildir(settings.sink_maildir, create=False))


def phi_values() -> set[str]:
    """Every PHI value of the sample drop that is long enough to be identifying in a log."""
    values: set[str] = set()
    phi = ["member_id", "first_name", "last_name", "date_of_birth", "address_line", "email",
           "claim_id", "postal_code"]  # fmt: skip
    with SAMPLE.open(encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            values.update(v for k in phi if len(v := (row.get(k) or "").strip()) >= 5)
    return values


def test_sample_drop_end_to_end(sink: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    drop = sample_drop(tmp_path)

    run_id, summary = run_all(sink, drop)

    assert summary == {
        "files": 1, "files_rejected": 0, "claim_lines_accepted": 47,
        "claim_lines_quarantined": 6, "statements": 12, "pdfs": 12, "messages_accepted": 11,
        "messages_bounced": 2, "resend_cases_opened": 2,
    }  # fmt: skip
    delivered = sink_deliveries(sink)
    # The sink holds exactly what the ledger says was accepted, each message once.
    assert len(delivered) == summary["messages_accepted"]
    assert len({m["Message-ID"] for m in delivered}) == len(delivered)
    # The traffic came from the policy's dedicated IPs, more than one, as seen by the receiver.
    peers = {m["X-Sink-Peer"] for m in delivered}
    assert len(peers) >= 2 and peers <= {ip.address for ip in load_policy().pool}
    # No PHI in any subject.
    assert {m["Subject"] for m in delivered} == {"Your Explanation of Benefits is ready"}

    sessions = open_ledger(sink.ledger_url)
    with sessions() as session:
        bounced = session.scalars(
            select(Message).where(Message.state == MessageState.BOUNCED)
        ).all()
        assert {m.recipient for m in bounced} == UNKNOWN
        cases = session.scalars(select(ResendCase)).all()
        assert {c.message_id for c in cases} == {m.message_id for m in bounced}
        assert {c.state for c in cases} == {CaseState.NEEDS_VERIFICATION}
        assert set(session.scalars(select(Suppression.address))) == UNKNOWN
        # The member without an email address goes to print.
        assert session.scalar(select(Statement.channel).where(Statement.email.is_(None))) == "print"
    # Bounced members were sent their statement once, and nothing again.
    for address in UNKNOWN:
        assert sum(address in m["X-Sink-Rcpt"] for m in delivered) == 1

    facts_glob = f"{sink.datasets_dir}/delivery_facts/**/*.parquet"
    facts = duckdb.sql(
        f"select state, count(*) from read_parquet('{facts_glob}', hive_partitioning=true)"
        " group by state order by state"
    ).fetchall()
    assert facts == [("accepted", 9), ("bounced", 2)]

    # PDFs rest encrypted in the data directory; the message carries the decrypted PDF.
    stored = list(sink.runs_dir.glob(f"{run_id}/pdf/*.pdf"))
    assert len(stored) == summary["pdfs"]
    for path in stored:
        blob = path.read_bytes()
        assert blob.startswith(MAGIC) and b"%PDF" not in blob
    attachments = [part.get_payload(decode=True) for m in delivered for part in m.walk()
                   if part.get_content_type() == "application/pdf"]  # fmt: skip
    assert len(attachments) == len(delivered)
    for pdf in attachments:
        assert "Explanation of Benefits" in PdfReader(io.BytesIO(pdf)).pages[0].extract_text()

    # The member without email is in the run's print batch, which rests encrypted too.
    keyring = load_keyring(sink.data_dir)
    manifest = read_decrypted(sink.runs_dir / run_id / "print" / "manifest.csv", keyring,
                              f"{run_id}:print/manifest.csv").decode()  # fmt: skip
    batch = read_decrypted(sink.runs_dir / run_id / "print" / "batch.pdf", keyring,
                           f"{run_id}:print/batch.pdf")  # fmt: skip
    assert len(manifest.splitlines()) == 2
    assert "Explanation of Benefits" in PdfReader(io.BytesIO(batch)).pages[0].extract_text()

    # The stages' parquet intermediates rest encrypted; the analysts' datasets stay plaintext
    # for DuckDB and hold no PHI.
    intermediates = list(sink.runs_dir.glob(f"{run_id}/files/*/*.parquet"))
    assert sorted(p.name for p in intermediates) == [
        "accepted.parquet",
        "parse_quarantine.parquet",
        "parsed.parquet",
        "quarantine.parquet",
    ]
    for path in intermediates:
        blob = path.read_bytes()
        assert blob.startswith(b"PARE"), path.name
        assert not {value for value in phi_values() if value.encode() in blob}, path.name
    dataset_files = list(sink.datasets_dir.rglob("*.parquet"))
    assert {p.relative_to(sink.datasets_dir).parts[0] for p in dataset_files} == {
        "delivery_facts", "audit_events"}  # fmt: skip
    for path in dataset_files:
        assert path.read_bytes().startswith(b"PAR1"), path.name
        cells = str(pq.read_table(path).to_pylist())
        assert not {value for value in phi_values() if value in cells}, path.name

    # PHI never reaches a log line.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "send: {'accepted': 11" in logged  # the log capture did see the run
    leaked = {value for value in phi_values() if value in logged}
    assert not leaked, f"{len(leaked)} PHI values in log output"


def test_second_run_on_same_drop_sends_nothing(sink: Settings, tmp_path: Path):
    drop = sample_drop(tmp_path)
    _, first = run_all(sink, drop)
    delivered_before = len(sink_deliveries(sink))

    _, second = run_all(sink, drop)

    assert first["messages_accepted"] == 11
    assert second["files"] == 0 and second["messages_accepted"] == 0
    assert len(sink_deliveries(sink)) == delivered_before
    with open_ledger(sink.ledger_url)() as session:
        assert len(session.scalars(select(Message)).all()) == 11
