"""Reconcile stage: act on classified bounces. Nothing is ever resent from here.

A hard bounce suppresses the address and opens a resend case in needs_verification; the
message itself stays bounced. Other classes are recorded for review (their policies come with
the bounce-reconciliation work).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.bounces import BounceClass
from pipeline.ledger import audit
from pipeline.ledger.models import Bounce, Message, ResendCase, Suppression
from pipeline.ledger.states import CaseState, MessageState, transition_message

ACTOR = "reconcile"


def case_id_for(message_id: str) -> str:
    return "c" + hashlib.sha256(message_id.encode()).hexdigest()[:24]


def reconcile_bounce(session: Session, bounce: Bounce) -> bool:
    """Apply the policy for one matched bounce; True when a resend case was opened."""
    bounce.reconciled = True
    message = session.get(Message, bounce.message_id) if bounce.message_id else None
    if message is None:
        audit(session, "bounce_unmatched", "bounce", str(bounce.bounce_id), actor=ACTOR)
        return False
    if bounce.bounce_class != BounceClass.HARD_BOUNCE:
        audit(session, f"bounce_{bounce.bounce_class}", "message", message.message_id, actor=ACTOR)
        return False
    if message.state == MessageState.ACCEPTED:
        transition_message(
            session,
            message,
            MessageState.BOUNCED,
            actor=ACTOR,
            reason=f"DSN {bounce.status_code or 'without status'}",
        )
    _suppress(session, message.recipient, bounce)
    return _open_case(session, message, bounce)


def _suppress(session: Session, address: str, bounce: Bounce) -> None:
    key = address.lower()
    if session.get(Suppression, key) is None:
        session.add(
            Suppression(
                address=key,
                reason=bounce.bounce_class,
                created_at=datetime.now(UTC),
                bounce_id=bounce.bounce_id,
            )
        )
        audit(session, "address_suppressed", "message", bounce.message_id or "", actor=ACTOR)


def _open_case(session: Session, message: Message, bounce: Bounce) -> bool:
    case_id = case_id_for(message.message_id)
    if session.scalar(select(ResendCase).where(ResendCase.case_id == case_id)) is not None:
        return False
    now = datetime.now(UTC)
    session.add(
        ResendCase(
            case_id=case_id,
            message_id=message.message_id,
            statement_id=message.statement_id,
            state=CaseState.NEEDS_VERIFICATION,
            opened_at=now,
            updated_at=now,
            reason=f"{bounce.bounce_class} {bounce.status_code or ''}".strip(),
        )
    )
    audit(
        session,
        "resend_case_opened",
        "case",
        case_id,
        actor=ACTOR,
        detail=f"message={message.message_id}",
    )
    return True
