"""The `eob` command: one subcommand per stage, and stage-by-stage runs equal `eob run`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.ops.cli import main
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


def test_review_commands_work_the_case(tmp_path, monkeypatch):
    from sqlalchemy import select

    from pipeline.config import Settings
    from pipeline.records.ledger import open_ledger
    from pipeline.records.ledger.models import ConsoleUser, ResendCase
    from tests.ledger_seed import seed_run_and_file
    from tests.test_cases import _hard_bounced_case

    settings = Settings(data_dir=tmp_path / "data")
    with open_ledger(settings.ledger_url).begin() as session:
        seed_run_and_file(session)
        case_id = _hard_bounced_case(session).case_id
    monkeypatch.setenv("EOB_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    listed = runner.invoke(main, ["review", "list"])
    assert listed.exit_code == 0 and case_id in listed.output
    verify = ["review", "verify", case_id, "--actor", "alice", "--channel", "mail",
              "--evidence", "signed form returned", "--address", "new@example.net"]  # fmt: skip
    assert runner.invoke(main, verify).exit_code == 0
    same = runner.invoke(main, ["review", "approve", case_id, "--actor", "alice"])
    assert same.exit_code != 0 and "must not be the verifier" in same.output
    assert runner.invoke(main, ["review", "approve", case_id, "--actor", "bob"]).exit_code == 0
    added = runner.invoke(main, ["review", "add-user", "vic", "--role", "viewer", "--actor", "ops"],
                          input="a long enough password\na long enough password\n")  # fmt: skip
    assert added.exit_code == 0, added.output
    with open_ledger(settings.ledger_url)() as session:
        assert session.get_one(ResendCase, case_id).approved_by == "bob"
        user = session.scalars(select(ConsoleUser)).one()
        assert user.role == "viewer" and "password" not in user.password_hash


_HEAVY = ("pandas", "pyarrow", "sqlalchemy", "great_expectations", "reportlab")


def test_help_imports_no_heavy_library():
    # A fresh interpreter: this test process has imported everything already.
    probe = (
        "import sys, time; started = time.perf_counter(); import pipeline.ops.cli; "
        "from click.testing import CliRunner; "
        "assert CliRunner().invoke(pipeline.ops.cli.main, ['--help']).exit_code == 0; "
        "print(round(time.perf_counter() - started, 2)); "
        f"print(' '.join(m for m in {_HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    seconds, heavy = (done.stdout.splitlines() + [""])[:2]
    print(f"import pipeline.ops.cli and --help: {seconds} s")
    assert heavy == ""


# Exit codes (README "Command line"): 0 done, 1 done with something for the operator,
# 2 configuration or usage error (nothing done), 3 failure.


def _use(monkeypatch, settings) -> CliRunner:
    monkeypatch.setenv("EOB_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("EOB_DATABASE_URL", settings.ledger_url)
    return CliRunner()


def test_exit_1_when_a_file_was_rejected(settings, tmp_path, monkeypatch):
    drop = sample_drop(tmp_path)
    (drop / "acme" / "claims_broken.csv").write_text("member_id\nA1\n", encoding="utf-8")
    result = _use(monkeypatch, settings).invoke(main, ["intake", str(drop)])
    assert result.exit_code == 1, result.output
    assert "eob: 1 files rejected (reports in the outbox)" in result.output


def test_exit_1_while_a_route_is_paused(settings, monkeypatch):
    from datetime import UTC, datetime

    from pipeline.records.ledger import open_ledger
    from pipeline.records.ledger.models import DeliverabilityAlert

    with open_ledger(settings.ledger_url).begin() as session:
        session.add(DeliverabilityAlert(kind="bounce_rate_pause", source_ip="127.0.0.2",
                                        provider="example.net", count=9, rate=0.2,
                                        opened_at=datetime.now(UTC)))  # fmt: skip
    result = _use(monkeypatch, settings).invoke(main, ["returns"])
    assert result.exit_code == 1, result.output
    assert "eob: 1 routes paused" in result.output


@pytest.mark.parametrize(
    ("arguments", "environment", "line"),
    [
        (["runs"], {"EOB_SMTP_PORT": "many"}, "eob: setting smtp_port: expected int"),
        (["runs"], {"EOB_CONFIG": "/nonexistent/eob.toml"}, "eob: reading /nonexistent/eob.toml"),
        (["plan"], {}, "Error: Missing argument 'RUN_ID'."),
    ],
)
def test_exit_2_for_a_configuration_or_usage_error(arguments, environment, line, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2
    assert line in result.output and "Traceback" not in result.output


def test_exit_3_names_the_stage_and_error_type_only(settings, tmp_path, monkeypatch):
    from pipeline import runner

    def broken(_context):
        raise RuntimeError("a record value that must not be printed")

    monkeypatch.setitem(runner._STEPS, "validate", broken)
    result = _use(monkeypatch, settings).invoke(main, ["intake", str(sample_drop(tmp_path))])
    assert result.exit_code == 3
    assert result.output.strip().splitlines()[-1] == (
        "eob: validate failed: RuntimeError (details: eob -v)"
    )
    assert "record value" not in result.output


def test_exit_3_traceback_only_with_verbose(tmp_path):
    # A database that does not exist: an unexpected error, not a configuration one.
    absent = "postgresql+psycopg://postgres@127.0.0.1:5432/eob_absent"
    environment = {**os.environ, "EOB_DATA_DIR": str(tmp_path), "EOB_DATABASE_URL": absent}
    eob = [sys.executable, "-m", "pipeline"]
    quiet = subprocess.run([*eob, "runs"], capture_output=True, text=True, env=environment)
    assert quiet.returncode == 3
    assert quiet.stderr.strip().splitlines()[-1:] == [
        "eob: runs failed: OperationalError (details: eob -v)"
    ]
    assert "Traceback" not in quiet.stderr and "eob_absent" not in quiet.stderr
    verbose = subprocess.run([*eob, "-v", "runs"], capture_output=True, text=True, env=environment)
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr
