"""What the Airflow tasks call besides the runner (pipeline.ops.dag_tasks), without Airflow:
an intake DAG run keeps its ledger run, the drop check is a listing, paused routes are
logged by sending IP only."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline import runner
from pipeline.config import Settings
from pipeline.ops.dag_tasks import has_complete_file, intake_run_for, log_paused_routes
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import DeliverabilityAlert, Run
from tests.conftest import sample_drop


def _runs(settings: Settings) -> int:
    with open_ledger(settings.ledger_url)() as session:
        return session.scalar(select(func.count()).select_from(Run)) or 0


def test_a_dag_run_keeps_its_ledger_run_and_the_next_resumes_an_unfinished_one(
    settings: Settings, tmp_path: Path
) -> None:
    drop = sample_drop(tmp_path)
    ledger_run = intake_run_for(settings, drop, "eob_intake/first")
    assert ledger_run is not None
    assert intake_run_for(settings, drop, "eob_intake/first") == ledger_run
    # Another DAG run while that ledger run is unfinished (its DAG run failed) resumes it.
    assert intake_run_for(settings, drop, "eob_intake/second") == ledger_run
    runner.finish_run(settings, ledger_run)
    # Finished: its DAG runs still find it; a new DAG run waits for a new drop.
    assert intake_run_for(settings, drop, "eob_intake/second") == ledger_run
    assert intake_run_for(settings, drop, "eob_intake/third") is not None  # files still landed
    assert _runs(settings) == 2


def test_no_drop_no_run(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "landing"
    (empty / "acme").mkdir(parents=True)
    assert intake_run_for(settings, empty, "eob_intake/quiet") is None
    assert intake_run_for(settings, tmp_path / "missing", "eob_intake/quiet") is None
    assert _runs(settings) == 0


def test_only_complete_files_make_a_drop(tmp_path: Path) -> None:
    drop = sample_drop(tmp_path)
    assert has_complete_file(drop)
    for path in [p for p in drop.rglob("*") if p.is_file()]:
        path.rename(path.with_name(path.name + ".part"))  # still being uploaded
    assert not has_complete_file(drop)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_paused_routes_are_logged_by_sending_ip_only(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    with open_ledger(settings.ledger_url).begin() as session:
        for kind, provider, acknowledged in [
            ("bounce_rate_pause", "member-family-name.example", None),
            ("bounce_rate_pause", "example.net", None),
            ("bounce_rate_pause", "example.org", now),  # acknowledged: sending again
            ("bounce_rate_warn", "example.com", None),
        ]:
            session.add(DeliverabilityAlert(kind=kind, source_ip="127.0.0.2", provider=provider,
                                            count=9, rate=0.2, opened_at=now,
                                            acknowledged_at=acknowledged))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert log_paused_routes(settings) == 2
    [line] = caplog.messages
    assert "127.0.0.2" in line and "2 provider route(s) paused" in line
    assert "member-family-name" not in line and "example" not in line
