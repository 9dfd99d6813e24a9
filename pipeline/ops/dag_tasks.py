"""What the Airflow DAGs call besides the runner, so the DAG files stay wiring (no Airflow here).

An intake DAG run drives one ledger run, paired with it by an audit event: clearing any of
its tasks, or the whole DAG run, finds the same ledger run and does only the stages it has not
completed (as `eob resume` does), never a new, empty run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from pipeline import runner
from pipeline.config import Settings
from pipeline.intake.drop import is_complete
from pipeline.intake.profiles import load_profile
from pipeline.preflight import preflight
from pipeline.records.datasets import write_datasets
from pipeline.records.ledger import audit, paused_routes
from pipeline.records.ledger.models import AuditEvent, Run, RunStage
from pipeline.records.run_context import LedgerContext, ledger_sessions
from pipeline.stages import INTAKE_STAGES

log = logging.getLogger(__name__)
# The audit action pairing a ledger run (entity) with the DAG run driving it (detail).
DAG_RUN_PAIRED = "dag_run_paired"


def intake_run_for(settings: Settings, drop: Path, dag_run: str) -> str | None:
    """The ledger run DAG run `dag_run` (e.g. "eob_intake/scheduled__…") drives: the one it
    paired with before, else the drop's unfinished run (resumed), else a new run when the drop
    holds a complete file; None while there is nothing to take in."""
    sessions = ledger_sessions(settings.ledger_url)
    with sessions() as session:
        paired = session.scalars(
            select(AuditEvent.entity_id)
            .where(AuditEvent.action == DAG_RUN_PAIRED, AuditEvent.detail == dag_run)
            .order_by(AuditEvent.event_id)
        ).first()
        if paired is not None:
            return paired
        unfinished = runner.unfinished_run(session, drop)
    if unfinished is None and not has_complete_file(drop):
        return None
    preflight(settings, INTAKE_STAGES, drop)
    if unfinished is not None:
        # Unlike `eob intake`, which refuses: here the failed DAG run already told the operator
        # (red in the UI, the failure callback), and an unattended loop must not stall on it.
        log.warning("run %s of this drop is unfinished: DAG run %s resumes it", unfinished, dag_run)
    run_id = unfinished or runner.start_run(settings, drop, INTAKE_STAGES)
    with sessions.begin() as session:
        audit(session, DAG_RUN_PAIRED, "run", run_id, actor="airflow", detail=dag_run)
    log.info("run %s is driven by DAG run %s", run_id, dag_run)
    return run_id


def has_complete_file(drop: Path) -> bool:
    """Whether some insurer folder of `drop` holds a file its drop protocol calls complete: a
    directory listing, no hashing, so a sensor can ask it every minute."""
    if not drop.is_dir():
        return False
    for folder in drop.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            profile = load_profile(folder.name)
            if any(is_complete(path, profile) for path in folder.iterdir()):
                return True
    return False


def stage_once(settings: Settings, run_id: str, stage: str) -> dict[str, int]:
    """Run `stage` of `run_id` unless the ledger says it completed (a cleared task or DAG run
    resumes; it does not redo, e.g. ingest a later drop into a finished run)."""
    with ledger_sessions(settings.ledger_url)() as session:
        done = session.get(RunStage, (run_id, stage))
    if done is not None and done.completed_at is not None:
        log.info("run %s %s: completed before, not redone", run_id, stage)
        return {}
    return runner.run_stage(settings, run_id, stage)


def finish_once(settings: Settings, run_id: str) -> dict[str, int]:
    """The run's summary, finishing it unless it is finished."""
    with ledger_sessions(settings.ledger_url)() as session:
        run = session.get(Run, run_id)
        if run is not None and run.finished_at is not None:
            return runner.run_summary(session, run_id)
    return runner.finish_run(settings, run_id)


def log_paused_routes(settings: Settings) -> int:
    """Log why messages wait (bounce-rate pauses), naming sending IPs only: a recipient domain
    can be a member's own. Returns how many routes are paused."""
    with ledger_sessions(settings.ledger_url)() as session:
        routes = paused_routes(session)
    for ip in sorted({ip for ip, _ in routes}):
        count = sum(source == ip for source, _ in routes)
        log.warning(
            "sending IP %s: %d provider route(s) paused by a bounce-rate alert; their messages "
            "wait until it is acknowledged in the console",
            ip,
            count,
        )
    return len(routes)


def datasets_pass(settings: Settings) -> dict[str, int]:
    """Rewrite the analysts' datasets (delivery facts, audit events) from the ledger."""
    return write_datasets(LedgerContext(settings, ledger_sessions(settings.ledger_url)))
