"""Airflow wiring for the EOB delivery pipeline; the logic lives in `pipeline.runner`.

Tasks hand each other only the ledger run id and counts through XCom, never PHI:
everything else stays in the ledger and under the data directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import Param, chain, dag, task

from pipeline import runner
from pipeline.config import load_settings


@dag(
    dag_id="eob_delivery",
    schedule=None,  # triggered by hand or by the API once a claims drop has landed
    catchup=False,
    max_active_runs=1,  # one batch at a time: runs share the landing folder and sending IPs
    params={
        "drop": Param(
            None,
            type=["null", "string"],
            description="Landing folder of the claims drop; unset means EOB_DATA_DIR/landing.",
        )
    },
    tags=["eob"],
)
def eob_delivery() -> None:
    """
    ### EOB delivery

    **Trigger:** manual only (UI, `airflow dags trigger eob_delivery`, or the REST API),
    after a claims drop has landed. Optional conf `{"drop": "/path/to/landing/folder"}`;
    without it the folder is `landing_dir` under `EOB_DATA_DIR`.

    **Produces:** one ledger run that ingests and validates the drop, builds and renders
    each member's EOB PDF, sends it by TLS email, processes bounces, reconciles, and writes
    the run's datasets. Task results in XCom are counts only (no PHI); `finish_run`
    returns the run summary (e.g. messages accepted).

    Configuration comes from `EOB_*` environment variables (see `pipeline.config`).
    """

    @task
    def start_run(params: dict[str, Any] | None = None) -> str:
        settings = load_settings()  # read per task: workers get their own environment
        drop = (params or {}).get("drop") or settings.landing_dir
        return runner.start_run(settings, Path(drop))

    # "ledger_run", not "run_id": Airflow reserves run_id for its own context variable.
    @task
    def stage(ledger_run: str, stage_name: str) -> dict[str, int]:
        return runner.run_stage(load_settings(), ledger_run, stage_name)

    @task
    def finish_run(ledger_run: str) -> dict[str, int]:
        return runner.finish_run(load_settings(), ledger_run)

    # start_run -> ingest -> validate -> ... -> datasets -> finish_run, strictly in order.
    ledger_run = start_run()
    stages = [stage.override(task_id=name)(ledger_run, name) for name in runner.STAGES]
    chain(ledger_run, *stages, finish_run(ledger_run))


eob_delivery()
