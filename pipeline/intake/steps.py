"""Intake's steps bound to the ledger: ingest a drop's complete files, validate them."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pipeline.errors import FileRejected
from pipeline.intake.drop import (
    DroppedFile,
    RefusedEntry,
    archive_copy,
    archive_name,
    remove_from_landing,
    scan_landing,
    set_aside,
)
from pipeline.intake.ingest import ROW, detect_format, ingest_file
from pipeline.intake.names import as_data, shown
from pipeline.intake.profiles import load_profile
from pipeline.intake.rejections import write_rejection_report
from pipeline.records import atrest_parquet
from pipeline.records.atrest import (
    Keyring,
)
from pipeline.records.contracts import load_contract
from pipeline.records.ledger import audit
from pipeline.records.ledger.models import (
    InputFile,
    Run,
)
from pipeline.records.run_context import RunContext, run_files

if TYPE_CHECKING:
    from pipeline.intake.validate import FileVerdict

log = logging.getLogger(__name__)
T = TypeVar("T")


def ingest_files(ctx: RunContext) -> dict[str, int]:
    counts = dict.fromkeys(["registered", "skipped", "rejected", "refused", "rows_in"], 0)
    with ctx.sessions() as session:
        drop = Path(session.get_one(Run, ctx.run_id).drop)
    landing = scan_landing(drop)
    for entry in landing.refused:
        _refuse(ctx, entry)
        counts["refused"] += 1
    for dropped in landing.files:
        with ctx.sessions.begin() as session:
            known = session.scalar(select(InputFile).where(InputFile.sha256 == dropped.sha256))
            if known is None:
                archived = _ingest_new(ctx, session, dropped, counts)
            else:
                archived = _skip_known(ctx, session, known, dropped)
                counts["skipped"] += 1
        # Only once the ledger holds the archived copy: killed before this, a rerun finds
        # the file known and finishes the move.
        remove_from_landing(dropped, archived)
    return counts


def _ingest_new(
    ctx: RunContext, session: Session, dropped: DroppedFile, counts: dict[str, int]
) -> Path:
    """Register, ingest (or reject) and archive a new file; the archived copy's path."""
    record = _register(session, ctx, dropped)
    ingest = partial(_ingest_one, ctx, record, dropped)
    rows_in = _isolated(ctx, session, record, "reading", ingest)
    if rows_in is None:
        counts["rejected"] += 1
    else:
        counts["rows_in"] += rows_in
        counts["registered"] += 1
    archived = archive_copy(dropped, ctx.settings.archive_dir, _today(), ctx.keyring)
    record.archived_path = str(archived)
    return archived


def _skip_known(ctx: RunContext, session: Session, known: InputFile, dropped: DroppedFile) -> Path:
    """Same content again, under any name: registered once, never processed twice. The copy is
    archived too, unless it is the file already archived (a run stopped before it left landing)."""
    done = Path(known.archived_path or "")
    already = done.name == archive_name(dropped) and done.is_file()
    audit(
        session,
        "file_skipped_duplicate",
        "input_file",
        str(known.file_id),
        actor="ingest",
        detail=f"run={ctx.run_id}" + (" already archived" if already else ""),
    )
    if already:
        return done
    return archive_copy(dropped, ctx.settings.archive_dir, _today(), ctx.keyring)


def _refuse(ctx: RunContext, entry: RefusedEntry) -> None:
    """Report an entry that is not read, and set it aside so the next run does not meet it."""
    report = write_rejection_report(
        ctx.settings.outbox_dir,
        insurer=entry.insurer,
        file_name=entry.path.name,
        sha256=None,
        reason=entry.reason,
        quarantine=None,
    )
    moved = set_aside(entry)
    with ctx.sessions.begin() as session:
        audit(
            session,
            "file_refused",
            "insurer",
            entry.insurer,
            actor="ingest",
            detail=f"{entry.reason}; report={report.name}; set aside as {moved.name}",
        )
    log.warning("%s/%s: refused: %s", entry.insurer, shown(entry.path.name), entry.reason)


def _isolated(
    ctx: RunContext, session: Session, record: InputFile, step: str, work: Callable[[], T]
) -> T | None:
    """work() for one file; when it fails, that file alone is rejected (and None returned):
    with its FileRejected reason, or, for a failure no check foresaw, with the exception's type
    only (its message may quote the data), logged with where it happened."""
    try:
        return work()
    except FileRejected as err:
        reason = err.reason
        log.warning("%s: rejected: %s", shown(record.file_name), reason)
    except SQLAlchemyError:
        raise  # the ledger failing is no fault of the file
    except Exception as err:  # noqa: BLE001 - one poison file must not stop the others
        reason = f"failed unexpectedly while {step} ({type(err).__name__})"
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        log.error("%s: rejected: %s at %s", shown(record.file_name), reason, where)
    reject_file(ctx, session, record, reason, quarantine=None)
    return None


def _today() -> date:
    return datetime.now(UTC).date()


def _register(session: Session, ctx: RunContext, dropped: DroppedFile) -> InputFile:
    earlier = session.scalar(
        select(func.count()).where(
            InputFile.insurer == dropped.insurer, InputFile.file_name == as_data(dropped.path.name)
        )
    )
    record = InputFile(
        sha256=dropped.sha256,
        file_name=as_data(dropped.path.name),
        insurer=dropped.insurer,
        kind=dropped.kind,
        version=(earlier or 0) + 1,
        size_bytes=dropped.size_bytes,
        run_id=ctx.run_id,
        registered_at=datetime.now(UTC),
        status="registered",
    )
    session.add(record)
    session.flush()
    audit(
        session,
        "file_registered",
        "input_file",
        str(record.file_id),
        actor="ingest",
        detail=f"sha256={dropped.sha256} kind={dropped.kind} version={record.version}",
    )
    return record


