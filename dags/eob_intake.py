"""Airflow wiring of intake: one DAG run per claims drop, from its files to planned messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Param, PokeReturnValue, chain, dag, get_current_context, task
from eob_common import PLAN, default_args

from pipeline.stages import INTAKE_STAGES  # names only: the stages load inside the tasks


@dag(
    dag_id="eob_intake",
    # A new DAG run as soon as the last one ended; it waits (sensor) for a drop to take in.
    schedule="@continuous",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # @continuous needs it; drops are taken in one at a time
    dagrun_timeout=timedelta(hours=30),  # the sensor's 6 h wait plus a large drop's stages
    default_args=default_args(execution_timeout=timedelta(hours=3)),
    params={
        "drop": Param(
            None,
            type=["null", "string"],
            description="Landing folder of the claims drop; unset means EOB_DATA_DIR/landing.",
        )
    },
    tags=["eob"],
)
def eob_intake() -> None:
    """
    ### EOB intake

    **Trigger:** continuous: one DAG run at a time. Its first task, `wait_for_drop`, is a
    sensor in *reschedule* mode: once a minute it lists the landing folder (no hashing) for a
    file the insurer's drop protocol calls complete, and frees its worker slot in between.
    After 6 h without a drop it is skipped and the next DAG run waits instead. So each DAG run
    takes in one drop, and no triggerer is needed (an asset watcher would need one and a
    custom trigger). A manual trigger may name another folder: conf `{"drop": "/path"}`.

    **Does:** `ingest` → `validate` → `statements` → `render` → `plan` → `finish_run`, each
    one runner stage of one ledger run; `plan` updates the asset `eob_plan`, which starts
    `eob_deliver`. `render` is one task for now (a task per shard needs a render-shard entry
    point in the runner).

    **Clearing is safe:** the ledger run is paired with this DAG run (audit event
    `dag_run_paired`). Clearing any task or the whole DAG run finds the same ledger run and
    runs only the stages it has not completed; an unfinished run of the drop (a crash, a
    failed DAG run) is resumed by the next DAG run, never replaced by a new one.

    XComs: the ledger run id and counts, never PHI.
    """

    @task.sensor(
        mode="reschedule",
        poke_interval=timedelta(minutes=1),
        timeout=timedelta(hours=6),
        soft_fail=True,  # a quiet day skips the run; an error in a poke still fails it
        execution_timeout=timedelta(minutes=10),  # per poke, in reschedule mode
    )
    def wait_for_drop(params: dict[str, Any] | None = None) -> PokeReturnValue:
        from pipeline.config import load_settings
        from pipeline.ops.dag_tasks import intake_run_for

        settings = load_settings()  # read per task: workers get their own environment
        drop = Path((params or {}).get("drop") or settings.landing_dir)
        ti = get_current_context()["ti"]
        ledger_run = intake_run_for(settings, drop, f"{ti.dag_id}/{ti.run_id}")
        return PokeReturnValue(is_done=ledger_run is not None, xcom_value=ledger_run)

    # "ledger_run", not "run_id": Airflow reserves run_id for its own context variable.
    @task
    def stage(ledger_run: str, stage_name: str) -> dict[str, int]:
        from pipeline.config import load_settings
        from pipeline.ops.dag_tasks import stage_once

        return stage_once(load_settings(), ledger_run, stage_name)

    @task
    def finish_run(ledger_run: str) -> dict[str, int]:
        from pipeline.config import load_settings
        from pipeline.ops.dag_tasks import finish_once

        return finish_once(load_settings(), ledger_run)

    ledger_run = wait_for_drop()
    stages = [
        stage.override(task_id=name, outlets=[PLAN] if name == "plan" else [])(ledger_run, name)
        for name in INTAKE_STAGES
    ]
    chain(ledger_run, *stages, finish_run(ledger_run))


eob_intake()
