"""Runs the stages on a drop: each step reads its inputs from the ledger and the run
directory, calls the stage's pure function, and records what it did.

Every step is idempotent for its run: a rerun does no duplicate work and sends nothing twice.
Steps return counts only (safe for logs and Airflow XComs: no PHI).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache, cached_property
from pathlib import Path
from typing import Any, TypeVar, cast
from uuid import uuid4

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import Select, Table, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline import atrest_parquet, bounces, cases, collect, datasets, reconcile
from pipeline.atrest import (
    Keyring,
    load_keyring,
    read_decrypted,
    read_decrypted_stream,
    reencrypt,
    rekey_stream,
    write_encrypted,
)
from pipeline.compose import compose_eob_email, compose_portal_notice
from pipeline.config import Settings
from pipeline.contracts import load_contract
from pipeline.drop import DroppedFile, archive, archive_context, archived_drops, complete_files
from pipeline.errors import FileRejected
from pipeline.ingest import ROW, detect_format, ingest_file
from pipeline.ledger import audit, is_suppressed, open_ledger
from pipeline.ledger.models import (
    Bounce,
    InputFile,
    Message,
    ResendCase,
    Run,
    Statement,
    StateTransition,
)
from pipeline.ledger.states import (
    MessageMove,
    MessageState,
    transition_message,
    transition_messages,
)
from pipeline.plan import NewMessage, add_planned_messages, message_token, verp_return_path
from pipeline.policy import DEFAULT_PROVIDER, SendingPolicy, policy_for
from pipeline.printbatch import PrintPiece, build_print_batch
from pipeline.profiles import load_profile
from pipeline.protect import pdf_password
from pipeline.rejections import write_rejection_report
from pipeline.render import render_all
from pipeline.render_templates import DEFAULT_LANGUAGE, document_language
from pipeline.routing import MxRouter, RelayRouter, Router
from pipeline.send import (
    Callbacks,
    Claim,
    Event,
    Outcome,
    Outgoing,
    SendResult,
    send_all,
    tls_context,
)
from pipeline.shaping import provider_for, recipient_domain
from pipeline.signing import DkimSigner
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

    @cached_property
    def keyring(self) -> Keyring:
        # Loaded once per step: the intermediates of every file of the step use it.
        return load_keyring(self.settings.data_dir)


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
    for dropped in complete_files(drop):
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
                _archive(ctx, dropped)
                counts["skipped"] += 1
                continue
            record = _register(session, ctx, dropped)
            try:
                counts["rows_in"] += _ingest_one(ctx, record, dropped)
                counts["registered"] += 1
            except FileRejected as err:
                _reject(ctx, session, record, err.reason, quarantine=None)
                log.warning("%s", err)
                counts["rejected"] += 1
            record.archived_path = str(_archive(ctx, dropped))
    return counts


def _archive(ctx: RunContext, dropped: DroppedFile) -> Path:
    return archive(dropped, ctx.settings.archive_dir, datetime.now(UTC).date(), ctx.keyring)


def _register(session: Session, ctx: RunContext, dropped: DroppedFile) -> InputFile:
    earlier = session.scalar(
        select(func.count()).where(
            InputFile.insurer == dropped.insurer, InputFile.file_name == dropped.path.name
        )
    )
    record = InputFile(
        sha256=dropped.sha256,
        file_name=dropped.path.name,
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
    profile = load_profile(dropped.insurer).for_kind(dropped.kind)
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
    )
    record.rows_in = result.rows_in
    return result.rows_in


def _reject(
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


def _validate(ctx: RunContext) -> dict[str, int]:
    # Great Expectations takes seconds to import: only the validate step pays for it, not every
    # Airflow task that parses the DAG file.
    from pipeline.validate import validate_file

    counts = {"files": 0, "rejected": 0, "rows_accepted": 0, "rows_quarantined": 0}
    with ctx.sessions.begin() as session:
        # Rosters first, so the run's claims are joined with the newest contact details.
        pending = sorted(
            _run_files(session, ctx.run_id, "registered"),
            key=lambda f: (f.kind != "roster", f.file_id),
        )
        # Each insurer's merged roster, decrypted once per stage and kept current by the merges.
        rosters: dict[str, pa.Table | None] = {}
        for record in pending:
            out = ctx.file_dir(record.file_id)
            roster_path = ctx.settings.rosters_dir / f"{record.insurer}.parquet"
            if record.insurer not in rosters:
                rosters[record.insurer] = (
                    atrest_parquet.read_table(roster_path, ctx.keyring)
                    if roster_path.exists()
                    else None
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
            counts["files"] += 1
            if verdict.rejection:
                _reject(
                    ctx,
                    session,
                    record,
                    verdict.rejection,
                    quarantine=atrest_parquet.read_table(out / "quarantine.parquet", ctx.keyring),
                )
                counts["rejected"] += 1
                continue
            record.rows_accepted, record.rows_quarantined = verdict.accepted, verdict.quarantined
            record.status = "validated"
            if record.kind == "roster":
                accepted = atrest_parquet.read_table(out / "accepted.parquet", ctx.keyring)
                rosters[record.insurer] = _merge_roster(roster_path, roster, accepted, ctx.keyring)
            audit(
                session,
                "file_validated",
                "input_file",
                str(record.file_id),
                actor="validate",
                detail=f"rows_in={record.rows_in} accepted={verdict.accepted} "
                f"quarantined={verdict.quarantined}",
            )
            counts["rows_accepted"] += verdict.accepted
            counts["rows_quarantined"] += verdict.quarantined
    return counts


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


def _statements(ctx: RunContext) -> dict[str, int]:
    counts = {"email": 0, "print": 0}
    with ctx.sessions.begin() as session:
        for record, doc in _run_statements(ctx, session):
            if session.get(Statement, doc.statement_id) is not None:
                continue
            email = doc.member.email
            suppressed = email is not None and is_suppressed(session, email)
            consented = doc.member.edelivery_consent is not False
            channel = "email" if email and consented and not suppressed else "print"
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
    keyring = ctx.keyring
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
    raise ValueError(
        f"{path.name}: not an encrypted file of the data directory (a run's PDF or print file, "
        "an archived drop, a kept bounce report)"
    )


def rekey(settings: Settings) -> dict[str, int]:
    """Re-encrypt every PHI file at rest under the active key (key rotation): every run's PDFs,
    print files and parquet intermediates, the rosters, the archived drops and the kept bounce
    reports. The old key can be retired once this reports nothing left under it. Files from
    before their class was encrypted (plaintext intermediates and drops, Fernet-sealed
    reports) are encrypted on the way."""
    keyring = load_keyring(settings.data_dir)
    counts = {"reencrypted": 0, "already_current": 0}
    for path in sorted(settings.runs_dir.glob("*/pdf/*.pdf")) + sorted(
        settings.runs_dir.glob("*/print/*")
    ):
        changed = reencrypt(path, keyring, _encrypted_context(path))
        counts["reencrypted" if changed else "already_current"] += 1
    for path in sorted(settings.runs_dir.glob("*/files/*/*.parquet")) + sorted(
        settings.rosters_dir.glob("*.parquet")
    ):
        changed = atrest_parquet.rekey(path, keyring)
        counts["reencrypted" if changed else "already_current"] += 1
    for path in archived_drops(settings.archive_dir):
        changed = rekey_stream(path, keyring, archive_context(path, settings.archive_dir))
        counts["reencrypted" if changed else "already_current"] += 1
    reports = collect.Archive.in_data_dir(settings.data_dir, keyring)
    legacy_key = collect.legacy_fernet_key(settings.data_dir, os.environ)
    for name, count in reports.rekey(legacy_key).items():
        counts[name] += count
    return counts


def decrypted_file(settings: Settings, path: Path) -> Iterator[bytes]:
    """An encrypted file of the data directory decrypted, in pieces (for `eob decrypt` to a
    viewer's pipe): a run's PDF or print file, an archived drop or a kept bounce report."""
    keyring = load_keyring(settings.data_dir)
    archive_dir = settings.archive_dir.resolve()
    reports = collect.Archive.in_data_dir(settings.data_dir, keyring)
    if path.is_relative_to(archive_dir):
        yield from read_decrypted_stream(path, keyring, archive_context(path, archive_dir))
    elif path.parent == reports.directory.resolve():
        yield reports.read_file(path)
    else:
        yield read_decrypted(path, keyring, _encrypted_context(path))


def _plan(ctx: RunContext) -> dict[str, int]:
    policy = policy_for(ctx.settings)
    today = datetime.now(UTC).date()
    counts = {"planned": 0, "suppressed": 0, "spilled_to_later_days": 0}
    with ctx.sessions.begin() as session:
        statements = session.scalars(
            select(Statement).where(
                Statement.run_id == ctx.run_id,
                Statement.channel == "email",
                Statement.pdf_path.is_not(None),
            )
        ).all()
        to_plan: dict[str, Statement] = {}
        for statement in statements:
            token = message_token(statement.statement_id, 1)
            if session.get(Message, token) is not None or statement.email is None:
                continue
            to_plan[statement.statement_id] = statement
        providers = _providers(policy, [s.email or "" for s in to_plan.values()])
        wanted = [
            NewMessage(s.statement_id, s.statement_id, 1, email, providers[recipient_domain(email)])
            for s in to_plan.values()
            if (email := s.email) is not None
        ]
        for message in add_planned_messages(session, wanted, ctx.run_id, policy, today):
            if is_suppressed(session, message.recipient):
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
                assert message.send_day is not None  # the planner gave it a day
                counts["spilled_to_later_days"] += message.send_day > today
        # Approved verify-before-resend cases go out as new attempts with this run.
        counts["resends_planned"] = cases.plan_approved_resends(
            session,
            ctx.run_id,
            policy,
            providers_of=lambda addresses: _providers(policy, addresses),
        )
    return counts


def _providers(policy: SendingPolicy, addresses: list[str]) -> dict[str, str]:
    """Each recipient domain's provider; in direct mode rolled up from its MX hosts."""
    domains = sorted({recipient_domain(a) for a in addresses})
    if policy.mode == "relay":
        return {d: provider_for(policy, d) for d in domains}
    router = MxRouter()

    async def lookup() -> list[list[str]]:
        return await asyncio.gather(*(router.mx_hosts(d) for d in domains))

    return {
        d: provider_for(policy, d, hosts)
        for d, hosts in zip(domains, asyncio.run(lookup()), strict=True)
    }


def _send(ctx: RunContext) -> dict[str, int]:
    settings = ctx.settings
    policy = policy_for(settings)
    now = datetime.now(UTC)
    with ctx.sessions.begin() as session:
        _recover_interrupted(session, ctx.run_id)
        # Each message with its statement, in one query (not one query per statement).
        rows = session.execute(
            select(Message, Statement)
            .join(Statement, Statement.statement_id == Message.statement_id)
            .where(
                Message.run_id == ctx.run_id,
                Message.state.in_([MessageState.PLANNED, MessageState.DEFERRED]),
                or_(Message.send_day.is_(None), Message.send_day <= now.date()),
                or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now),
            )
            .order_by(Message.message_id)
        ).all()
        # A bounce rate over the pause threshold holds that IP and provider until acknowledged.
        paused = reconcile.paused_routes(session)
        rows = [
            row for row in rows
            if (row.Message.source_ip, recipient_domain(row.Message.recipient)) not in paused
        ]  # fmt: skip
        keyring = ctx.keyring
        parts = {message.message_id: _email_parts(ctx, statement) for message, statement in rows}
        pending = [message for message, _ in rows]
        outgoing = [_outgoing(ctx, m) for m in pending]
        # What a claim must find in the ledger (each message is claimed once per send stage).
        claimable = {m.message_id: (MessageState(m.state), m.tries) for m in pending}
        resends = {m.message_id for m in pending if m.case_id is not None}
    counts = {outcome.value: 0 for outcome in Outcome} | {"expired": 0}
    progress = iter(ctx.track(outgoing, "send", len(outgoing)))
    signer = DkimSigner(policy.dkim)

    def render(message: Outgoing) -> bytes:
        statement = parts[message.message_id]
        content = compose_eob_email(
            message_id=message.message_id,
            statement_id=statement.statement_id,
            recipient=message.recipient,
            from_address=settings.from_address,
            plan_name=settings.plan_name,
            language=statement.language,
            first_name=statement.first_name if settings.email_body_phi == "first_name" else None,
            # The PDF was protected at render time when the member had the data the rule needs.
            password_rule=settings.pdf_password if statement.pdf_protected else "",
            # Decrypted in memory only: the plaintext PDF is never written anywhere.
            pdf=read_decrypted(statement.pdf, keyring, statement.statement_id),
        )
        return signer.sign(content)

    def notice(message: Outgoing) -> bytes:
        content = compose_portal_notice(
            message_id=message.message_id,
            from_address=settings.from_address,
            plan_name=settings.plan_name,
            portal_url=policy.portal_url,
            language=parts[message.message_id].language,
        )
        return signer.sign(content)

    def record(events: Sequence[Event]) -> None:
        """One transaction per batch: claims move to `sending`, results to their outcome.
        Claims, plain acceptances and held messages (a suspended lane's whole queue) are
        written in bulk; the other results (bounces, deferrals, fallbacks, resends) row by
        row with what they entail."""
        claims = [
            MessageMove(e.message.message_id, claimable[e.message.message_id][0],
                        values={"tries": claimable[e.message.message_id][1] + 1})
            for e in events if isinstance(e, Claim)
        ]  # fmt: skip
        results = [e for e in events if isinstance(e, SendResult)]
        accepted = [
            MessageMove(r.message_id, MessageState.SENDING, f"SMTP {r.code}",
                        {"smtp_code": r.code, "smtp_reply": r.reply})
            for r in results if r.outcome == Outcome.ACCEPTED and r.message_id not in resends
        ]  # fmt: skip
        held = [r for r in results if r.outcome == Outcome.HELD]
        outcomes = [Outcome.ACCEPTED.value] * len(accepted) + [Outcome.HELD.value] * len(held)
        with ctx.sessions.begin() as session:
            transition_messages(session, claims, MessageState.SENDING, actor="send")
            transition_messages(session, accepted, MessageState.ACCEPTED, actor="send")
            _hold(session, held)
            bulk = {move.message_id for move in accepted} | {r.message_id for r in held}
            for result in results:
                if result.message_id not in bulk:
                    message = session.get_one(Message, result.message_id)
                    expired = _record_result(session, message, result, policy)
                    outcomes.append("expired" if expired else result.outcome.value)
        for outcome in outcomes:
            counts[outcome] += 1
            next(progress, None)

    router: Router = (
        RelayRouter(policy, settings.smtp_host, settings.smtp_port)
        if policy.mode == "relay"
        else MxRouter()
    )
    tls = tls_context(settings.ca_file, policy.tls_min_version)
    send_all(outgoing, policy, router, tls, Callbacks(render, notice, record))
    return counts


