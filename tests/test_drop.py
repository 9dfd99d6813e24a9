"""The drop protocol, insurer profiles and rejection reports, through the runner."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import pipeline.intake.steps
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.intake.drop import scan_landing
from pipeline.intake.profiles import load_profile
from pipeline.ops.rekey import decrypted_file
from pipeline.records.atrest import DecryptionError
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import InputFile
from pipeline.runner import run_stage, start_run
from tests.conftest import REPO

SAMPLE = REPO / "data_samples" / "landing" / "acme" / "claims_2026-10.csv"


def drop_with(tmp_path: Path, insurer: str, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "landing" / insurer
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder.parent


def ingest_and_validate(settings: Settings, drop: Path) -> tuple[str, dict[str, int]]:
    run_id = start_run(settings, drop)
    counts = run_stage(settings, run_id, "ingest")
    counts |= {f"validate_{k}": v for k, v in run_stage(settings, run_id, "validate").items()}
    return run_id, counts


def test_files_still_being_uploaded_are_left_alone(tmp_path):
    drop = drop_with(tmp_path, "acme", {
        "claims.csv": b"x", ".claims2.csv": b"x", "claims3.csv.part": b"x", "claims4.csv.tmp": b"x",
    })  # fmt: skip
    assert [f.path.name for f in scan_landing(drop).files] == ["claims.csv"]


def test_marker_completion_needs_the_marker(tmp_path, monkeypatch):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "beta.toml").write_text('completion = "marker"\n')
    monkeypatch.setattr("pipeline.intake.profiles.PROFILES_DIR", profiles)
    monkeypatch.setattr(
        "pipeline.intake.drop.load_profile", lambda name: load_profile(name, profiles)
    )
    drop = drop_with(tmp_path, "beta", {"a.csv": b"x", "b.csv": b"y", "b.csv.ready": b""})
    assert [f.path.name for f in scan_landing(drop).files] == ["b.csv"]


def test_rosters_are_told_apart_by_name(tmp_path):
    drop = drop_with(tmp_path, "acme", {"roster_2026-11.csv": b"r", "claims.csv": b"c"})
    assert {(f.path.name, f.kind) for f in scan_landing(drop).files} == {
        ("roster_2026-11.csv", "roster"), ("claims.csv", "claims"),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('completion = "sometimes"\n', "completion"),
        ("max_bad_row_share = 2\n", "max_bad_row_share"),
        ("colour = 1\n", "colour"),
        ('[claims]\nformat = "xml"\n', "claims.format"),
        ('[claims.columns]\nMBR = "member_number"\n', "claims.columns.MBR"),
        ("max_gzip_ratio = 0.5\n", "max_gzip_ratio"),
        ('max_json_mib = "64"\n', "max_json_mib"),
    ],
)
def test_a_bad_profile_names_the_file_and_setting(tmp_path, text, named):
    (tmp_path / "gamma.toml").write_text(text)
    with pytest.raises(ConfigError, match=rf"gamma\.toml: .*{named}"):
        load_profile("gamma", tmp_path)


def test_versions_archive_and_duplicates(settings, tmp_path):
    first = drop_with(tmp_path / "one", "acme", {"claims.csv": SAMPLE.read_bytes()})
    ingest_and_validate(settings, first)
    assert not (first / "acme" / "claims.csv").exists()  # archived, not left in landing

    # The same name with new content is version 2; the old content under a new name is skipped.
    changed = SAMPLE.read_bytes().replace(b"CLM5007", b"CLM9007")
    second = drop_with(
        tmp_path / "two", "acme", {"claims.csv": changed, "again.csv": SAMPLE.read_bytes()}
    )
    _, counts = ingest_and_validate(settings, second)
    assert (counts["registered"], counts["skipped"]) == (1, 1)

    with open_ledger(settings.ledger_url)() as session:
        files = session.scalars(select(InputFile).order_by(InputFile.file_id)).all()
        assert [(f.file_name, f.version, f.status) for f in files] == [
            ("claims.csv", 1, "validated"), ("claims.csv", 2, "validated"),
        ]  # fmt: skip
        archived = [Path(f.archived_path or "") for f in files]
    assert all(p.is_file() and p.is_relative_to(settings.archive_dir) for p in archived)
    assert len(list(settings.archive_dir.rglob("*.csv"))) == 3  # the skipped copy is kept too
    # Kept encrypted, and `eob decrypt` (decrypted_file) gives the original back.
    assert all(b"CLM5007" not in p.read_bytes() for p in archived)
    assert b"".join(decrypted_file(settings, archived[0].resolve())) == SAMPLE.read_bytes()


def test_an_archived_drop_moved_to_another_insurer_or_day_does_not_decrypt(settings, tmp_path):
    ingest_and_validate(settings, drop_with(tmp_path, "acme", {"claims.csv": SAMPLE.read_bytes()}))
    [archived] = settings.archive_dir.rglob("*.csv")
    moved = settings.archive_dir / "other" / "2020-01-01" / archived.name
    moved.parent.mkdir(parents=True)
    archived.rename(moved)
    with pytest.raises(DecryptionError, match=f"{archived.name}: authentication failed"):
        b"".join(decrypted_file(settings, moved.resolve()))


def test_a_rejected_file_gets_a_report_without_values(settings, tmp_path, monkeypatch):
    strict = replace(load_profile("acme"), max_bad_row_share=0.05)
    monkeypatch.setattr("pipeline.intake.steps.load_profile", lambda insurer: strict)
    drop = drop_with(tmp_path, "acme", {"claims.csv": SAMPLE.read_bytes()})
    _, counts = ingest_and_validate(settings, drop)
    assert counts["validate_rejected"] == 1
    report = (settings.outbox_dir / "acme" / "claims.csv.rejected.txt").read_text()
    listing = (settings.outbox_dir / "acme" / "claims.csv.rejected.csv").read_text()
    assert "6 of 53 rows (11.3%) failed validation; the limit is 5%" in report
    assert "npi_format" in report and "row_number,field,rule,message" in listing.replace('"', "")
    sample_text = SAMPLE.read_text(encoding="utf-8")
    for value in ("Okafor", "ana.perez@example.com", "4521 Alder Ct", "A1000003", "1984-03-12"):
        assert value in sample_text and value not in report + listing
    with open_ledger(settings.ledger_url)() as session:
        record = session.scalars(select(InputFile)).one()
        assert (record.status, record.rows_in, record.rows_accepted) == ("rejected", 53, 0)


def test_an_unreadable_file_is_rejected_with_a_report(settings, tmp_path):
    drop = drop_with(tmp_path, "acme", {"claims.csv": b"member_id\nA1\n"})
    _, counts = ingest_and_validate(settings, drop)
    assert counts["rejected"] == 1
    report = (settings.outbox_dir / "acme" / "claims.csv.rejected.txt").read_text()
    assert "missing required columns: claim_id" in report


def test_a_roster_drop_supplies_contact_and_consent(settings, tmp_path):
    bare = SAMPLE.read_text(encoding="utf-8").replace("mei.chen@example.net", "")
    roster = ("member_id,first_name,last_name,email,edelivery_consent,language\n"
              "A1000003,Mei,Chen,mei.c@example.org,yes,en\n"
              "A1000004,Samuel,Okafor,sam.okafor@example.com,no,en\n")  # fmt: skip
    drop = drop_with(tmp_path, "acme", {"claims.csv": bare.encode(), "roster.csv": roster.encode()})
    run_id, counts = ingest_and_validate(settings, drop)
    statements = run_stage(settings, run_id, "statements")
    assert counts["validate_files"] == 2
    # Okafor said no to e-delivery: print. Without a roster row, the extract's address counts.
    assert statements == {"email": 10, "print": 2}
    # The insurer's merged roster rests encrypted in the data directory.
    stored = (settings.rosters_dir / "acme.parquet").read_bytes()
    assert stored.startswith(b"PARE") and b"sam.okafor@example.com" not in stored


def test_an_unexpected_failure_rejects_that_file_alone(settings, tmp_path, monkeypatch, caplog):
    real_ingest = pipeline.intake.steps.ingest_file

    def poisoned(path: Path, **kwargs: Any) -> Any:
        if path.name == "poison.csv":
            raise RecursionError("maximum recursion depth exceeded near 'Okafor'")
        return real_ingest(path, **kwargs)

    monkeypatch.setattr("pipeline.intake.steps.ingest_file", poisoned)
    drop = drop_with(tmp_path, "acme", {"claims.csv": SAMPLE.read_bytes(), "poison.csv": b"x,y\n"})
    drop_with(tmp_path, "beta", {"claims.csv": SAMPLE.read_bytes().replace(b"CLM", b"BCL")})
    _, counts = ingest_and_validate(settings, drop)
    assert (counts["registered"], counts["rejected"], counts["validate_files"]) == (2, 1, 2)

    with open_ledger(settings.ledger_url)() as session:
        files = {(f.insurer, f.file_name): f for f in session.scalars(select(InputFile))}
        poison = files["acme", "poison.csv"]
        assert poison.status == "rejected"
        assert poison.rejection_reason == "failed unexpectedly while reading (RecursionError)"
        assert Path(poison.archived_path or "").is_file()  # moved aside like any rejected file
        assert files["acme", "claims.csv"].status == "validated"
        # The other insurer's file went on through validation (it has too many bad rows).
        assert files["beta", "claims.csv"].rejection_reason.startswith("6 of 53 rows")
    report = (settings.outbox_dir / "acme" / "poison.csv.rejected.txt").read_text()
    assert "failed unexpectedly while reading (RecursionError)" in report
    assert "Okafor" not in report + caplog.text + (poison.rejection_reason or "")
    assert not list(drop.rglob("*.csv"))  # nothing left in landing to trip the next run
    # The next run finds nothing to do and does not fail.
    assert ingest_and_validate(settings, drop)[1]["registered"] == 0


def test_an_unexpected_validation_failure_rejects_that_file_alone(settings, tmp_path, monkeypatch):
    import pipeline.intake.validate

    real_validate = pipeline.intake.validate.validate_file

    def poisoned(**kwargs: Any) -> Any:
        if kwargs["file_name"] == "poison.csv":
            raise OSError(28, "No space left on device: 'Okafor'")
        return real_validate(**kwargs)

    monkeypatch.setattr("pipeline.intake.validate.validate_file", poisoned)
    poison = SAMPLE.read_bytes().replace(b"CLM", b"PCL")
    drop = drop_with(tmp_path, "acme", {"claims.csv": SAMPLE.read_bytes(), "poison.csv": poison})
    _, counts = ingest_and_validate(settings, drop)
    assert (counts["validate_files"], counts["validate_rejected"]) == (2, 1)
    with open_ledger(settings.ledger_url)() as session:
        files = {f.file_name: f for f in session.scalars(select(InputFile))}
    assert (files["poison.csv"].status, files["claims.csv"].status) == ("rejected", "validated")
    assert files["poison.csv"].rejection_reason == "failed unexpectedly while validating (OSError)"
    assert files["poison.csv"].rows_quarantined == files["poison.csv"].rows_in == 53
    report = (settings.outbox_dir / "acme" / "poison.csv.rejected.txt").read_text()
    assert "validating (OSError)" in report and "Okafor" not in report


_KILLED_AT = """
import os, signal, sys
from pathlib import Path
import pipeline.intake.steps as steps
from pipeline.config import Settings
from pipeline.runner import run_stage, start_run

