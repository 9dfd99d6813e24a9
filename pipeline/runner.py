"""A run's start, stages, resume, finish and summary, and the due-work passes; nothing else.

A run records the stages it is to do and each one it completed (`run_stages`), so a crashed
run is resumed, not forgotten. Each command checks what its stages need first (preflight).
Each stage family binds its own steps to the ledger (`intake.steps`, `documents.steps`, …);
every step is idempotent for its run: a rerun does no duplicate work and sends nothing twice.
Steps return counts only (safe for logs and Airflow XComs: no PHI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pipeline.config import Settings
from pipeline.delivery.steps import plan_messages, send_due
from pipeline.documents.steps import build_run_statements, render_pdfs
from pipeline.errors import RunRefused, UnknownRun
from pipeline.intake.steps import ingest_files, validate_files
from pipeline.preflight import preflight
from pipeline.records.datasets import write_datasets
from pipeline.records.ledger import audit
from pipeline.records.ledger.models import (
    InputFile,
    Message,
    ResendCase,
    Run,
    RunStage,
    Statement,
    StateTransition,
)
from pipeline.records.ledger.states import MessageState
from pipeline.records.run_context import (
    LedgerContext,
    RunContext,
    Track,
    ledger_sessions,
    no_progress,
)
from pipeline.returns.steps import collect_bounces, plan_resends, reconcile_bounces
from pipeline.stages import INTAKE_STAGES, STAGE_NOTE, STAGES, stages_left

log = logging.getLogger(__name__)

_STEPS: dict[str, Callable[[RunContext], dict[str, int]]] = {
    "ingest": ingest_files,
    "validate": validate_files,
    "statements": build_run_statements,
    "render": render_pdfs,
    "plan": plan_messages,
    "resends": plan_resends,
    "send": send_due,
    "bounces": collect_bounces,
    "reconcile": reconcile_bounces,
    "datasets": write_datasets,
}
assert tuple(_STEPS) == STAGES, "pipeline.stages names every step, in order"
# The due-work loops, not scoped to a run: each pass picks up what is due from every run.
LoopStep = tuple[str, Callable[[LedgerContext], dict[str, int]]]
DELIVER_STEPS: tuple[LoopStep, ...] = (("send", send_due),)
RETURNS_STEPS: tuple[LoopStep, ...] = (
    ("bounces", collect_bounces),
    ("reconcile", reconcile_bounces),
    ("resends", plan_resends),
)
Context = TypeVar("Context", bound=LedgerContext)


def start_run(settings: Settings, drop: Path, stages: Sequence[str] = STAGES) -> str:
    """A new run of `drop` that is to do `stages` (recorded, so a crash can be resumed)."""
    run_id = datetime.now(UTC).strftime("r%Y%m%dT%H%M%S") + uuid4().hex[:6]
    with ledger_sessions(settings.ledger_url).begin() as session:
        session.add(Run(run_id=run_id, started_at=datetime.now(UTC), drop=str(drop.resolve())))
        session.add_all(RunStage(run_id=run_id, stage=stage) for stage in stages)
        audit(session, "run_started", "run", run_id, actor="runner")
    log.info("run %s started", run_id)
    return run_id


def run_stage(
    settings: Settings, run_id: str, stage: str, track: Track[object] = no_progress
) -> dict[str, int]:
    sessions = ledger_sessions(settings.ledger_url)
    with sessions() as session:
        if session.get(Run, run_id) is None:
            raise UnknownRun(run_id)
    context = RunContext(settings, sessions, track=track, run_id=run_id)
    counts = _step(stage, _STEPS[stage], context)
    with sessions.begin() as session:
        done = session.get(RunStage, (run_id, stage)) or RunStage(run_id=run_id, stage=stage)
        done.completed_at = datetime.now(UTC)
        session.add(done)
    log.info("run %s %s: %s", run_id, stage, counts)
    return counts


def _step(
    stage: str, step: Callable[[Context], dict[str, int]], context: Context
) -> dict[str, int]:
    try:
        return step(context)
    except Exception as err:
        # The type is kept (callers and Airflow see the real error); the note names the stage.
        err.add_note(STAGE_NOTE + stage)
        raise


def finish_run(settings: Settings, run_id: str) -> dict[str, int]:
    with ledger_sessions(settings.ledger_url).begin() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise UnknownRun(run_id)
        run.finished_at = datetime.now(UTC)
        audit(session, "run_finished", "run", run_id, actor="runner")
        return run_summary(session, run_id)


def run_all(
    settings: Settings, drop: Path, track: Track[object] = no_progress
) -> tuple[str, dict[str, int]]:
    """Every stage once on `drop`: the demo, and small installations without the loops."""
    preflight(settings, STAGES, drop)
    return _run(settings, _new_run(settings, drop, STAGES), STAGES, track)


def intake(
    settings: Settings, drop: Path, track: Track[object] = no_progress
) -> tuple[str, dict[str, int]]:
    """One drop from its files to planned messages; the deliver loop sends them."""
    preflight(settings, INTAKE_STAGES, drop)
    return _run(settings, _new_run(settings, drop, INTAKE_STAGES), INTAKE_STAGES, track)


def resume(
    settings: Settings, run_id: str, track: Track[object] = no_progress
) -> tuple[str, dict[str, int]]:
    """Finish an unfinished run: the stages after its last completed one (steps are idempotent,
    so redoing the one a crash interrupted is safe)."""
    stages, drop = _stages_to_resume(settings, run_id)
    preflight(settings, stages, drop)
    return _run(settings, run_id, stages, track)


def _stages_to_resume(settings: Settings, run_id: str) -> tuple[tuple[str, ...], Path]:
    with ledger_sessions(settings.ledger_url)() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise UnknownRun(run_id)
        if run.finished_at is not None:
            raise RunRefused(f"run {run_id} is finished: nothing to resume")
        rows = session.scalars(select(RunStage).where(RunStage.run_id == run_id)).all()
    completed = {row.stage for row in rows if row.completed_at is not None}
    return stages_left({row.stage for row in rows}, completed), Path(run.drop)


def unfinished_run(session: Session, drop: Path) -> str | None:
    """The oldest unfinished run of the drop folder `drop`, if any."""
    return session.scalars(
        select(Run.run_id)
        .where(Run.drop.in_({str(drop), str(drop.resolve())}), Run.finished_at.is_(None))
        .order_by(Run.started_at)
    ).first()


def _new_run(settings: Settings, drop: Path, stages: Sequence[str]) -> str:
    """Start a run of `drop`, refused while an earlier run of the same folder is unfinished
    (its files may be half taken in: `eob resume` finishes it first)."""
    with ledger_sessions(settings.ledger_url)() as session:
        unfinished = unfinished_run(session, drop)
    if unfinished is not None:
        raise RunRefused(
            f"run {unfinished} of this drop folder is unfinished: "
            f"`eob resume {unfinished}` finishes it"
        )
    return start_run(settings, drop, stages)


def _run(
    settings: Settings, run_id: str, stages: Sequence[str], track: Track[object]
) -> tuple[str, dict[str, int]]:
    for stage in stages:
        run_stage(settings, run_id, stage, track)
    return run_id, finish_run(settings, run_id)


def run_summary(session: Session, run_id: str) -> dict[str, int]:
    files = session.scalars(select(InputFile).where(InputFile.run_id == run_id)).all()
    messages = select(Message.message_id).where(Message.run_id == run_id)
    accepted = session.scalar(
        select(func.count(func.distinct(StateTransition.entity_id))).where(
            StateTransition.entity_kind == "message",
            StateTransition.to_state == MessageState.ACCEPTED,
            StateTransition.entity_id.in_(messages),
        )
    )
    return {
        "files": len(files),
        "files_rejected": sum(f.status == "rejected" for f in files),
        "claim_lines_accepted": sum(f.rows_accepted or 0 for f in files),
        "claim_lines_quarantined": sum(f.rows_quarantined or 0 for f in files),
        "statements": _count(session, select(Statement).where(Statement.run_id == run_id)),
        "pdfs": _count(
            session,
            select(Statement).where(Statement.run_id == run_id, Statement.pdf_path.is_not(None)),
        ),
        "messages_accepted": accepted or 0,
        "messages_bounced": _count(
            session,
            select(Message).where(Message.run_id == run_id, Message.state == MessageState.BOUNCED),
        ),
        "resend_cases_opened": _count(
            session, select(ResendCase).where(ResendCase.message_id.in_(messages))
        ),
    }


def _count(session: Session, query: Select[Any]) -> int:
    return session.scalar(select(func.count()).select_from(query.subquery())) or 0


def deliver(settings: Settings, track: Track[object] = no_progress) -> dict[str, int]:
    """One pass of the deliver loop: every message that is due now, whatever run made it."""
    return _loop_pass(settings, "deliver", DELIVER_STEPS, track)


def returns(settings: Settings, track: Track[object] = no_progress) -> dict[str, int]:
    """One pass of the returns loop: collect the return path, reconcile, plan approved resends."""
    return _loop_pass(settings, "returns", RETURNS_STEPS, track)


def _loop_pass(
    settings: Settings,
    name: str,
    steps: tuple[LoopStep, ...],
    track: Track[object],
) -> dict[str, int]:
    preflight(settings, [stage for stage, _ in steps])
    context = LedgerContext(settings, ledger_sessions(settings.ledger_url), track=track)
    counts: dict[str, int] = {}
    for stage, step in steps:
        counts |= _step(stage, step, context)
    log.info("%s pass: %s", name, counts)
    return counts
