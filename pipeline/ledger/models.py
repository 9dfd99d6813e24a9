"""Ledger tables (SQLAlchemy 2). Schema changes go through Alembic migrations only.

State columns are written by pipeline.ledger.states alone.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Numeric,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TZ = DateTime(timezone=True)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    # Where the drop was read from (a folder path, never a record value).
    drop: Mapped[str] = mapped_column(Text)


class InputFile(Base):
    """A claims file, registered once by content hash."""

    __tablename__ = "input_files"
    file_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    file_name: Mapped[str] = mapped_column(Text)
    insurer: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"))
    registered_at: Mapped[datetime] = mapped_column(TZ)
    # registered -> validated | rejected
    status: Mapped[str] = mapped_column(String(20))
    rows_in: Mapped[int | None]
    rows_accepted: Mapped[int | None]
    rows_quarantined: Mapped[int | None]
    rejection_reason: Mapped[str | None] = mapped_column(Text)


class Statement(Base):
    """One member's EOB for one input file."""

    __tablename__ = "statements"
    statement_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("input_files.file_id"))
    member_id: Mapped[str] = mapped_column(String(100))
    # email or print
    channel: Mapped[str] = mapped_column(String(10))
    email: Mapped[str | None] = mapped_column(Text)
    claim_lines: Mapped[int]
    member_owes: Mapped[Decimal] = mapped_column(Numeric(14, 2))
    # Relative to the run directory; set once the PDF is on disk.
    pdf_path: Mapped[str | None] = mapped_column(Text)
    # Language of the document and email (en, es); the email may greet by first name.
    language: Mapped[str | None] = mapped_column(String(8))
    first_name: Mapped[str | None] = mapped_column(Text)
    # The PDF is password protected (the email then tells the member the password rule).
    pdf_protected: Mapped[bool] = mapped_column(default=False)


class Message(Base):
    """One delivery attempt of one statement to one address."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("statement_id", "attempt"),)
    # Also the VERP token and the Message-ID's local part.
    message_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    statement_id: Mapped[str] = mapped_column(ForeignKey("statements.statement_id"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    attempt: Mapped[int]
    # The resend case that approved this attempt, for attempts after the first.
    case_id: Mapped[str | None] = mapped_column(ForeignKey("resend_cases.case_id"))
    recipient: Mapped[str] = mapped_column(Text)
    source_ip: Mapped[str] = mapped_column(String(45))
    ehlo_name: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), index=True)
    created_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)
    smtp_code: Mapped[int | None]
    # Reply text can name the address: PHI, kept in the ledger only.
    smtp_reply: Mapped[str | None] = mapped_column(Text)
    # Set when a crash left the attempt's outcome unknown and it was tried again.
    possible_duplicate: Mapped[bool] = mapped_column(default=False)


class Bounce(Base):
    """A bounce, DSN or SMTP-time rejection, matched to its message where possible."""

    __tablename__ = "bounces"
    bounce_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # Hash of the raw report plus recipient: a report is processed once per recipient.
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)
    message_id: Mapped[str | None] = mapped_column(ForeignKey("messages.message_id"), index=True)
    received_at: Mapped[datetime] = mapped_column(TZ)
    bounce_class: Mapped[str] = mapped_column(String(20))
    status_code: Mapped[str | None] = mapped_column(String(16))
    diagnostic: Mapped[str | None] = mapped_column(Text)
    recipient: Mapped[str | None] = mapped_column(Text)
    reconciled: Mapped[bool] = mapped_column(default=False)


class Suppression(Base):
    __tablename__ = "suppressions"
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    reason: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(TZ)
    bounce_id: Mapped[int | None] = mapped_column(ForeignKey("bounces.bounce_id"))


class ResendCase(Base):
    """Verify-before-resend: opened by a bounce, never resent without verification."""

    __tablename__ = "resend_cases"
    case_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.message_id", use_alter=True, name="fk_resend_cases_message_id"),
        unique=True,
    )
    statement_id: Mapped[str] = mapped_column(ForeignKey("statements.statement_id"))
    state: Mapped[str] = mapped_column(String(30), index=True)
    opened_at: Mapped[datetime] = mapped_column(TZ)
    updated_at: Mapped[datetime] = mapped_column(TZ)
    reason: Mapped[str] = mapped_column(Text)


class StateTransition(Base):
    """Every state change of a message or case: who, when, from, to, why."""

    __tablename__ = "state_transitions"
    __table_args__ = (Index("ix_state_transitions_entity", "entity_kind", "entity_id"),)
    transition_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    entity_kind: Mapped[str] = mapped_column(String(10))
    entity_id: Mapped[str] = mapped_column(String(40))
    from_state: Mapped[str] = mapped_column(String(30))
    to_state: Mapped[str] = mapped_column(String(30))
    at: Mapped[datetime] = mapped_column(TZ)
    actor: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)


class AuditEvent(Base):
    """An action worth an auditor's attention; ids only in `detail`, never PHI."""

    __tablename__ = "audit_events"
    event_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(TZ)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(60))
    entity_kind: Mapped[str] = mapped_column(String(20))
    entity_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