def _hold(session: Session, held: Sequence[SendResult]) -> None:
    """Messages a suspended lane never attempted: no transition, only not before the
    suspension ends (one executemany UPDATE)."""
    if not held:
        return
    now = datetime.now(UTC)
    table = cast(Table, Message.__table__)
    session.execute(
        update(table)
        .where(table.c.message_id == bindparam("m_id"))
        .values(next_attempt_at=bindparam("m_at")),
        [{"m_id": r.message_id, "m_at": now + timedelta(seconds=r.retry_after or 0)} for r in held],
    )


def _record_result(
    session: Session, message: Message, result: SendResult, policy: SendingPolicy
) -> bool:
    """Record one SMTP outcome; True when a deferral outlived the retry policy and expired."""
    now = datetime.now(UTC)
    message.smtp_code, message.smtp_reply = result.code, result.reply
    reason = f"SMTP {result.code or 'no reply'}"
    transition_message(session, message, MessageState(result.outcome), actor="send", reason=reason)
    if result.outcome == Outcome.BOUNCED:
        _record_smtp_rejection(session, message, result)
    elif result.outcome == Outcome.ACCEPTED:
        cases.on_attempt_accepted(session, message)
    elif result.outcome == Outcome.FALLBACK:
        notified = result.code is not None and 200 <= result.code < 300
        if policy.tls_fallback == "print" or not notified:
            session.get_one(Statement, message.statement_id).channel = "print"
    elif result.outcome == Outcome.DEFERRED:
        delay = policy.retry.delay(message.tries, result.retry_after)
        message.next_attempt_at = now + timedelta(seconds=delay)
        created = message.created_at.replace(tzinfo=message.created_at.tzinfo or UTC)
        if (message.next_attempt_at - created).total_seconds() > policy.retry.max_age_seconds:
            transition_message(
                session, message, MessageState.EXPIRED, actor="send", reason="retry max age"
            )
            return True
    return False


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


