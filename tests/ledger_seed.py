"""Ledger rows the tests need under their statements: a run and one validated input file."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from pipeline.records.ledger.models import InputFile, Run


def seed_run_and_file(session: Session, run_id: str = "r1") -> None:
    """Run `run_id` with input file 1. No relationship() links the models, so each parent is
    flushed before its children are added."""
    now = datetime.now(UTC)
    session.add(Run(run_id=run_id, started_at=now, drop="landing"))
    session.flush()
    session.add(
        InputFile(file_id=1, sha256="0" * 64, file_name="f.csv", insurer="acme", size_bytes=1,
                  run_id=run_id, registered_at=now, status="validated")
    )  # fmt: skip
    session.flush()
