"""The names and order of a run's stages, apart from their code: the `eob` command builds one
subcommand per stage from these without importing the stages (pandas, pyarrow, SQLAlchemy)."""

from __future__ import annotations

# `eob run DROP` (and the Airflow DAG): every stage once, in this order.
STAGES = (
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
)
# `eob intake DROP`: a run of one drop, up to planned messages.
INTAKE_STAGES = ("ingest", "validate", "statements", "render", "plan")
