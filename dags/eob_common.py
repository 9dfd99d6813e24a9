"""What the EOB DAGs share: their assets, production defaults and failure callback.

No DAG here. Kept light: only `airflow.sdk` at module level, so parsing every DAG file stays
fast (the pipeline and its heavy libraries are imported inside the tasks).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset

log = logging.getLogger("eob.airflow")

# Updated when intake has planned a drop's messages: the deliver DAG runs at once.
PLAN = Asset(name="eob_plan", uri="eob://ledger/plan", group="eob")
# The analysts' datasets (parquet under EOB_DATA_DIR/datasets): their DAGs schedule on these.
DELIVERY_FACTS = Asset(name="eob_delivery_facts", uri="eob://datasets/delivery_facts", group="eob")
AUDIT_EVENTS = Asset(name="eob_audit_events", uri="eob://datasets/audit_events", group="eob")


def log_failure(context: Any) -> None:
    """Name the failed task by ids and error type only: the error's text stays in the task
    log (it names file, row and field, never a value)."""
    ti = context["ti"]
    error = context.get("exception")
    log.error(
        "EOB task failed: dag=%s task=%s run=%s try=%s error=%s",
        ti.dag_id,
        ti.task_id,
        ti.run_id,
        ti.try_number,
        type(error).__name__ if error is not None else "unknown",
    )


def default_args(execution_timeout: timedelta) -> dict[str, Any]:
    """Every task retries with exponential backoff (a database or SMTP hiccup passes; each
    step is idempotent, so a retry redoes nothing twice) and is killed past `execution_timeout`."""
    return {
        "owner": "eob",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": execution_timeout,
        "on_failure_callback": log_failure,
    }
