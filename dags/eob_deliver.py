"""Airflow wiring of the deliver loop: a pass every 5 minutes and whenever intake planned."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, chain, dag, task
from eob_common import PLAN, default_args


@dag(
    dag_id="eob_deliver",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("*/5 * * * *", timezone="UTC"), assets=[PLAN]
    ),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # one pass at a time: passes share sending IPs and their rate limits
    dagrun_timeout=timedelta(hours=1),
    default_args=default_args(execution_timeout=timedelta(minutes=45)),
    tags=["eob"],
)
def eob_deliver() -> None:
    """
    ### EOB deliver

    **Trigger:** every 5 minutes, and at once when `eob_intake` updates the asset `eob_plan`.

    **Does:** `paused_routes` logs each sending IP with routes paused by a bounce-rate alert
    (their messages wait until the alert is acknowledged in the console; recipient domains
    are not logged) and returns how many. `send` is one pass of the deliver loop: every
    message due now, whatever run planned it; it returns counts per outcome. A retried or
    cleared pass sends nothing twice (the ledger claims each message before sending).
    """

    @task
    def paused_routes() -> int:
        from pipeline.config import load_settings
        from pipeline.ops.dag_tasks import log_paused_routes

        return log_paused_routes(load_settings())

    @task
    def send() -> dict[str, int]:
        from pipeline.config import load_settings
        from pipeline.runner import deliver

        return deliver(load_settings())

    chain(paused_routes(), send())


eob_deliver()
