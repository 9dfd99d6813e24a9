"""Collection: maildir and mbox sources, processed once by hash, raw kept encrypted."""

from __future__ import annotations

import mailbox
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken

from pipeline.collect import Archive, Collected, MaildirSource, MboxSource
from pipeline.plan import verp_return_path
from pipeline.sink import delivery_status_notification

DOMAIN = "bounces.eob.example.com"


def _dsn(token: str) -> bytes:
    return delivery_status_notification(
        verp_return_path(token, DOMAIN), ["gone@example.org"], b"Subject: s\r\n\r\nbody"
    ).as_bytes()


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_a_source_yields_each_message_until_marked(tmp_path: Path, kind: str):
    path = tmp_path / kind
    box = mailbox.Maildir(path, create=True) if kind == "maildir" else mailbox.mbox(path)
    for token in ("m1", "m2"):
        box.add(_dsn(token))
    box.flush()
    source = MaildirSource(path) if kind == "maildir" else MboxSource(path)
    first = list(source.messages())
    assert len(first) == 2
    source.mark_processed(first[0].ref)
    assert [c.raw for c in source.messages()] == [first[1].raw]


def test_the_archive_keeps_raw_reports_encrypted_and_knows_them_by_hash(tmp_path: Path):
    key = Fernet.generate_key()
    archive = Archive(tmp_path / "archive", key)
    item = Collected("k", _dsn("m1"))
    assert not archive.has(item.sha256)
    archive.keep(item)
    assert archive.has(item.sha256)
    stored = next((tmp_path / "archive").iterdir()).read_bytes()
    assert b"gone@example.org" not in stored  # PHI is not readable at rest
    assert archive.read(item.sha256) == item.raw
    with pytest.raises(InvalidToken):
        Archive(tmp_path / "archive", Fernet.generate_key()).read(item.sha256)


def test_a_development_key_is_made_once_and_private(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("EOB_ARCHIVE_KEY", raising=False)
    first = Archive.in_data_dir(tmp_path)
    item = Collected("k", b"raw")
    first.keep(item)
    assert Archive.in_data_dir(tmp_path).read(item.sha256) == b"raw"
    assert (tmp_path / "archive.key").stat().st_mode & 0o777 == 0o600


def test_the_bounces_stage_processes_a_report_once(sink, tmp_path: Path):
    """The same raw report delivered twice (a re-delivery) is recorded once."""
    from sqlalchemy import select

    from pipeline.ledger import open_ledger
    from pipeline.ledger.models import Bounce
    from pipeline.runner import run_stage, start_run
    from tests.conftest import sample_drop

    run_id = start_run(sink, sample_drop(tmp_path))
    box = mailbox.Maildir(sink.return_path_maildir, create=True)
    raw = _dsn("mnotours")
    box.add(raw)
    box.add(raw)
    counts = run_stage(sink, run_id, "bounces")
    assert counts == {"reports": 1, "matched": 0, "unmatched": 1, "already_seen": 1}
    assert run_stage(sink, run_id, "bounces")["reports"] == 0
    with open_ledger(sink.ledger_url)() as session:
        [bounce] = session.scalars(select(Bounce)).all()
        assert (bounce.matched_by, bounce.message_id, bounce.kind) == ("none", None, "dsn")


def test_the_source_setting(tmp_path: Path):
    from pipeline.collect import ImapSource, source_from
    from pipeline.errors import ConfigError

    assert source_from("", tmp_path / "rp") == MaildirSource(tmp_path / "rp")
    assert source_from(f"mbox:{tmp_path}/box", tmp_path) == MboxSource(tmp_path / "box")
    imap = source_from("imaps://bounces@imap.example.org/Returns", tmp_path)
    assert isinstance(imap, ImapSource)
    assert (imap.host, imap.user, imap.folder, imap.port) == (
        "imap.example.org",
        "bounces",
        "Returns",
        993,
    )
    with pytest.raises(ConfigError, match="return_path_source"):
        source_from("pop3://x", tmp_path)


def test_the_bounces_stage_reads_an_mbox(sink, tmp_path: Path):
    from dataclasses import replace

    from pipeline.runner import run_stage, start_run
    from tests.conftest import sample_drop

    box = mailbox.mbox(tmp_path / "returns.mbox")
    box.add(_dsn("mnotours"))
    box.flush()
    settings = replace(sink, return_path_source=f"mbox:{tmp_path / 'returns.mbox'}")
    run_id = start_run(settings, sample_drop(tmp_path))
    assert run_stage(settings, run_id, "bounces")["reports"] == 1
    assert run_stage(settings, run_id, "bounces")["reports"] == 0