@dataclass(frozen=True)
class _EmailParts:
    """What the email of one statement needs, read from the ledger before sending starts."""

    statement_id: str
    # The encrypted PDF on disk.
    pdf: Path
    language: str
    first_name: str | None
    pdf_protected: bool


def _email_parts(ctx: RunContext, statement: Statement) -> _EmailParts:
    assert statement.pdf_path is not None
    return _EmailParts(
        statement_id=statement.statement_id,
        pdf=ctx.settings.runs_dir / statement.run_id / statement.pdf_path,
        language=statement.language or DEFAULT_LANGUAGE,
        first_name=statement.first_name,
        pdf_protected=statement.pdf_protected,
    )


def _outgoing(ctx: RunContext, message: Message) -> Outgoing:
    return Outgoing(
        message_id=message.message_id,
        mail_from=verp_return_path(message.message_id, ctx.settings.return_path_domain),
        recipient=message.recipient,
        source_ip=message.source_ip,
        ehlo_name=message.ehlo_name,
        provider=message.provider or DEFAULT_PROVIDER,
    )


def _record_smtp_rejection(session: Session, message: Message, result: SendResult) -> None:
    """A 5xx at SMTP time flows into the same bounce path as a DSN."""
    status, bounce_class = bounces.smtp_rejection(result.code or 0, result.reply, result.smtp_stage)
    session.add(
        Bounce(
            dedupe_key=f"smtp:{message.message_id}",
            message_id=message.message_id,
            received_at=datetime.now(UTC),
            bounce_class=bounce_class,
            status_code=status,
            diagnostic=f"smtp; {result.code} {result.reply}",
            recipient=message.recipient,
            kind=bounces.ReportKind.SMTP,
            matched_by="smtp",
        )
    )


