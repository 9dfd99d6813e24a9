"""Collection: maildir and mbox sources, processed once by hash, raw kept encrypted."""

from __future__ import annotations

import base64
import mailbox
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from pipeline.config import Settings
from pipeline.ops.sink import delivery_status_notification
from pipeline.records.atrest import DecryptionError, parse_keys
from pipeline.records.verp import verp_return_path
from pipeline.returns import bounces
from pipeline.returns.collect import (
    Archive,
    Collected,
    MaildirSource,
    MboxSource,
    legacy_fernet_key,
)
from pipeline.runner import run_stage, start_run
from tests.conftest import sample_drop

DOMAIN = "bounces.eob.example.com"
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
RING_A = parse_keys(f"a1:{KEY_A}", source="test")
ROTATED = parse_keys(f"b1:{KEY_B},a1:{KEY_A}", source="test")


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
    if kind == "maildir":  # the data directory's maildir keeps no processed report in plaintext
        assert b"m1" not in b"".join(f.read_bytes() for f in path.rglob("*") if f.is_file())


def test_the_archive_keeps_raw_reports_encrypted_and_knows_them_by_hash(tmp_path: Path):
    archive = Archive(tmp_path / "archive", RING_A)
    item = Collected("k", _dsn("m1"))
    archive.keep(item)
    [stored] = (tmp_path / "archive").iterdir()
    assert stored.name == f"{item.sha256}.eml.enc"
    assert b"gone@example.org" not in stored.read_bytes()  # PHI is not readable at rest
    assert RING_A.key_id_of(stored.read_bytes()) == "a1"
    assert archive.read(item.sha256) == item.raw

    with pytest.raises(DecryptionError) as caught:
        Archive(tmp_path / "archive", parse_keys(f"b1:{KEY_B}", source="t")).read(item.sha256)
    assert str(caught.value) == f"{stored.name}: encrypted with key 'a1', not in the keyring"
    renamed = stored.with_name("0" * 64 + ".eml.enc")  # bound to its hash: no swapping reports
    stored.rename(renamed)
    with pytest.raises(DecryptionError, match="authentication failed") as caught:
        archive.read("0" * 64)
    assert "gone@example.org" not in str(caught.value)


def test_rekey_rotates_kept_reports_and_converts_fernet_ones(tmp_path: Path):
    archive = Archive(tmp_path / "archive", RING_A)
    current, legacy = Collected("k1", _dsn("m1")), Collected("k2", _dsn("m2"))
    archive.keep(current)
    # What the collector wrote before the keyring: a Fernet token under archive.key.
    fernet_key = Fernet.generate_key()
    legacy_path = tmp_path / "archive" / f"{legacy.sha256}.eml.enc"
    legacy_path.write_bytes(Fernet(fernet_key).encrypt(legacy.raw))

    with pytest.raises(DecryptionError, match=rf"{legacy_path.name}: .*Fernet.*`eob rekey`"):
        archive.read(legacy.sha256)
    with pytest.raises(DecryptionError, match=rf"{legacy_path.name}: .*Fernet.*`eob rekey`"):
        Archive(tmp_path / "archive", RING_A).rekey(None)

    rotated = Archive(tmp_path / "archive", ROTATED)
    assert rotated.rekey(fernet_key) == {"reencrypted": 2, "already_current": 0}
    assert rotated.rekey(fernet_key) == {"reencrypted": 0, "already_current": 2}
    only_b = Archive(tmp_path / "archive", parse_keys(f"b1:{KEY_B}", source="t"))
    assert [only_b.read(i.sha256) for i in (current, legacy)] == [current.raw, legacy.raw]


def test_the_legacy_archive_key_comes_from_the_environment_or_the_old_key_file(tmp_path: Path):
    assert legacy_fernet_key(tmp_path, {}) is None
    (tmp_path / "archive.key").write_bytes(b"file-key\n")
    assert legacy_fernet_key(tmp_path, {}) == b"file-key"
    assert legacy_fernet_key(tmp_path, {"EOB_ARCHIVE_KEY": "env-key"}) == b"env-key"


def test_the_bounces_stage_processes_a_report_once(sink, tmp_path: Path):
    """The same raw report delivered twice (a re-delivery) is recorded once."""
    from sqlalchemy import select

    from pipeline.records.ledger import open_ledger
    from pipeline.records.ledger.models import Bounce
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
    from pipeline.errors import ConfigError
    from pipeline.returns.collect import ImapSource, source_from

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


def test_a_report_whose_processing_failed_is_processed_on_the_next_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The ledger decides what was processed: a report archived by a run that then failed
    # before its commit must not be skipped (and removed from the maildir) as already seen.
    run_id = start_run(settings, sample_drop(tmp_path))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    box = mailbox.Maildir(settings.return_path_maildir, create=True)
    box.add(_dsn("m1"))
    box.flush()
    parse = bounces.parse_report

    def broken(*args: object, **kwargs: object) -> list[bounces.BounceReport]:
        raise RuntimeError("ledger went away")

    monkeypatch.setattr(bounces, "parse_report", broken)
    with pytest.raises(RuntimeError):
        run_stage(settings, run_id, "bounces")
    assert len(box) == 1  # not marked processed

    monkeypatch.setattr(bounces, "parse_report", parse)
    counts = run_stage(settings, run_id, "bounces")
    assert (counts["reports"], counts["already_seen"]) == (1, 0)
    assert len(mailbox.Maildir(settings.return_path_maildir, create=False)) == 0
    assert run_stage(settings, run_id, "bounces")["reports"] == 0


def test_an_mbox_pass_marks_its_reports_in_one_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import os

    path = tmp_path / "returns.mbox"
    box = mailbox.mbox(path)
    for token in ("m1", "m2", "m3"):
        box.add(_dsn(token))
    box.close()
    rewrites: list[str] = []
    rename = os.rename

    def recording_rename(source: str, target: str) -> None:
        rewrites.append(str(target))  # mailbox rewrites an mbox into a copy renamed over it
        rename(source, target)

    monkeypatch.setattr(os, "rename", recording_rename)
    source = MboxSource(path)
    for item in source.messages():
        source.mark_processed(item.ref)
        assert rewrites == []  # marked when the pass ends, not per report
    assert rewrites == [str(path)]
    assert list(source.messages()) == []
    assert len(mailbox.mbox(path)) == 3  # flagged read, not removed
