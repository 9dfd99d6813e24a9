"""Runs the stages on a drop: each step reads its inputs from the ledger and the run
directory, calls the stage's pure function, and records what it did.

Every step is idempotent for its run: a rerun does no duplicate work and sends nothing twice.
Steps return counts only (safe for logs and Airflow XComs: no PHI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import bounces, datasets, reconcile
from pipeline.atrest import Keyring, load_keyring, read_decrypted, reencrypt, write_encrypted
from pipeline.compose import compose_eob_email
from pipeline.config import Settings
from pipeline.errors import AccountingError, FileRejected
from pipeline.ingest import find_drop_files, parse_claim_lines
from pipeline.ledger import audit, open_ledger
from pipeline.ledger.models import (
    Bounce,
    InputFile,
    Message,
    ResendCase,
    Run,
    Statement,
    StateTransition,
    Suppression,
)
from pipeline.ledger.states import MessageState, transition_message
from pipeline.plan import assign_ip, message_token, verp_return_path
from pipeline.printbatch import PrintPiece, build_print_batch
from pipeline.protect import pdf_password
from pipeline.render import render_all
from pipeline.render_templates import DEFAULT_LANGUAGE, document_language
from pipeline.send import Outcome, Outgoing, SendResult, SmtpTarget, send_all, tls_context
from pipeline.statements import Statement as StatementDoc
from pipeline.statements import build_statements

log = logging.getLogger(__name__)

STAGES = (
    "ingest",
    "validate",
    "statements",
    "render",
    "plan",
    "send",
    "bounces",
    "reconcile",
    "datasets",
)

T = TypeVar("T")
# Wraps a long loop with a progress display: (items, description, total) -> items.
Track = Callable[[Iterable[T], str, int], Iterable[T]]


def no_progress(items: Iterable[T], _description: str, _total: int) -> Iterable[T]:
    return items


@dataclass
class RunContext:
    settings: Settings
    run_id: str
    sessions: sessionmaker[Session]
    track: Track[object] = field(default=no_progress)

    @property
    def run_dir(self) -> Path:
        return self.settings.runs_dir / self.run_id

    def file_dir(self, file_id: int) -> Path:
        return self.run_dir / "files" / str(file_id)


@cache
def _ledger(url: str) -> sessionmaker[Session]:
    return open_ledger(url)


def start_run(settings: Settings, drop: Path) -> str:
    run_id = datetime.now(UTC).strftime("r%Y%m%dT%H%M%S") + uuid4().hex[:6]
    with _ledger(settings.ledger_url).begin() as session:
        session.add(Run(run_id=run_id, started_at=datetime.now(UTC), drop=str(drop)))
        audit(session, "run_started", "run", run_id, actor="runner")
    log.info("run %s started", run_id)
    return run_id


def run_stage(
    settings: Settings, run_id: str, stage: str, track: Track[object] = no_progress
) -> dict[str, int]:
    context = RunContext(settings, run_id, _ledger(settings.ledger_url), track)
    counts = _STEPS[stage](context)
    log.info("run %s %s: %s", run_id, stage, counts)
    return counts


def finish_run(settings: Settings, run_id: str) -> dict[str, int]:
    with _ledger(settings.ledger_url).begin() as session:
        run = session.get_one(Run, run_id)
        run.finished_at = datetime.now(UTC)
        audit(session, "run_finished", "run", run_id, actor="runner")
        return run_summary(session, run_id)


def run_all(
    settings: Settings, drop: Path, track: Track[object] = no_progress
) -> tuple[str, dict[str, int]]:
    run_id = start_run(settings, drop)
    for stage in STAGES:
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


# Steps ---------------------------------------------------------------------------------------


def _ingest(ctx: RunContext) -> dict[str, int]:
    counts = dict.fromkeys(["registered", "skipped", "rejected", "rows_in"], 0)
    with ctx.sessions() as session:
        drop = Path(session.get_one(Run, ctx.run_id).drop)
    for dropped in find_drop_files(drop):
        with ctx.sessions.begin() as session:
            known = session.scalar(select(InputFile).where(InputFile.sha256 == dropped.sha256))
            if known is not None:
                # Same content again, under any name: registered once, never processed twice.
                audit(
                    session,
                    "file_skipped_duplicate",
                    "input_file",
                    str(known.file_id),
                    actor="ingest",
                    detail=f"run={ctx.run_id}",
                )
                counts["skipped"] += 1
                continue
            record = InputFile(
                sha256=dropped.sha256,
                file_name=dropped.path.name,
                insurer=dropped.insurer,
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
                detail=f"sha256={dropped.sha256}",
            )
            try:
                parsed = parse_claim_lines(dropped.path)
            except FileRejected as err:
                record.status, record.rejection_reason = "rejected", err.reason
                audit(
                    session,
                    "file_rejected",
                    "input_file",
                    str(record.file_id),
                    actor="ingest",
                    detail=err.reason,
                )
                log.warning("%s", err)
                counts["rejected"] += 1
                continue
            out = ctx.file_dir(record.file_id)
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(parsed.rows, out / "parsed.parquet")
            pq.write_table(parsed.quarantine, out / "parse_quarantine.parquet")
            record.rows_in = parsed.rows_in
            counts["registered"] += 1
            counts["rows_in"] += parsed.rows_in
    return counts


def _validate(ctx: RunContext) -> dict[str, int]:
    # Great Expectations takes seconds to import: only the validate step pays for it, not every
    # Airflow task that parses the DAG file.
    from pipeline.validate import validate_claim_lines

    counts = {"files": 0, "rows_accepted": 0, "rows_quarantined": 0}
    with ctx.sessions.begin() as session:
        for record in _run_files(session, ctx.run_id, "registered"):
            out = ctx.file_dir(record.file_id)
            checked = validate_claim_lines(
                pq.read_table(out / "parsed.parquet"), file_name=record.file_name
            )
            quarantine = pa.concat_tables(
                [pq.read_table(out / "parse_quarantine.parquet"), checked.quarantine]
            )
            quarantined = len(pc.unique(quarantine["row_number"]))
            if record.rows_in != checked.accepted.num_rows + quarantined:
                raise AccountingError(
                    f"{record.file_name}: {record.rows_in} rows in, {checked.accepted.num_rows} "
                    f"accepted + {quarantined} quarantined"
                )
            pq.write_table(checked.accepted, out / "accepted.parquet")
            pq.write_table(quarantine, out / "quarantine.parquet")
            record.rows_accepted, record.rows_quarantined = checked.accepted.num_rows, quarantined
            record.status = "validated"
            audit(
                session,
                "file_validated",
                "input_file",
                str(record.file_id),
                actor="validate",
                detail=f"rows_in={record.rows_in} accepted={record.rows_accepted} "
                f"quarantined={quarantined}",
            )
            counts["files"] += 1
            counts["rows_accepted"] += checked.accepted.num_rows
            counts["rows_quarantined"] += quarantined
    return counts


def _statements(ctx: RunContext) -> dict[str, int]:
    counts = {"email": 0, "print": 0}
    with ctx.sessions.begin() as session:
        for record, doc in _run_statements(ctx, session):
            if session.get(Statement, doc.statement_id) is not None:
                continue
            email = doc.member.email
            suppressed = email is not None and session.get(Suppression, email.lower()) is not None
            channel = "email" if email and not suppressed else "print"
            session.add(
                Statement(
                    statement_id=doc.statement_id,
                    run_id=ctx.run_id,
                    file_id=record.file_id,
                    member_id=doc.member.member_id,
                    channel=channel,
                    email=email,
                    claim_lines=len(doc.lines),
                    member_owes=doc.total_member_responsibility,
                    language=document_language(doc.member.language),
                    # Kept only when the email may greet by name (PHI minimisation).
                    first_name=doc.member.first_name
                    if ctx.settings.email_body_phi == "first_name"
                    else None,
                )
            )
            counts[channel] += 1
    return counts


def _render(ctx: RunContext) -> dict[str, int]:
    """PDFs encrypted at rest, rendered by processes over shards; each finished shard is
    recorded at once, so a rerun after a crash renders only what is missing."""
    pdf_dir = ctx.run_dir / "pdf"
    pdf_dir.mkdir(parents=True, exist_ok=True)
    rule = ctx.settings.pdf_password
    passwords: dict[str, str] = {}
    # Print-channel statements of the run, in member order: statement id -> ZIP code.
    to_print: dict[str, str] = {}
    keyring = load_keyring(ctx.settings.data_dir)
    with ctx.sessions() as session:
        pending = []
        for _, doc in _run_statements(ctx, session):
            record = session.get_one(Statement, doc.statement_id)
            if record.channel == "print":
                to_print[doc.statement_id] = doc.member.postal_code
            if record.pdf_path is not None:
                continue
            pending.append(doc)
            # Only emailed PDFs are password protected; the print vendor gets them open.
            password = (
                pdf_password(doc.member, rule) if rule and record.channel == "email" else None
            )
            if password is not None:
                passwords[doc.statement_id] = password
    shards = render_all(
        pending,
        plan_name=ctx.settings.plan_name,
        out_dir=pdf_dir,
        keyring=keyring,
        workers=ctx.settings.render_processes,
        passwords=passwords,
    )
    progress = iter(ctx.track(pending, "render", len(pending)))
    rendered = 0
    for shard in shards:
        with ctx.sessions.begin() as session:
            for done in shard:
                record = session.get_one(Statement, done.statement_id)
                record.pdf_path = str(done.path.relative_to(ctx.run_dir))
                record.pdf_protected = done.statement_id in passwords
                next(progress, None)
        rendered += len(shard)
    batch_dir = ctx.run_dir / "print"
    if to_print and (rendered or not batch_dir.exists()):
        return {"rendered": rendered, "print_pieces": _print_batch(ctx, to_print, keyring)}
    return {"rendered": rendered, "print_pieces": 0}


def _print_batch(ctx: RunContext, to_print: dict[str, str], keyring: Keyring) -> int:
    """The run's print batch and vendor manifest, rebuilt whole (it is small next to the PDFs)
    and written encrypted like every PHI file; the vendor transfer decrypts them."""
    batch_dir = ctx.run_dir / "print"
    batch_dir.mkdir(exist_ok=True)
    pieces = (
        PrintPiece(statement_id, postal_code, read_decrypted(path, keyring, statement_id))
        for statement_id, postal_code in to_print.items()
        if (path := ctx.run_dir / "pdf" / f"{statement_id}.pdf").exists()
    )
    batch = build_print_batch(pieces)
    for name, data in (("batch.pdf", batch.pdf), ("manifest.csv", batch.manifest)):
        write_encrypted(batch_dir / name, data, keyring, _print_context(ctx.run_id, name))
    return batch.pieces


def _print_context(run_id: str, name: str) -> str:
    # Binds a print file to its run: a batch copied into another run does not decrypt there.
    return f"{run_id}:print/{name}"


def _encrypted_context(path: Path) -> str:
    """The authenticated context of an encrypted run file, from its place in the run dir."""
    if path.parent.name == "pdf":
        return path.stem
    if path.parent.name == "print":
        return _print_context(path.parent.parent.name, path.name)
    raise ValueError(f"{path.name}: not a PDF or print file of a run")


def rekey(settings: Settings) -> dict[str, int]:
    """Re-encrypt every encrypted file of every run under the active key (key rotation); the
    old key can be retired once this reports nothing left under it."""
    keyring = load_keyring(settings.data_dir)
    counts = {"reencrypted": 0, "already_current": 0}
    for path in sorted(settings.runs_dir.glob("*/pdf/*.pdf")) + sorted(
        settings.runs_dir.glob("*/print/*")
    ):
        changed = reencrypt(path, keyring, _encrypted_context(path))
        counts["reencrypted" if changed else "already_current"] += 1
    return counts


def decrypt_run_file(settings: Settings, path: Path) -> bytes:
    """A run's PDF or print file decrypted, in memory (for `eob decrypt` to a viewer's pipe)."""
    return read_decrypted(path, load_keyring(settings.data_dir), _encrypted_context(path))


def _plan(ctx: RunContext) -> dict[str, int]:
    counts = {"planned": 0, "suppressed": 0}
    with ctx.sessions.begin() as session:
        statements = session.scalars(
            select(Statement).where(
                Statement.run_id == ctx.run_id,
                Statement.channel == "email",
                Statement.pdf_path.is_not(None),
            )
        ).all()
        for statement in statements:
            token = message_token(statement.statement_id, 1)
            if session.get(Message, token) is not None or statement.email is None:
                continue
            ip = assign_ip(statement.statement_id, ctx.settings.sending_ips)
            now = datetime.now(UTC)
            message = Message(
                message_id=token,
                statement_id=statement.statement_id,
                run_id=ctx.run_id,
                attempt=1,
                recipient=statement.email,
                source_ip=ip.address,
                ehlo_name=ip.ehlo_name,
                state=MessageState.PLANNED,
                created_at=now,
                updated_at=now,
            )
            session.add(message)
            if session.get(Suppression, statement.email.lower()) is not None:
                transition_message(
                    session,
                    message,
                    MessageState.SUPPRESSED,
                    actor="plan",
                    reason="address suppressed",
                )
                counts["suppressed"] += 1
            else:
                counts["planned"] += 1
    return counts


def _send(ctx: RunContext) -> dict[str, int]:
    settings = ctx.settings
    with ctx.sessions.begin() as session:
        _recover_interrupted(session, ctx.run_id)
        pending = session.scalars(
            select(Message)
            .where(
                Message.run_id == ctx.run_id,
                Message.state.in_([MessageState.PLANNED, MessageState.DEFERRED]),
            )
            .order_by(Message.message_id)
        ).all()
        keyring = load_keyring(settings.data_dir)
        outgoing = [_outgoing(ctx, session, message, keyring) for message in pending]
    counts = {outcome.value: 0 for outcome in Outcome}
    progress = iter(ctx.track(outgoing, "send", len(outgoing)))

    def before_send(message: Outgoing) -> None:
        with ctx.sessions.begin() as session:
            transition_message(
                session,
                session.get_one(Message, message.message_id),
                MessageState.SENDING,
                actor="send",
            )

    def on_result(result: SendResult) -> None:
        with ctx.sessions.begin() as session:
            message = session.get_one(Message, result.message_id)
            message.smtp_code, message.smtp_reply = result.code, result.reply
            transition_message(
                session,
                message,
                MessageState(result.outcome),
                actor="send",
                reason=f"SMTP {result.code or 'no reply'}",
            )
            if result.outcome == Outcome.BOUNCED:
                _record_smtp_rejection(session, message, result)
        counts[result.outcome] += 1
        next(progress, None)

    target = SmtpTarget(
        settings.smtp_host, settings.smtp_port, tls_context(settings.ca_file), settings.smtp_timeout
    )
    send_all(outgoing, target, before_send=before_send, on_result=on_result)
    return counts


def _recover_interrupted(session: Session, run_id: str) -> None:
    """A message left in `sending` by a crash may or may not have reached the server: it is
    deferred for another attempt and marked as a possible duplicate (at-least-once)."""
    stuck = session.scalars(
        select(Message).where(Message.run_id == run_id, Message.state == MessageState.SENDING)
    ).all()
    for message in stuck:
        message.possible_duplicate = True
        transition_message(
            session,
            message,
            MessageState.DEFERRED,
            actor="send",
            reason="interrupted mid-transaction; outcome unknown",
        )


def _outgoing(ctx: RunContext, session: Session, message: Message, keyring: Keyring) -> Outgoing:
    statement = session.get_one(Statement, message.statement_id)
    assert statement.pdf_path is not None
    content = compose_eob_email(
        message_id=message.message_id,
        statement_id=statement.statement_id,
        recipient=message.recipient,
        from_address=ctx.settings.from_address,
        plan_name=ctx.settings.plan_name,
        language=statement.language or DEFAULT_LANGUAGE,
        first_name=statement.first_name if ctx.settings.email_body_phi == "first_name" else None,
        # The PDF was protected at render time when the member had the data the rule needs.
        password_rule=ctx.settings.pdf_password if statement.pdf_protected else "",
        # Decrypted in memory only: the plaintext PDF is never written anywhere.
        pdf=read_decrypted(
            ctx.settings.runs_dir / statement.run_id / statement.pdf_path,
            keyring,
            statement.statement_id,
        ),
    )
    return Outgoing(
        message_id=message.message_id,
        mail_from=verp_return_path(message.message_id, ctx.settings.return_path_domain),
        recipient=message.recipient,
        source_ip=message.source_ip,
        ehlo_name=message.ehlo_name,
        content=content.as_bytes(),
    )


def _record_smtp_rejection(session: Session, message: Message, result: SendResult) -> None:
    """A 5xx at SMTP time flows into the same bounce path as a DSN."""
    status = bounces.enhanced_status(result.reply)
    session.add(
        Bounce(
            dedupe_key=f"smtp:{message.message_id}",
            message_id=message.message_id,
            received_at=datetime.now(UTC),
            bounce_class=bounces.classify(status, result.reply),
            status_code=status,
            diagnostic=f"smtp; {result.code} {result.reply}",
            recipient=message.recipient,
        )
    )


def _bounces(ctx: RunContext) -> dict[str, int]:
    counts = {"reports": 0, "matched": 0, "unmatched": 0, "already_seen": 0}
    maildir = ctx.settings.return_path_maildir
    for key, raw in bounces.read_maildir(maildir):
        with ctx.sessions.begin() as session:
            for report in bounces.parse_report(
                raw, return_path_domain=ctx.settings.return_path_domain
            ):
                if session.scalar(select(Bounce).where(Bounce.dedupe_key == report.dedupe_key)):
                    counts["already_seen"] += 1
                    continue
                known = report.message_token and session.get(Message, report.message_token)
                session.add(
                    Bounce(
                        dedupe_key=report.dedupe_key,
                        message_id=report.message_token if known else None,
                        received_at=datetime.now(UTC),
                        bounce_class=report.bounce_class,
                        status_code=report.status,
                        diagnostic=report.diagnostic,
                        recipient=report.recipient,
                    )
                )
                counts["reports"] += 1
                counts["matched" if known else "unmatched"] += 1
        bounces.mark_processed(maildir, key)
    return counts


def _reconcile(ctx: RunContext) -> dict[str, int]:
    counts = {"bounces": 0, "resend_cases_opened": 0}
    with ctx.sessions.begin() as session:
        for bounce in session.scalars(select(Bounce).where(Bounce.reconciled.is_(False))).all():
            counts["bounces"] += 1
            counts["resend_cases_opened"] += reconcile.reconcile_bounce(session, bounce)
    return counts


def _datasets(ctx: RunContext) -> dict[str, int]:
    with ctx.sessions() as session:
        out = ctx.settings.datasets_dir
        return {
            "delivery_facts": datasets.write_delivery_facts(session, out),
            "audit_events": datasets.write_audit_events(session, out),
        }


def _run_files(session: Session, run_id: str, status: str) -> list[InputFile]:
    return list(
        session.scalars(
            select(InputFile)
            .where(InputFile.run_id == run_id, InputFile.status == status)
            .order_by(InputFile.file_id)
        )
    )


def _run_statements(ctx: RunContext, session: Session) -> Iterator[tuple[InputFile, StatementDoc]]:
    for record in _run_files(session, ctx.run_id, "validated"):
        accepted = pq.read_table(ctx.file_dir(record.file_id) / "accepted.parquet")
        for doc in build_statements(accepted, file_sha256=record.sha256):
            yield record, doc


_STEPS: dict[str, Callable[[RunContext], dict[str, int]]] = {
    "ingest": _ingest,
    "validate": _validate,
    "statements": _statements,
    "render": _render,
    "plan": _plan,
    "send": _send,
    "bounces": _bounces,
    "reconcile": _reconcile,
    "datasets": _datasets,
}
