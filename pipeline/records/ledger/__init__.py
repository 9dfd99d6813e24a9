"""The delivery ledger: one database that owns delivery state.

`open_ledger(url)` migrates the schema to head (Alembic) and returns a session factory.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.records.ledger.models import AuditEvent, DeliverabilityAlert, Suppression

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Enforce foreign keys; WAL lets readers (datasets, console) run beside the sender.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_ledger(url: str) -> sessionmaker[Session]:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def audit(
    session: Session, action: str, entity_kind: str, entity_id: str, *, actor: str, detail: str = ""
) -> None:
    """Record an audit event. `detail` carries ids and counts, never PHI."""
    session.add(
        AuditEvent(
            at=datetime.now(UTC),
            actor=actor,
            action=action,
            entity_kind=entity_kind,
            entity_id=entity_id,
            detail=detail,
        )
    )


def is_suppressed(session: Session, address: str) -> bool:
    """Whether email to `address` is suppressed (the list is keyed by lower-cased address)."""
    return session.get(Suppression, address.lower()) is not None


def suppressed_among(session: Session, addresses: Collection[str]) -> set[str]:
    """The lower-cased addresses among `addresses` that are suppressed, in one query."""
    lowered = {a.lower() for a in addresses}
    if not lowered:
        return set()
    return set(session.scalars(select(Suppression.address).where(Suppression.address.in_(lowered))))


def paused_routes(session: Session) -> set[tuple[str, str]]:
    """(sending IP, provider) pairs the send stage must skip until acknowledged."""
    rows = session.execute(
        select(DeliverabilityAlert.source_ip, DeliverabilityAlert.provider).where(
            DeliverabilityAlert.kind == "bounce_rate_pause",
            DeliverabilityAlert.acknowledged_at.is_(None),
        )
    )
    return {(ip, provider) for ip, provider in rows}


def raise_alert(
    session: Session,
    kind: str,
    source_ip: str,
    provider: str,
    *,
    count: int,
    rate: float | None,
    actor: str,
) -> DeliverabilityAlert:
    """One open alert per kind, IP and provider (a recipient domain); a new occurrence adds
    its count (or, for a rate, replaces count and rate)."""
    alert = session.scalar(
        select(DeliverabilityAlert).where(
            DeliverabilityAlert.kind == kind,
            DeliverabilityAlert.source_ip == source_ip,
            DeliverabilityAlert.provider == provider,
            DeliverabilityAlert.acknowledged_at.is_(None),
        )
    )
    if alert is None:
        alert = DeliverabilityAlert(
            kind=kind,
            source_ip=source_ip,
            provider=provider,
            count=0,
            rate=rate,
            opened_at=datetime.now(UTC),
        )
        session.add(alert)
        session.flush()
        audit(
            session,
            "deliverability_alert",
            "alert",
            str(alert.alert_id),
            actor=actor,
            detail=f"kind={kind} ip={source_ip} provider={provider}",
        )
    alert.count = alert.count + count if rate is None else count
    alert.rate = rate
    return alert


def as_utc(at: datetime) -> datetime:
    """A ledger time as an aware UTC datetime: SQLite hands back naive ones (the ledger writes
    UTC), PostgreSQL aware ones."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)