def _ingest_one(ctx: RunContext, record: InputFile, dropped: DroppedFile) -> int:
    insurer = load_profile(dropped.insurer)
    profile = insurer.for_kind(dropped.kind)
    fmt = detect_format(dropped.path) if profile.format == "auto" else profile.format
    out = ctx.file_dir(record.file_id)
    result = ingest_file(
        dropped.path,
        parsed_out=out / "parsed.parquet",
        quarantine_out=out / "parse_quarantine.parquet",
        fmt=fmt,
        columns=profile.columns,
        contract=load_contract("roster" if dropped.kind == "roster" else "claim_line"),
        keyring=ctx.keyring,
        limits=insurer.limits,
    )
    record.rows_in = result.rows_in
    return result.rows_in


def reject_file(
    ctx: RunContext, session: Session, record: InputFile, reason: str, quarantine: pa.Table | None
) -> None:
    record.status, record.rejection_reason = "rejected", reason
    # A rejected file is held back whole: its rows count as quarantined in the accounting.
    record.rows_accepted, record.rows_quarantined = 0, record.rows_in
    report = write_rejection_report(
        ctx.settings.outbox_dir,
        insurer=record.insurer,
        file_name=record.file_name,
        sha256=record.sha256,
        reason=reason,
        quarantine=quarantine,
    )
    audit(
        session,
        "file_rejected",
        "input_file",
        str(record.file_id),
        actor="validate",
        detail=f"{reason}; report={report.name}",
    )


def validate_files(ctx: RunContext) -> dict[str, int]:
    counts = {"files": 0, "rejected": 0, "rows_accepted": 0, "rows_quarantined": 0}
    with ctx.sessions.begin() as session:
        # Rosters first, so the run's claims are joined with the newest contact details.
        pending = sorted(
            run_files(session, ctx.run_id, "registered"),
            key=lambda f: (f.kind != "roster", f.file_id),
        )
        # Each insurer's merged roster, decrypted once per stage and kept current by the merges.
        rosters: dict[str, pa.Table | None] = {}
        for record in pending:
            counts["files"] += 1
            validate = partial(_validate_one, ctx, session, record, rosters)
            verdict = _isolated(ctx, session, record, "validating", validate)
            if verdict is None:
                counts["rejected"] += 1
                continue
            counts["rows_accepted"] += verdict.accepted
            counts["rows_quarantined"] += verdict.quarantined
    return counts


def _validate_one(
    ctx: RunContext, session: Session, record: InputFile, rosters: dict[str, pa.Table | None]
) -> FileVerdict | None:
    """Validate one registered file; its verdict, or None when it was rejected."""
    # Great Expectations takes seconds to import: only the validate step pays for it, not every
    # Airflow task that parses the DAG file.
    from pipeline.intake.validate import validate_file

    out = ctx.file_dir(record.file_id)
    roster_path = ctx.settings.rosters_dir / f"{record.insurer}.parquet"
    if record.insurer not in rosters:
        rosters[record.insurer] = (
            atrest_parquet.read_table(roster_path, ctx.keyring) if roster_path.exists() else None
        )
    roster = rosters[record.insurer]
    verdict = validate_file(
        kind=record.kind,
        file_name=record.file_name,
        parsed=out / "parsed.parquet",
        parse_quarantine=out / "parse_quarantine.parquet",
        accepted_out=out / "accepted.parquet",
        quarantine_out=out / "quarantine.parquet",
        rows_in=record.rows_in or 0,
        run_date=datetime.now(UTC).date(),
        roster=roster if record.kind == "claims" else None,
        max_bad_row_share=load_profile(record.insurer).max_bad_row_share,
        keyring=ctx.keyring,
    )
    if verdict.rejection:
        reject_file(
            ctx,
            session,
            record,
            verdict.rejection,
            quarantine=atrest_parquet.read_table(out / "quarantine.parquet", ctx.keyring),
        )
        return None
    if record.kind == "roster":
        accepted = atrest_parquet.read_table(out / "accepted.parquet", ctx.keyring)
        rosters[record.insurer] = _merge_roster(roster_path, roster, accepted, ctx.keyring)
    record.rows_accepted, record.rows_quarantined = verdict.accepted, verdict.quarantined
    record.status = "validated"
    audit(
        session,
        "file_validated",
        "input_file",
        str(record.file_id),
        actor="validate",
        detail=f"rows_in={record.rows_in} accepted={verdict.accepted} "
        f"quarantined={verdict.quarantined}",
    )
    return verdict


def _merge_roster(
    path: Path, current: pa.Table | None, newer: pa.Table, keyring: Keyring
) -> pa.Table:
    """The insurer's roster: one row per member, the newest file's row winning; written to
    `path` and returned."""
    newer = newer.drop_columns([ROW])
    if current is not None:
        older = current.filter(pc.invert(pc.is_in(current["member_id"], newer["member_id"])))
        newer = pa.concat_tables([older, newer])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    atrest_parquet.write_table(newer, tmp, keyring)
    tmp.replace(path)
    return newer
