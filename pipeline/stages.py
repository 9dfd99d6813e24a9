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
# Added to an error that escaped a stage's step, so the command line can name the stage.
STAGE_NOTE = "eob stage: "


def failed_stage(err: BaseException) -> str | None:
    """The stage an error escaped from, if it came out of a step."""
    notes = getattr(err, "__notes__", [])
    return next((n.removeprefix(STAGE_NOTE) for n in notes if n.startswith(STAGE_NOTE)), None)


def stages_left(planned: set[str], completed: set[str]) -> tuple[str, ...]:
    """What resuming a run does: its planned stages after the last completed one (a run from
    before stages were recorded planned every stage)."""
    after = max((STAGES.index(stage) for stage in completed), default=-1)
    return tuple(stage for stage in STAGES[after + 1 :] if stage in (planned or set(STAGES)))
