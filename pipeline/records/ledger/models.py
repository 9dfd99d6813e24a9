"""Ledger tables (SQLAlchemy 2). Schema changes go through Alembic migrations only.

State columns are written by pipeline.records.ledger.states alone.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Float,
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


class RunStage(Base):
    """A stage a run is to do (in the order of pipeline.stages); `completed_at` is set when the
    stage's step returned. What comes after the last completed one is what `eob resume` does."""

    __tablename__ = "run_stages"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(20), primary_key=True)
    completed_at: Mapped[datetime | None] = mapped_column(TZ)


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
    # claims or roster
    kind: Mapped[str] = mapped_column(String(10), server_default="claims")
    # 1 for the first file of this name from this insurer; new content under an old name counts up.
    version: Mapped[int] = mapped_column(server_default="1")
    # Where the original went once processed (archive/<insurer>/<date>/...); never deleted.
    archived_path: Mapped[str | None] = mapped_column(Text)


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
    # Provider the recipient rolls up to (shaping lane) and the day the planner gave it.
    provider: Mapped[str | None] = mapped_column(String(20))
    send_day: Mapped[date | None] = mapped_column(Date, index=True)
    # Not before this time (retry back-off, a server's hint or a suspended lane).
    next_attempt_at: Mapped[datetime | None] = mapped_column(TZ)
    # SMTP transactions started for this attempt (deferrals retry the same message).
    tries: Mapped[int] = mapped_column(default=0, server_default="0")
    # The deliver pass that last claimed it: a `sending` message is recovered only once that
    # pass is gone (pipeline.delivery.claims).
    claimed_by: Mapped[str | None] = mapped_column(String(40))


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
    # dsn, arf, auto_reply, non_standard, smtp, not_bounce (pipeline.returns.bounces.ReportKind).
    kind: Mapped[str] = mapped_column(String(20), default="dsn")
    # How it was matched: verp, message_id, or none (then it waits on the review list).
    matched_by: Mapped[str] = mapped_column(String(20), default="none")
    # sha256 of the raw report kept encrypted in the archive (none for SMTP-time rejections);
    # a report with a row here has been processed.
    raw_sha256: Mapped[str | None] = mapped_column(String(64), index=True)


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
    # The verification: channel (phone, secure_sms, portal, mail), evidence note, who, when,
    # and the confirmed address (PHI: ledger only).
    verified_channel: Mapped[str | None] = mapped_column(String(20))
    verified_evidence: Mapped[str | None] = mapped_column(Text)
    verified_by: Mapped[str | None] = mapped_column(String(100))
    verified_at: Mapped[datetime | None] = mapped_column(TZ)
    verified_address: Mapped[str | None] = mapped_column(Text)
    approved_by: Mapped[str | None] = mapped_column(String(100))
    approved_at: Mapped[datetime | None] = mapped_column(TZ)
    # Bounces that reopened this case after a resend: past the policy's limit, print.
    failures: Mapped[int] = mapped_column(default=1)


class Incident(Base):
    """A suspected misdelivery: a breach assessment is due within 60 days."""

    __tablename__ = "incidents"
    incident_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    case_id: Mapped[str | None] = mapped_column(ForeignKey("resend_cases.case_id"))
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.message_id"))
    opened_at: Mapped[datetime] = mapped_column(TZ)
    due_at: Mapped[datetime] = mapped_column(TZ)
    opened_by: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)
    closed_at: Mapped[datetime | None] = mapped_column(TZ)


class DeliverabilityAlert(Base):
    """Policy blocks or a bounce rate over a threshold, per sending IP and provider."""

    __tablename__ = "deliverability_alerts"
    __table_args__ = (UniqueConstraint("kind", "source_ip", "provider", "opened_at"),)
    alert_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    # policy_block, bounce_rate_warn, bounce_rate_pause
    kind: Mapped[str] = mapped_column(String(30))
    source_ip: Mapped[str] = mapped_column(String(45))
    # The recipient domain's provider (the domain itself; no address).
    provider: Mapped[str] = mapped_column(String(255))
    count: Mapped[int]
    rate: Mapped[float | None] = mapped_column(Float)
    opened_at: Mapped[datetime] = mapped_column(TZ)
    acknowledged_by: Mapped[str | None] = mapped_column(String(100))
    acknowledged_at: Mapped[datetime | None] = mapped_column(TZ)


class ConsoleUser(Base):
    """An operations console login; the password is stored as an Argon2 hash only."""

    __tablename__ = "console_users"
    username: Mapped[str] = mapped_column(String(100), primary_key=True)
    password_hash: Mapped[str] = mapped_column(Text)
    # viewer, operator, approver
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(TZ)


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
