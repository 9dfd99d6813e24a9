"""The `eob` command: one subcommand per stage, and stage-by-stage runs equal `eob run`."""

from __future__ import annotations

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.runner import STAGES
from tests.conftest import sample_drop


def test_every_stage_has_a_subcommand():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in (*STAGES, "start", "finish", "run", "demo", "sink", "rekey"):
        assert f"  {command} " in result.output


def test_stage_by_stage_from_the_command_line(sink, tmp_path, monkeypatch):
    for name, value in {"EOB_DATA_DIR": str(sink.data_dir), "EOB_DATABASE_URL": sink.ledger_url,
                        "EOB_SMTP_PORT": str(sink.smtp_port)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    started = runner.invoke(main, ["start", str(sample_drop(tmp_path))])
    assert started.exit_code == 0, started.output
    run_id = started.output.strip()
    for stage in STAGES:
        result = runner.invoke(main, [stage, run_id])
        assert result.exit_code == 0, result.output
    finished = runner.invoke(main, ["finish", run_id])
    assert "messages accepted" in finished.output and "11" in finished.output
