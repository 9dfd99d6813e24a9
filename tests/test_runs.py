"""Runs that finish: each completed stage is in the ledger, `eob runs` lists what is pending,
`eob resume` finishes a crashed run, and a new intake of its drop is refused until then."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from pipeline import runner
from pipeline.config import Settings
from pipeline.ops.cli import main
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import InputFile, Run
from tests.conftest import sample_drop


@pytest.fixture
def cli(sink: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    settings = sink  # `eob run` checks the sink's CA file before anything else
    environment = {
        "EOB_DATA_DIR": str(settings.data_dir),
        "EOB_DATABASE_URL": settings.ledger_url,
        "EOB_SMTP_PORT": str(settings.smtp_port),
        "COLUMNS": "300",  # one table row per line
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def _crash(_context: object) -> dict[str, int]:
    raise RuntimeError("power cut")


def test_a_crashed_intake_is_listed_refused_then_resumed(
    cli: CliRunner, settings: Settings, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    drop = sample_drop(tmp_path)
    validate = runner._STEPS["validate"]
    monkeypatch.setitem(runner._STEPS, "validate", _crash)
    assert cli.invoke(main, ["intake", str(drop)]).exit_code != 0
    monkeypatch.setitem(runner._STEPS, "validate", validate)
    sessions = open_ledger(settings.ledger_url)
    with sessions() as session:
        run_id = session.scalars(select(Run.run_id)).one()

    listed = cli.invoke(main, ["runs"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if run_id in line)
    assert "ingest" in row and "files registered, not validated: 1" in row

    for command in ("intake", "run"):
        refused = cli.invoke(main, [command, str(drop)])
        assert refused.exit_code == 2, refused.output
        assert len(refused.output.strip().splitlines()) == 1
        assert run_id in refused.output and f"eob resume {run_id}" in refused.output
    with sessions() as session:
        assert len(session.scalars(select(Run)).all()) == 1

    resumed = cli.invoke(main, ["resume", run_id])
    assert resumed.exit_code == 0, resumed.output
    with sessions() as session:
        assert session.get_one(Run, run_id).finished_at is not None
        statuses = session.scalars(select(InputFile.status)).all()
        assert statuses == ["validated"]
    listed = cli.invoke(main, ["runs"])
    row = next(line for line in listed.output.splitlines() if run_id in line)
    assert "plan" in row and "registered" not in row
    # Finished: the drop may be taken in again (its files are known: nothing twice).
    again = cli.invoke(main, ["intake", str(drop)])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("command", ["plan", "finish", "resume"])
def test_an_unknown_run_id_is_refused(cli: CliRunner, command: str):
    refused = cli.invoke(main, [command, "r_bogus"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "eob: unknown run r_bogus (`eob runs` lists the runs)"
    ]


def test_stage_by_stage_records_each_completed_stage(cli: CliRunner, tmp_path):
    run_id = cli.invoke(main, ["start", str(sample_drop(tmp_path))]).output.strip()
    assert cli.invoke(main, ["ingest", run_id]).exit_code == 0
    row = next(line for line in cli.invoke(main, ["runs"]).output.splitlines() if run_id in line)
    assert "ingest" in row and "no" in row


def test_a_narrow_terminal_still_shows_the_whole_run_id(
    cli: CliRunner, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    # The id is what `eob resume` takes: a table cut to the terminal must not cut it.
    run_id = cli.invoke(main, ["start", str(sample_drop(tmp_path))]).output.strip()
    monkeypatch.setenv("COLUMNS", "60")
    assert run_id in cli.invoke(main, ["runs"]).output


def test_returns_every_runs_passes_until_sigterm_then_exits_0(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    environment = {**os.environ, "EOB_DATA_DIR": str(tmp_path / "data")}
    environment.pop("EOB_DATABASE_URL", None)
    loop = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "returns", "--every", "1"],
        stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        passes, lines, deadline = 0, [], time.monotonic() + 60
        while passes < 2 and time.monotonic() < deadline:
            line = loop.stderr.readline()
            lines.append(line)
            passes += "returns pass:" in line
        assert passes == 2, "".join(lines)
        loop.send_signal(signal.SIGTERM)
        rest = loop.communicate(timeout=30)[1]
    finally:
        loop.kill()
    assert loop.returncode == 0, rest
    assert "Traceback" not in rest


def test_a_finished_run_is_not_resumed(cli: CliRunner, tmp_path):
    run_id = cli.invoke(main, ["start", str(sample_drop(tmp_path))]).output.strip()
    assert cli.invoke(main, ["finish", run_id]).exit_code == 0
    refused = cli.invoke(main, ["resume", run_id])
    assert refused.exit_code == 2
    assert refused.output.strip() == f"eob: run {run_id} is finished: nothing to resume"