def _bounces(ctx: RunContext) -> dict[str, int]:
    counts = {"reports": 0, "matched": 0, "unmatched": 0, "already_seen": 0}
    source = collect.source_from(ctx.settings.return_path_source, ctx.settings.return_path_maildir)
    archive = collect.Archive.in_data_dir(ctx.settings.data_dir, ctx.keyring)
    for item in source.messages():
        # The ledger, not the archive, says whether a report was processed: a report archived
        # by a run that then failed before its commit is processed again, never skipped.
        with ctx.sessions.begin() as session:
            known = select(Bounce.bounce_id).where(Bounce.raw_sha256 == item.sha256).limit(1)
            if session.scalar(known) is not None:
                counts["already_seen"] += 1
            else:
                for report in bounces.parse_report(
                    item.raw, return_path_domain=ctx.settings.return_path_domain
                ):
                    matched = _record_report(session, report, item.sha256)
                    counts["reports"] += 1
                    counts["matched" if matched else "unmatched"] += 1
                archive.keep(item)  # last: a failure here rolls the rows back
        source.mark_processed(item.ref)
    return counts


def _record_report(session: Session, report: bounces.BounceReport, sha256: str) -> bool:
    """Match VERP first, else the returned Message-ID; unmatched ones wait for review."""
    message_id, matched_by = None, "none"
    if report.message_token and session.get(Message, report.message_token):
        message_id, matched_by = report.message_token, "verp"
    elif report.original_message_id:
        local = report.original_message_id.partition("@")[0]
        if session.get(Message, local):
            message_id, matched_by = local, "message_id"
    session.add(
        Bounce(
            dedupe_key=report.dedupe_key,
            message_id=message_id,
            received_at=datetime.now(UTC),
            bounce_class=report.bounce_class,
            status_code=report.status,
            diagnostic=report.diagnostic,
            recipient=report.recipient,
            kind=report.kind,
            matched_by=matched_by,
            raw_sha256=sha256,
        )
    )
    return message_id is not None


