"""What `eob runs` shows: each run's last completed stage and the work it left pending."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from pipeline.records.ledger.models import InputFile, Message, Run, RunStage, Statement
from pipeline.records.ledger.states import MessageState
from pipeline.stages import STAGES, stages_left


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    drop: str
    started_at: datetime
    finished_at: datetime | None
    last_stage: str | None
    # Counts and stage names only ("files registered, not validated: 4"), never a record value.
    pending: tuple[str, ...]


def run_statuses(session: Session, limit: int) -> list[RunStatus]:
    """The newest `limit` runs, newest first."""
    runs = session.scalars(select(Run).order_by(Run.started_at.desc()).limit(limit)).all()
    ids = [run.run_id for run in runs]
    planned: dict[str, set[str]] = defaultdict(set)
    completed: dict[str, set[str]] = defaultdict(set)
    for stage in session.scalars(select(RunStage).where(RunStage.run_id.in_(ids))):
        planned[stage.run_id].add(stage.stage)
        if stage.completed_at is not None:
            completed[stage.run_id].add(stage.stage)
    pending: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        if run.finished_at is None:
            left = stages_left(planned[run.run_id], completed[run.run_id])
            pending[run.run_id].append(f"stages left: {', '.join(left) or 'none'}")
    for what, query in _pending_counts(ids):
        for run_id, count in session.execute(query):
            pending[run_id].append(f"{what}: {count}")
    return [
        RunStatus(
            run_id=run.run_id,
            drop=run.drop,
            started_at=run.started_at,
            finished_at=run.finished_at,
            last_stage=max(completed[run.run_id], key=STAGES.index, default=None),
            pending=tuple(pending[run.run_id]),
        )
        for run in runs
    ]


def _pending_counts(ids: list[str]) -> list[tuple[str, Select[str, int]]]:
    now = datetime.now(UTC)
    due = and_(
        or_(Message.send_day.is_(None), Message.send_day <= now.date()),
        or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now),
    )
    waiting = Message.state.in_((MessageState.PLANNED, MessageState.DEFERRED))
    sending = Message.state == MessageState.SENDING
    registered = InputFile.status == "registered"

    def per_run(
        run_id: InstrumentedAttribute[str], *where: ColumnElement[bool]
    ) -> Select[str, int]:
        return select(run_id, func.count()).where(run_id.in_(ids), *where).group_by(run_id)

    return [
        ("files registered, not validated", per_run(InputFile.run_id, registered)),
        ("statements without PDF", per_run(Statement.run_id, Statement.pdf_path.is_(None))),
        ("messages not yet due", per_run(Message.run_id, waiting, ~due)),
        ("messages due, not sent", per_run(Message.run_id, waiting, due)),
        ("messages sending, outcome unknown", per_run(Message.run_id, sending)),
    ]  # fmt: skip
