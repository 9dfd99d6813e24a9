"""Datasets stage: delivery facts and audit events as Hive-partitioned parquet for analysts.

Both datasets carry ids, states, codes and times, never PHI (no names, addresses or member
ids). Their schemas are documented in schemas/delivery_facts.json and schemas/audit_events.json.
Each write regenerates the datasets from the ledger, so late bounces update earlier runs.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from pipeline.records.contracts import load_contract
from pipeline.records.ledger.models import AuditEvent, Bounce, Message, Run, StateTransition
from pipeline.records.ledger.states import MessageState
from pipeline.records.run_context import LedgerContext


def write_delivery_facts(session: Session, out_dir: Path) -> int:
    accepted = aliased(StateTransition)
    first_accepted = (
        select(accepted.entity_id, func.min(accepted.at).label("accepted_at"))
        .where(accepted.entity_kind == "message", accepted.to_state == MessageState.ACCEPTED)
        .group_by(accepted.entity_id)
        .subquery()
    )
    bounce_class = (
        select(
            Bounce.message_id,
            func.max(Bounce.bounce_class).label("bounce_class"),
            func.max(Bounce.status_code).label("bounce_status"),
        )
        .group_by(Bounce.message_id)
        .subquery()
    )
    rows = session.execute(
        select(
            func.date(Run.started_at).label("run_date"),
            Message.run_id,
            Message.message_id,
            Message.statement_id,
            Message.attempt,
            Message.source_ip,
            Message.state,
            Message.smtp_code,
            Message.possible_duplicate,
            Message.created_at,
            first_accepted.c.accepted_at,
            bounce_class.c.bounce_class,
            bounce_class.c.bounce_status,
        )
        .join(Run, Run.run_id == Message.run_id)
        .outerjoin(first_accepted, first_accepted.c.entity_id == Message.message_id)
        .outerjoin(bounce_class, bounce_class.c.message_id == Message.message_id)
        .order_by(Message.run_id, Message.message_id)
    ).all()
    table = pa.Table.from_pylist(
        [dict(row._mapping, run_date=str(row.run_date)) for row in rows],
        schema=load_contract("delivery_facts").schema,
    )
    _write(table, out_dir / "delivery_facts", "run_date")
    return int(table.num_rows)


def write_audit_events(session: Session, out_dir: Path) -> int:
    transitions = [
        {
            "at": t.at,
            "actor": t.actor,
            "action": f"{t.from_state}->{t.to_state}",
            "entity_kind": t.entity_kind,
            "entity_id": t.entity_id,
            "detail": t.reason,
        }
        for t in session.scalars(select(StateTransition).order_by(StateTransition.transition_id))
    ]
    events = [
        {
            "at": e.at,
            "actor": e.actor,
            "action": e.action,
            "entity_kind": e.entity_kind,
            "entity_id": e.entity_id,
            "detail": e.detail,
        }
        for e in session.scalars(select(AuditEvent).order_by(AuditEvent.event_id))
    ]
    schema = load_contract("audit_events").schema
    table = pa.Table.from_pylist(transitions + events, schema=schema.remove(0))
    table = table.add_column(0, schema.field(0), pc.strftime(table["at"], format="%Y-%m-%d"))
    _write(table.sort_by("at"), out_dir / "audit_events", "event_date")
    return int(table.num_rows)


def _write(table: pa.Table, path: Path, partition_column: str) -> None:
    ds.write_dataset(
        table,
        path,
        format="parquet",
        partitioning=ds.partitioning(
            pa.schema([table.schema.field(partition_column)]), flavor="hive"
        ),
        basename_template="part-{i}.parquet",
        # Every partition the ledger knows is written whole: replace, never append.
        existing_data_behavior="delete_matching",
    )


def write_datasets(ctx: LedgerContext) -> dict[str, int]:
    with ctx.sessions() as session:
        out = ctx.settings.datasets_dir
        return {
            "delivery_facts": write_delivery_facts(session, out),
            "audit_events": write_audit_events(session, out),
        }
