"""The Airflow DAGs: they parse with production defaults on every task, and dag.test() runs
intake, deliver and returns on the sample drop against the demo TLS sink; re-running the
intake DAG run resumes its ledger run instead of starting another.

Airflow reads its configuration (AIRFLOW_HOME, metadata DB) once, at import. So a small
driver script parses the DAGs and runs them, in a fresh interpreter with a temporary
AIRFLOW_HOME and SQLite metadata DB (nothing leaks into ~/airflow), and the tests read its
result. Parsing and the runs take about 20 s, so the tests share one driver run; the
import-time test measures `import airflow.sdk` alone and with the DAG folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Skip without the optional `airflow` extra. find_spec, not importorskip: importing airflow
# here would configure it from ~/airflow in this process and cost seconds for nothing.
if importlib.util.find_spec("airflow") is None:
    pytest.skip("needs the optional airflow extra", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"
INTAKE_TASKS = ["wait_for_drop", "ingest", "validate", "statements", "render", "plan"]

# Parsing stays fast: the DAG files import `airflow.sdk` and the light `pipeline.stages`, never
# the pipeline's heavy libraries (those load inside the tasks). Measured in fresh interpreters,
# each twice and the faster kept: the machine running the tests is busy.
HEAVY = ["pandas", "pyarrow", "great_expectations", "reportlab", "duckdb", "pipeline.runner"]

# argv: "sdk" imports airflow.sdk alone; "dags" then imports every module of the DAG folder.
_MEASURE = r"""
import importlib, json, sys, time
from pathlib import Path

started = time.perf_counter()
import airflow.sdk

if sys.argv[1] == "dags":
    for path in sorted(Path(sys.argv[2]).glob("*.py")):
        importlib.import_module(path.stem)
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": seconds, "modules": list(sys.modules)}))
"""


# Runs inside the fresh interpreter; prints one "RESULT <json>" line for the test to read.
# Airflow 3.3 facts it relies on: the dags-folder bundle's DagBag (BundleDagBag) puts the
# folder on sys.path, as the dag-processor and task runner do (eob_common is imported from
# there); dag.test() needs a migrated metadata DB (db.upgradedb is what `airflow db migrate`
# runs); a second dag.test() on the same logical date and run_after replaces the DAG run: the same
# run id, its task instances and XComs gone: a re-run of the whole DAG run.
_DRIVER = r"""
import json, shutil, sys, time
from datetime import UTC, datetime
from pathlib import Path

started = time.monotonic()
from airflow.dag_processing.dagbag import BundleDagBag

dags_folder, drop, sample = sys.argv[1:4]
bag = BundleDagBag(dag_folder=dags_folder, bundle_path=dags_folder, bundle_name="dags-folder")
out = {"import_errors": bag.import_errors, "parse_seconds": round(time.monotonic() - started, 1)}


def schedule(timetable):
    inner = getattr(timetable, "timetable", timetable)
    described = {"type": type(timetable).__name__, "cron": getattr(inner, "expression", None)}
    if getattr(timetable, "asset_condition", None) is not None:
        described["assets"] = sorted(a.name for a in timetable.asset_condition.objects)
    return described


out["dags"] = {
    dag.dag_id: {
        "tasks": [t.task_id for t in dag.topological_sort()],
        "schedule": schedule(dag.timetable),
        "max_active_runs": dag.max_active_runs,
        "dagrun_timeout": dag.dagrun_timeout and dag.dagrun_timeout.total_seconds(),
        "task_defaults": {
            t.task_id: {
                "retries": t.retries,
                "backoff": t.retry_exponential_backoff,
                "execution_timeout": t.execution_timeout and t.execution_timeout.total_seconds(),
                "on_failure": [c.__name__ for c in t.on_failure_callback or []],
            }
            for t in dag.tasks
        },
        "outlets": {t.task_id: [a.name for a in t.outlets] for t in dag.tasks if t.outlets},
    }
    for dag in bag.dags.values()
}


def failure_log():
    # The failure callback with a fake context: what it logs of an error carrying a value.
    import logging
    from types import SimpleNamespace

    from eob_common import log_failure  # on sys.path: the bundle's folder

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("eob.airflow").addHandler(handler)
    ti = SimpleNamespace(dag_id="eob_intake", task_id="render", run_id="manual__x", try_number=2)
    log_failure({"ti": ti, "exception": ValueError("member SECRET-VALUE-42")})
    return [record.getMessage() for record in records]


out["failure_log"] = failure_log()

