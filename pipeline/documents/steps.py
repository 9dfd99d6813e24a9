"""Documents' steps bound to the ledger: one statement per member, their PDFs, the print batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.orm import Session

from pipeline.documents.printbatch import PrintPiece, build_print_batch
from pipeline.documents.protect import pdf_password
from pipeline.documents.render import render_all
from pipeline.documents.statements import Statement as StatementDoc
from pipeline.documents.statements import build_statements
from pipeline.documents.templates import document_language
from pipeline.records import atrest_parquet
from pipeline.records.atrest import (
    Keyring,
    read_decrypted,
    write_encrypted,
)
from pipeline.records.ledger import is_suppressed
from pipeline.records.ledger.models import (
    InputFile,
    Statement,
)
from pipeline.records.run_context import RunContext, run_files


def build_run_statements(ctx: RunContext) -> dict[str, int]:
    counts = {"email": 0, "print": 0}
    with ctx.sessions.begin() as session:
        for record, doc in run_statements(ctx, session):
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


def render_pdfs(ctx: RunContext) -> dict[str, int]:
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
        for _, doc in run_statements(ctx, session):
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
        write_encrypted(batch_dir / name, data, keyring, print_context(ctx.run_id, name))
    return batch.pieces


def print_context(run_id: str, name: str) -> str:
    # Binds a print file to its run: a batch copied into another run does not decrypt there.
    return f"{run_id}:print/{name}"


def encrypted_context(path: Path) -> str:
    """The authenticated context of an encrypted run file, from its place in the run dir."""
    if path.parent.name == "pdf":
        return path.stem
    if path.parent.name == "print":
        return print_context(path.parent.parent.name, path.name)
    raise ValueError(
        f"{path.name}: not an encrypted file of the data directory (a run's PDF or print file, "
        "an archived drop, a kept bounce report)"
    )


def run_statements(ctx: RunContext, session: Session) -> Iterator[tuple[InputFile, StatementDoc]]:
    for record in run_files(session, ctx.run_id, "validated", kind="claims"):
        accepted = atrest_parquet.read_table(
            ctx.file_dir(record.file_id) / "accepted.parquet", ctx.keyring
        )
        for doc in build_statements(accepted, file_sha256=record.sha256):
            yield record, doc
