"""What the send stage writes to the ledger for each SMTP outcome."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, update
from sqlalchemy.orm import Session

from pipeline.delivery.policy import SendingPolicy
from pipeline.delivery.send import Outcome, SendResult
from pipeline.delivery.shaping import recipient_domain
from pipeline.records.bounce_classes import ReportKind, smtp_rejection
from pipeline.records.ledger import as_utc, audit, raise_alert
from pipeline.records.ledger.models import Bounce, Message, Statement
from pipeline.records.ledger.states import (
    MessageState,
    mark_resend_accepted,
    transition_message,
)

ACTOR = "send"


def hold(session: Session, held: Sequence[SendResult]) -> None:
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


def record_result(
    session: Session, message: Message, result: SendResult, policy: SendingPolicy
) -> str:
    """Record one outcome; returns what it counts as (the outcome, or expired when a deferral
    outlived the retry policy)."""
    now = datetime.now(UTC)
    message.smtp_code, message.smtp_reply = result.code, result.reply
    if result.possible_duplicate:
        message.possible_duplicate = True
    reason = (
        result.reply if result.outcome == Outcome.FAILED else f"SMTP {result.code or 'no reply'}"
    )
    transition_message(session, message, MessageState(result.outcome), actor=ACTOR, reason=reason)
    if result.outcome == Outcome.BOUNCED:
        _record_smtp_rejection(session, message, result)
    elif result.outcome == Outcome.ACCEPTED:
        mark_resend_accepted(session, message)
    elif result.outcome == Outcome.FAILED:
        _record_failure(session, message, result)
    elif result.outcome == Outcome.FALLBACK:
        notified = result.code is not None and 200 <= result.code < 300
        if policy.tls_fallback == "print" or not notified:
            session.get_one(Statement, message.statement_id).channel = "print"
    elif result.outcome == Outcome.DEFERRED:
        delay = policy.retry.delay(message.tries, result.retry_after)
        message.next_attempt_at = now + timedelta(seconds=delay)
        if (
            message.next_attempt_at - as_utc(message.created_at)
        ).total_seconds() > policy.retry.max_age_seconds:
            transition_message(
                session, message, MessageState.EXPIRED, actor=ACTOR, reason="retry max age"
            )
            return "expired"
    return result.outcome.value


def _record_failure(session: Session, message: Message, result: SendResult) -> None:
    """A message that cannot be sent by email: operations are alerted (one open
    `message_failed` alert per IP and recipient domain, counting its messages, and an audit
    event per message) and the statement goes to print, the member's path to it."""
    session.get_one(Statement, message.statement_id).channel = "print"
    detail = f"statement={message.statement_id} channel=print reason={result.reply}"
    audit(session, "message_failed", "message", message.message_id, actor=ACTOR, detail=detail)
    domain = recipient_domain(message.recipient)
    raise_alert(
        session, "message_failed", message.source_ip, domain, count=1, rate=None, actor=ACTOR
    )


def _record_smtp_rejection(session: Session, message: Message, result: SendResult) -> None:
    """A 5xx at SMTP time flows into the same bounce path as a DSN."""
    status, bounce_class = smtp_rejection(result.code or 0, result.reply, result.smtp_stage)
    session.add(
        Bounce(
            dedupe_key=f"smtp:{message.message_id}",
            message_id=message.message_id,
            received_at=datetime.now(UTC),
            bounce_class=bounce_class,
            status_code=status,
            diagnostic=f"smtp; {result.code} {result.reply}",
            recipient=message.recipient,
            kind=ReportKind.SMTP,
            matched_by="smtp",
        )
    )
