"""Hostile drops: what lands in landing/ is refused or read within bounds, and never breaks a
log line, a report or the archive."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.intake.profiles import load_profile
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import InputFile
from pipeline.runner import run_stage, start_run
from tests.conftest import REPO

SAMPLE = REPO / "data_samples" / "landing" / "acme" / "claims_2026-10.csv"
UNREADABLE = b"member_id\nA1\n"  # rejected: required columns missing
MIB = 1 << 20


def landing(tmp_path: Path) -> Path:
    folder = tmp_path / "landing" / "acme"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ingest(settings: Settings, folder: Path) -> dict[str, int]:
    return run_stage(settings, start_run(settings, folder.parent), "ingest")


def input_files(settings: Settings) -> list[InputFile]:
    with open_ledger(settings.ledger_url)() as session:
        return list(session.scalars(select(InputFile).order_by(InputFile.file_id)))


def reports(settings: Settings) -> dict[str, str]:
    folder = settings.outbox_dir / "acme"
    return {p.name: p.read_text() for p in sorted(folder.glob("*.rejected.txt"))}


def use_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir(exist_ok=True)
    (profiles / "acme.toml").write_text(text)
    monkeypatch.setattr("pipeline.intake.profiles.PROFILES_DIR", profiles)
    for module in ("drop", "steps"):
        monkeypatch.setattr(
            f"pipeline.intake.{module}.load_profile", lambda name: load_profile(name, profiles)
        )


def test_a_symbolic_link_is_refused_and_never_read(settings, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_bytes(SAMPLE.read_bytes())
    folder = landing(tmp_path)
    (folder / "claims.csv").symlink_to(secret)
    counts = ingest(settings, folder)
    assert (counts["registered"], counts["refused"]) == (0, 1)
    assert input_files(settings) == []
    assert not settings.archive_dir.exists() or not any(settings.archive_dir.rglob("*.csv"))
    assert [p.name for p in folder.iterdir()] == [".refused"]
    [moved] = (folder / ".refused").iterdir()
    assert moved.is_symlink() and secret.read_bytes() == SAMPLE.read_bytes()
    report = reports(settings)["claims.csv.rejected.txt"]
    assert "rejected: a symbolic link, not a regular file" in report
    assert "Okafor" not in report
    assert ingest(settings, folder)["refused"] == 0  # set aside: the next run does not meet it


def test_directories_and_fifos_are_refused(settings, tmp_path):
    folder = landing(tmp_path)
    (folder / "more").mkdir()
    (folder / "more" / "claims.csv").write_bytes(SAMPLE.read_bytes())
    os.mkfifo(folder / "claims.csv")  # opening it to read would block for ever
    (folder / "good.csv").write_bytes(SAMPLE.read_bytes())
    counts = ingest(settings, folder)
    assert (counts["registered"], counts["refused"]) == (1, 2)
    found = reports(settings)
    assert "a directory, not a regular file" in found["more.rejected.txt"]
    assert "a special file (fifo, socket or device)" in found["claims.csv.rejected.txt"]


NEWLINE_NAME = "claims.csv\nWARNING pipeline.intake.steps all files accepted\x1b[2J.csv"


@pytest.mark.parametrize(
    "name",
    [NEWLINE_NAME, "c" * 246 + ".csv", os.fsdecode(b"claims-\xff\xfe.csv")],
    ids=["newline", "250 characters", "not UTF-8"],
)
@pytest.mark.parametrize("content", [SAMPLE.read_bytes(), UNREADABLE], ids=["good", "rejected"])
def test_hostile_names_never_break_logs_reports_or_the_archive(
    settings, tmp_path, caplog, name, content
):
    folder = landing(tmp_path)
    (folder / name).write_bytes(content)
    with caplog.at_level(logging.INFO):
        counts = ingest(settings, folder)
    assert counts["registered"] + counts["rejected"] == 1
    [record] = input_files(settings)
    # The original name is kept as data (bytes that are not UTF-8 as escapes).
    assert record.file_name == os.fsencode(name).decode("utf-8", "backslashreplace")
    archived = Path(record.archived_path or "")
    assert archived.is_file() and len(archived.name) < 160 and archived.name.isprintable()
    assert not any(folder.iterdir())
    for entry in caplog.records:
        line = entry.getMessage()
        assert "\n" not in line and "\x1b" not in line and len(line) < 400
    if content == UNREADABLE:
        [(report_name, report)] = reports(settings).items()
        assert report_name.isprintable() and len(report_name) < 200
        assert not any(line.startswith("WARNING") for line in report.splitlines())
        assert "\x1b" not in report and "rejected: missing required columns" in report


def gzip_of(chunks: int, chunk: bytes, head: bytes = b"") -> bytes:
    """gzip data of head + chunks x chunk, made without holding the inflated data."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [packer.compress(head)]
    out += [packer.compress(chunk) for _ in range(chunks)]
    return b"".join(out) + packer.flush()