point, when = sys.argv[3], sys.argv[4]
real = getattr(steps, point)
def dying(*args, **kwargs):
    if when == "after":
        real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(steps, point, dying)
settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
run_id = start_run(settings, Path(sys.argv[5]))
print(run_id, flush=True)
run_stage(settings, run_id, "ingest")
"""


@pytest.mark.parametrize(
    ("point", "when"), [("archive_copy", "after"), ("remove_from_landing", "before")]
)
def test_killed_around_the_archive_the_rerun_processes_the_file_exactly_once(
    settings, tmp_path, point, when
):
    drop = drop_with(tmp_path, "acme", {"claims.csv": SAMPLE.read_bytes()})
    args = [str(settings.data_dir), settings.ledger_url, point, when, str(drop)]
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT, *args], check=False, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL

    # The run is resumed: its stages are rerun.
    for stage in ("ingest", "validate"):
        run_stage(settings, killed.stdout.strip(), stage)
    with open_ledger(settings.ledger_url)() as session:
        files = session.scalars(select(InputFile)).all()
    assert [(f.file_name, f.status, f.rows_in) for f in files] == [("claims.csv", "validated", 53)]
    assert not (drop / "acme" / "claims.csv").exists()
    assert [p.name for p in settings.archive_dir.rglob("*.csv")] == [
        Path(files[0].archived_path or "").name
    ]
    assert b"".join(decrypted_file(settings, Path(files[0].archived_path or "").resolve())) == (
        SAMPLE.read_bytes()
    )


def test_a_file_replaced_during_its_ingest_is_left_for_the_next_run(
    settings, tmp_path, monkeypatch
):
    drop = drop_with(tmp_path, "acme", {"claims.csv": SAMPLE.read_bytes()})
    newer = SAMPLE.read_bytes().replace(b"CLM5007", b"CLM9007")
    real_copy = pipeline.intake.steps.archive_copy

    def copy_then_reupload(*args: Any) -> Path:
        archived = real_copy(*args)
        # The insurer uploads a corrected file under the same name (temporary name, rename).
        (drop / "acme" / "claims.csv.part").write_bytes(newer)
        (drop / "acme" / "claims.csv.part").replace(drop / "acme" / "claims.csv")
        return archived

    monkeypatch.setattr("pipeline.intake.steps.archive_copy", copy_then_reupload)
    ingest_and_validate(settings, drop)
    assert (drop / "acme" / "claims.csv").read_bytes() == newer  # not removed unread
    monkeypatch.undo()
    ingest_and_validate(settings, drop)
    with open_ledger(settings.ledger_url)() as session:
        files = session.scalars(select(InputFile).order_by(InputFile.file_id)).all()
    assert [(f.file_name, f.version) for f in files] == [("claims.csv", 1), ("claims.csv", 2)]
    assert not (drop / "acme" / "claims.csv").exists()
