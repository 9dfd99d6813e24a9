"""Parsing the DAG folder stays fast: the DAG files import `airflow.sdk` and the light
`pipeline.stages`, never the pipeline's heavy libraries (those load inside the tasks).

Measured in fresh interpreters (Airflow configures itself once, at import), each twice and
the faster kept: the machine running the tests is busy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("airflow") is None:
    pytest.skip("needs the optional airflow extra", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"
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


def _measure(what: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "EOB_"))}
    env.update(
        AIRFLOW_HOME=str(tmp_path),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        # As Airflow's dags-folder bundle does: the folder on sys.path, for eob_common.
        PYTHONPATH=os.pathsep.join([str(REPO), str(DAGS)]),
    )
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