if not bag.import_errors:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.xcom import XComModel
    from airflow.utils.db import upgradedb
    from airflow.utils.session import create_session
    from sqlalchemy import func, select
    from pipeline.config import load_settings
    from pipeline.ops.runs import run_statuses
    from pipeline.ops.sink import start_sink
    from pipeline.records.run_context import ledger_sessions

    upgradedb()
    settings = load_settings()  # the same EOB_* environment the tasks read

    def run(dag_id, **kwargs):
        started = time.monotonic()
        dag_run = bag.dags[dag_id].test(**kwargs)
        with create_session() as session:
            query = XComModel.get_many(
                run_id=dag_run.run_id, dag_ids=dag_id, key="return_value"
            )
            return {
                "seconds": round(time.monotonic() - started, 1),
                "run_id": dag_run.run_id,
                "state": str(dag_run.state),
                "task_states": {
                    ti.task_id: str(ti.state)
                    for ti in dag_run.get_task_instances(session=session)
                },
                "xcom": {
                    x.task_id: XComModel.deserialize_value(x) for x in session.scalars(query)
                },
            }

    def ledger_runs():
        with ledger_sessions(settings.ledger_url)() as session:
            return [
                {"run_id": r.run_id, "finished": r.finished_at is not None, "last": r.last_stage}
                for r in run_statuses(session, 10)
            ]

    # One logical date and run_after: each dag.test() on them re-runs the same intake DAG run.
    when = datetime(2026, 1, 1, tzinfo=UTC)  # the run id is made from run_after
    intake = {"logical_date": when, "run_after": when, "run_conf": {"drop": drop}}
    with start_sink(settings.smtp_host, settings.smtp_port, settings.data_dir):
        # A first try that stops after `statements` (the rest marked done without running),
        # as a worker lost mid-run leaves it: the ledger run is unfinished.
        later = "^(render|plan|finish_run)$"
        out["intake_first"] = run("eob_intake", mark_success_pattern=later, **intake)
        out["ledger_after_first"] = ledger_runs()
        out["intake_rerun"] = run("eob_intake", **intake)
        out["deliver"] = run("eob_deliver")
        out["returns"] = run("eob_returns")
        # Cleared once more after it finished, a new drop landed meanwhile: still the same
        # ledger run, which does not take the new drop in (the next DAG run will).
        shutil.copytree(sample, drop, dirs_exist_ok=True)
        out["intake_rerun_finished"] = run("eob_intake", **intake)
        out["landing_files"] = sum(p.is_file() for p in Path(drop).rglob("*"))
    out["ledger"] = ledger_runs()
    with create_session() as session:
        out["asset_events"] = dict(
            session.execute(
                select(AssetModel.name, func.count(AssetEvent.id))
                .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
                .group_by(AssetModel.name)
            ).all()
        )