_CHILD = """
import json, sys
from pathlib import Path
from pipeline.config import Settings
from pipeline.runner import run_stage, start_run
settings = Settings(data_dir=Path(sys.argv[1]), database_url=sys.argv[2])
counts = run_stage(settings, start_run(settings, Path(sys.argv[3])), "ingest")
# VmHWM: this process image's peak (ru_maxrss would count the forked parent's pages too).
status = Path("/proc/self/status").read_text()
peak_mib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) // 1024
print(json.dumps({"counts": counts, "peak_mib": peak_mib}))
"""


def ingest_in_child(settings: Settings, folder: Path) -> dict[str, Any]:
    """Ingest in a fresh process, for its own peak RSS."""
    args = [str(settings.data_dir), settings.ledger_url, str(folder.parent)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def one_gib_of_zeros() -> bytes:
    return gzip_of(1024, bytes(MIB))  # about 1 MB that inflates to 1 GiB


@pytest.mark.parametrize("name", ["claims.csv.gz", "claims.json.gz", "claims.ndjson.gz"])
@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_a_gzip_bomb_is_refused_in_bounded_memory(settings, tmp_path, one_gib_of_zeros, name):
    folder = landing(tmp_path)
    (folder / name).write_bytes(one_gib_of_zeros)
    result = ingest_in_child(settings, folder)
    print(f"{name}: peak RSS {result['peak_mib']} MiB")
    assert result["counts"]["rejected"] == 1
    assert result["peak_mib"] < 400
    [record] = input_files(settings)
    assert record.status == "rejected"


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_gzip_inflating_past_the_profile_ratio_is_refused(settings, tmp_path, monkeypatch):
    header, *rows = SAMPLE.read_bytes().splitlines(keepends=True)
    # Valid rows, 40 MiB of them, compressing about 300 to 1.
    bomb = gzip_of(40 * MIB // len(rows[0]), rows[0], head=header)
    folder = landing(tmp_path)
    (folder / "claims.csv.gz").write_bytes(bomb)
    use_profile(tmp_path, monkeypatch, "max_gzip_ratio = 20\n")
    counts = ingest(settings, folder)
    assert (counts["registered"], counts["rejected"]) == (0, 1)
    [record] = input_files(settings)
    assert "inflates to more than" in (record.rejection_reason or "")
    assert "max_gzip_ratio" in reports(settings)["claims.csv.gz.rejected.txt"]


def test_a_small_gzip_within_the_ratio_reads_as_before(settings, tmp_path):
    import gzip

    folder = landing(tmp_path)
    (folder / "claims.csv.gz").write_bytes(gzip.compress(SAMPLE.read_bytes()))
    assert ingest(settings, folder)["registered"] == 1


DEEP = '{"resourceType": "ExplanationOfBenefit", "item": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize(
    ("name", "text"),
    [("deep.json", DEEP), ("deep.ndjson", DEEP + "\n"), ("two.json", DEEP + "\n" + DEEP + "\n")],
)
def test_deeply_nested_json_is_refused_cleanly(settings, tmp_path, name, text):
    folder = landing(tmp_path)
    (folder / name).write_text(text)
    counts = ingest(settings, folder)
    assert counts["rejected"] == 1
    [record] = input_files(settings)
    assert "nested too deeply" in (record.rejection_reason or "")


def test_a_json_document_over_the_profile_size_is_refused(settings, tmp_path, monkeypatch):
    resource = {"resourceType": "ExplanationOfBenefit", "use": "claim", "item": []}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": resource}]}
    bundle["entry"] *= 30_000  # about 2 MiB
    folder = landing(tmp_path)
    (folder / "bundle.json").write_text(json.dumps(bundle))
    use_profile(tmp_path, monkeypatch, "max_json_mib = 1\n")
    counts = ingest(settings, folder)
    assert counts["rejected"] == 1
    [record] = input_files(settings)
    assert "larger than 1 MiB (max_json_mib)" in (record.rejection_reason or "")