def _reconcile(ctx: RunContext) -> dict[str, int]:
    policy = reconcile.load_policy()
    counts = {"bounces": 0, "resend_cases_opened": 0}
    with ctx.sessions.begin() as session:
        for bounce in session.scalars(select(Bounce).where(Bounce.reconciled.is_(False))).all():
            counts["bounces"] += 1
            counts["resend_cases_opened"] += reconcile.reconcile_bounce(session, bounce, policy)
        rates = reconcile.monitor_bounce_rates(session, ctx.run_id, policy)
    return counts | {f"bounce_rate_{level}": n for level, n in rates.items()}


def _datasets(ctx: RunContext) -> dict[str, int]:
    with ctx.sessions() as session:
        out = ctx.settings.datasets_dir
        return {
            "delivery_facts": datasets.write_delivery_facts(session, out),
            "audit_events": datasets.write_audit_events(session, out),
        }


def _run_files(
    session: Session, run_id: str, status: str, kind: str | None = None
) -> list[InputFile]:
    query = select(InputFile).where(InputFile.run_id == run_id, InputFile.status == status)
    if kind is not None:
        query = query.where(InputFile.kind == kind)
    return list(session.scalars(query.order_by(InputFile.file_id)))


def _run_statements(ctx: RunContext, session: Session) -> Iterator[tuple[InputFile, StatementDoc]]:
    for record in _run_files(session, ctx.run_id, "validated", kind="claims"):
        accepted = atrest_parquet.read_table(
            ctx.file_dir(record.file_id) / "accepted.parquet", ctx.keyring
        )
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
