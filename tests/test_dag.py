"""The Airflow DAG: it parses, its tasks are in pipeline order, and a dag.test() run delivers.

Airflow reads its configuration (AIRFLOW_HOME, metadata DB) once, at import. So a small
driver script parses the DAG and runs it once, in a fresh interpreter with a temporary
AIRFLOW_HOME and SQLite metadata DB (nothing leaks into ~/airflow), and the tests read its
result. Parsing costs ~10 s and the run ~10-15 s, so they share one driver run.
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
DAG_ID = "eob_delivery"
STAGES = [
    "ingest",
    "validate",
    "statements",
    "render",
    "plan",
    "resends",
    "send",
    "bounces",
    "reconcile",
    "datasets",
]

# Runs inside the fresh interpreter; prints one "RESULT <json>" line for the test to read.
# Airflow 3.3 facts it relies on: DagBag moved to airflow.dag_processing.dagbag; dag.test()
# needs a migrated metadata DB (db.upgradedb is what `airflow db migrate` runs) and syncs
# the dags-folder bundle, so AIRFLOW__CORE__DAGS_FOLDER must be the repo's dags/.
_DRIVER = r"""
import json, sys, time

started = time.monotonic()
from airflow.dag_processing.dagbag import DagBag

dags_folder, dag_id, drop = sys.argv[1:4]
bag = DagBag(dag_folder=dags_folder)
dag = bag.dags.get(dag_id)
out = {
    "import_errors": bag.import_errors,
    "task_ids": [t.task_id for t in dag.topological_sort()] if dag else None,
    "parse_seconds": round(time.monotonic() - started, 1),
}
if dag is not None:
    from airflow.models.xcom import XComModel
    from airflow.utils.db import upgradedb
    from airflow.utils.session import create_session
    from pipeline.config import load_settings
    from pipeline.ops.sink import start_sink

    upgradedb()
    settings = load_settings()  # the same EOB_* environment the tasks read
    started = time.monotonic()
    with start_sink(settings.smtp_host, settings.smtp_port, settings.data_dir):
        run = dag.test(run_conf={"drop": drop})
    out["run_seconds"] = round(time.monotonic() - started, 1)
    with create_session() as session:
        out["state"] = str(run.state)
        tis = run.get_task_instances(session=session)
        out["task_states"] = {ti.task_id: str(ti.state) for ti in tis}
        query = XComModel.get_many(run_id=run.run_id, dag_ids=dag.dag_id, key="return_value")
        xcoms = session.scalars(query)
        out["xcom"] = {x.task_id: XComModel.deserialize_value(x) for x in xcoms}
print("RESULT " + json.dumps(out, default=str))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dag")
    home = tmp / "airflow_home"
    home.mkdir()
    # The bundled sample drop, copied: the run must not touch files in the repository.
    drop = shutil.copytree(REPO / "data_samples" / "landing", tmp / "drop")
    # Start from a clean environment: no outside AIRFLOW__/EOB_ setting may steer the run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EOB_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        PYTHONPATH=str(REPO),  # `pipeline` importable by the DAG file and the tasks
        EOB_DATA_DIR=str(tmp / "eob"),
        EOB_SMTP_HOST="127.0.0.1",
        EOB_SMTP_PORT=str(_free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(DAGS), DAG_ID, str(drop)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_dag_parses_with_tasks_in_pipeline_order(driven: dict) -> None:
    print(f"DAG parse (incl. Airflow import): {driven['parse_seconds']} s")
    assert driven["import_errors"] == {}
    assert driven["task_ids"] == ["start_run", *STAGES, "finish_run"]


def test_dag_test_run_delivers_end_to_end(driven: dict) -> None:
    print(f"dag.test() run: {driven['run_seconds']} s, summary {driven['xcom'].get('finish_run')}")
    assert driven["state"] == "success", driven["task_states"]
    xcom = driven["xcom"]
    # Only ids and counts cross XCom: a run id string, then flat {name: int} dicts.
    assert isinstance(xcom["start_run"], str)
    for task_id in [*STAGES, "finish_run"]:
        assert all(isinstance(v, int) for v in xcom[task_id].values()), task_id
    assert xcom["finish_run"]["messages_accepted"] > 0