print("RESULT " + json.dumps(out, default=str))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _airflow_env(home: Path, **settings: str) -> dict[str, str]:
    # A clean environment: no outside AIRFLOW__/EOB_ setting may steer the interpreter.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EOB_"))}
    return env | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO),  # `pipeline` importable by the DAG files and the tasks
        **settings,
    }


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dag")
    home = tmp / "airflow_home"
    home.mkdir()
    # The bundled sample drop, copied: the run must not touch files in the repository.
    sample = REPO / "data_samples" / "landing"
    drop = shutil.copytree(sample, tmp / "drop")
    env = _airflow_env(
        home,
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        EOB_DATA_DIR=str(tmp / "eob"),
        EOB_SMTP_HOST="127.0.0.1",
        EOB_SMTP_PORT=str(_free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(DAGS), str(drop), str(sample)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a sensor waiting for a drop that never comes fails here
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_dags_parse_with_their_tasks_and_schedules(driven: dict) -> None:
    print(f"DAG parse (incl. Airflow import): {driven['parse_seconds']} s")
    assert driven["import_errors"] == {}
    dags = driven["dags"]
    assert sorted(dags) == ["eob_deliver", "eob_intake", "eob_returns"]
    assert dags["eob_intake"]["tasks"] == [*INTAKE_TASKS, "finish_run"]
    assert dags["eob_intake"]["schedule"]["type"] == "ContinuousTimetable"
    assert dags["eob_intake"]["outlets"] == {"plan": ["eob_plan"]}
    assert dags["eob_deliver"]["tasks"] == ["paused_routes", "send"]
    assert dags["eob_deliver"]["schedule"] == {
        "type": "AssetOrTimeSchedule",
        "cron": "*/5 * * * *",
        "assets": ["eob_plan"],
    }
    assert dags["eob_returns"]["tasks"] == ["returns", "datasets"]
    assert dags["eob_returns"]["schedule"]["cron"] == "*/15 * * * *"
    assert dags["eob_returns"]["outlets"] == {
        "datasets": ["eob_delivery_facts", "eob_audit_events"]
    }


def test_every_task_retries_with_backoff_and_times_out(driven: dict) -> None:
    for dag_id, dag in driven["dags"].items():
        assert dag["max_active_runs"] == 1, dag_id
        assert dag["dagrun_timeout"], dag_id
        for task_id, defaults in dag["task_defaults"].items():
            where = f"{dag_id}.{task_id}"
            assert defaults["retries"] >= 2, where
            assert defaults["backoff"] >= 2.0, where
            assert 0 < defaults["execution_timeout"] <= dag["dagrun_timeout"], where
            assert defaults["on_failure"] == ["log_failure"], where


def _ids_and_counts_only(xcom: dict) -> None:
    # A ledger run id, a count, or flat {name: count}: never a record value.
    for task_id, value in xcom.items():
        if isinstance(value, dict):
            assert all(isinstance(v, int) for v in value.values()), task_id
        else:
            assert isinstance(value, str | int), task_id


def test_intake_rerun_resumes_the_same_ledger_run(driven: dict) -> None:
    first, rerun, again = (
        driven["intake_first"],
        driven["intake_rerun"],
        driven["intake_rerun_finished"],
    )
    print(f"intake: {first['seconds']} s, re-run {rerun['seconds']} s, {again['seconds']} s")
    assert first["state"] == "success", first["task_states"]
    [unfinished] = driven["ledger_after_first"]
    assert (unfinished["finished"], unfinished["last"]) == (False, "statements")
    assert rerun["run_id"] == first["run_id"]  # the same DAG run, run again
    assert rerun["state"] == "success", rerun["task_states"]
    ledger_run = unfinished["run_id"]
    assert rerun["xcom"]["wait_for_drop"] == ledger_run
    # Completed stages are not redone; the rest are, and the run finishes.
    assert rerun["xcom"]["ingest"] == {} and rerun["xcom"]["statements"] == {}
    assert rerun["xcom"]["render"] and rerun["xcom"]["plan"]
    assert rerun["xcom"]["finish_run"]["statements"] > 0
    assert again["state"] == "success", again["task_states"]
    assert again["xcom"]["wait_for_drop"] == ledger_run
    # The same summary, with the messages eob_deliver sent in between.
    sent = driven["deliver"]["xcom"]["send"]["accepted"]
    assert again["xcom"]["finish_run"] == rerun["xcom"]["finish_run"] | {"messages_accepted": sent}
    assert driven["ledger"] == [{"run_id": ledger_run, "finished": True, "last": "plan"}]
    assert again["xcom"]["ingest"] == {}
    assert driven["landing_files"] > 0  # the later drop waits for the next DAG run
    for result in (first, rerun, again):
        _ids_and_counts_only(result["xcom"])


def test_deliver_then_returns_send_and_publish_datasets(driven: dict) -> None:
    deliver, returns = driven["deliver"], driven["returns"]
    print(f"deliver {deliver['seconds']} s: {deliver['xcom']}; returns {returns['seconds']} s")
    assert deliver["state"] == "success", deliver["task_states"]
    assert deliver["xcom"]["paused_routes"] == 0
    assert deliver["xcom"]["send"]["accepted"] == driven["intake_rerun"]["xcom"]["plan"]["planned"]
    assert returns["state"] == "success", returns["task_states"]
    assert returns["xcom"]["datasets"]["delivery_facts"] > 0
    _ids_and_counts_only(deliver["xcom"])
    _ids_and_counts_only(returns["xcom"])
    # The plan asset was updated once (the re-run that planned), the datasets once each.
    events = driven["asset_events"]
    assert events["eob_delivery_facts"] == events["eob_audit_events"] == 1
    assert events["eob_plan"] >= 1


def test_failure_callback_logs_ids_only(driven: dict) -> None:
    [line] = driven["failure_log"]
    assert "eob_intake" in line and "render" in line and "manual__x" in line, line
    assert "ValueError" in line and "SECRET-VALUE-42" not in line, line


def _measure(what: str, tmp_path: Path) -> dict:
    # As Airflow's dags-folder bundle does: the folder on sys.path, for eob_common.
    env = _airflow_env(tmp_path, PYTHONPATH=os.pathsep.join([str(REPO), str(DAGS)]))
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE, what, str(DAGS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        runs.append(json.loads(line.removeprefix("RESULT ")))
    return min(runs, key=lambda run: run["seconds"])


def test_dag_folder_imports_within_a_second_of_airflow_sdk(tmp_path: Path) -> None:
    sdk = _measure("sdk", tmp_path)
    dags = _measure("dags", tmp_path)
    extra = dags["seconds"] - sdk["seconds"]
    print(f"import airflow.sdk: {sdk['seconds']:.2f} s; + DAG folder: {dags['seconds']:.2f} s")
    assert {"eob_intake", "eob_deliver", "eob_returns"} <= set(dags["modules"])
    assert [m for m in HEAVY if m in dags["modules"]] == []
    assert extra < 1.0, f"the DAG folder adds {extra:.2f} s to importing airflow.sdk"
