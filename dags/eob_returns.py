"""Airflow wiring of the returns loop and the analysts' datasets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import CronTriggerTimetable, chain, dag, task
from eob_common import AUDIT_EVENTS, DELIVERY_FACTS, default_args


@dag(
    dag_id="eob_returns",
    schedule=CronTriggerTimetable("*/15 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one reader of the return path at a time
    dagrun_timeout=timedelta(hours=1),
    default_args=default_args(execution_timeout=timedelta(minutes=45)),
    tags=["eob"],
)
def eob_returns() -> None:
    """
    ### EOB returns

    **Trigger:** every 15 minutes.

    **Does:** `returns` is one pass of the returns loop: collect bounces and complaints from
    the return path, reconcile them, plan approved resends (the next `eob_deliver` pass sends
    them). `datasets` then rewrites the analysts' parquet datasets from the ledger and updates
    the assets `eob_delivery_facts` and `eob_audit_events`: schedule a DAG on them to read
    fresh data. Both return counts only.
    """

    @task
    def returns() -> dict[str, int]:
        from pipeline.config import load_settings
        from pipeline.runner import returns as returns_pass

        return returns_pass(load_settings())

    @task(outlets=[DELIVERY_FACTS, AUDIT_EVENTS])
    def datasets() -> dict[str, int]:
        from pipeline.config import load_settings
        from pipeline.ops.dag_tasks import datasets_pass

        return datasets_pass(load_settings())

    chain(returns(), datasets())


eob_returns()
