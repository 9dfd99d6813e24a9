"""Deadlines: no failed statement waits without an owner.

Reconcile acts on what a bounce says; some failures say too little to act on at once, or come
from the send loop with no bounce at all. The sweep, run by the returns loop after reconcile,
gives the statement of every failed latest attempt a verify-before-resend case (or, for a resend
that fell back to no TLS, print) once the reconcile policy's wait for it has passed:

- an `unknown` failure not reclassified within `unknown_review_hours`;
- a policy block not acknowledged within `policy_block_ack_hours` (a requeued attempt blocked
  again: at once);
- a soft bounce past the soft limit's age, when no further bounce came to reach the count;
- an attempt the send loop expired or found suppressed, and a resend that failed in any way
  (today its case would stay `resend_planned`): at once.

An open case nobody moved on within `case_due_hours` sends its statement to print. Operations
reclassify an `unknown` report (audited); reconcile then applies its new class.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from pipeline.records.bounce_classes import RECLASSIFY_TO, BounceClass
from pipeline.records.ledger import as_utc, audit
from pipeline.records.ledger.models import Bounce, Message, ResendCase, Statement
from pipeline.records.ledger.states import (
    CaseState,
    MessageState,
    transition_case,
    transition_message,
)
from pipeline.returns import cases, reconcile
from pipeline.returns.reconcile import Policy

ACTOR = "deadlines"
FAILURES = (
    BounceClass.HARD_BOUNCE,
    BounceClass.SOFT_BOUNCE,
    BounceClass.POLICY_BLOCK,
    BounceClass.UNKNOWN,
)
# Cases that wait on operations; a resend_planned case waits on its attempt's outcome.
WAITING = (CaseState.NEEDS_VERIFICATION, CaseState.VERIFIED, CaseState.UNREACHABLE)
# A resend's case still counting on that resend.
COUNTING_ON_RESEND = (CaseState.RESEND_PLANNED, CaseState.RESENT)
# Latest attempts the send loop ended without a delivery.
ENDED_UNSENT = (MessageState.BOUNCED, MessageState.EXPIRED, MessageState.SUPPRESSED)


def case_due_at(case: ResendCase, policy: Policy) -> datetime | None:
    """When a case waiting on operations goes to print if nobody moves it on; None for one
    that waits on its resend's outcome (the sweep reopens it when that fails), is printed or
    closed."""
    if case.state not in WAITING:
        return None
    return as_utc(case.updated_at) + policy.case_due


def sweep(session: Session, policy: Policy, now: datetime | None = None) -> dict[str, int]:
    now = now or datetime.now(UTC)
    counts = {"failures_escalated": 0, "overdue_cases_printed": 0}
    for message in _unowned_failures(session):
        due = _due(session, message, policy)
        if due is not None and due[0] <= now:
            _escalate(session, message, due[1], policy)
            counts["failures_escalated"] += 1
    overdue = select(ResendCase).where(
        ResendCase.state.in_(WAITING), ResendCase.updated_at <= now - policy.case_due
    )
    for case in session.scalars(overdue).all():
        transition_case(
            session, case, CaseState.PRINT_FALLBACK, actor=ACTOR, reason="not resolved in time"
        )
        audit(session, "case_routed_to_print", "case", case.case_id, actor=ACTOR)
        counts["overdue_cases_printed"] += 1
    return counts


def _unowned_failures(session: Session) -> list[Message]:
    """Latest attempts that failed or have a failure reported, whose statement no case or
    print owns yet."""
    latest = (
        select(Message.statement_id, func.max(Message.attempt).label("attempt"))
        .group_by(Message.statement_id)
        .subquery()
    )
    resend_case = aliased(ResendCase)
    reported = exists().where(
        Bounce.message_id == Message.message_id,
        Bounce.bounce_class.in_([str(c) for c in FAILURES]),
    )
    query = (
        select(Message)
        .join(
            latest,
            and_(
                latest.c.statement_id == Message.statement_id, latest.c.attempt == Message.attempt
            ),
        )
        .join(Statement, Statement.statement_id == Message.statement_id)
        .outerjoin(resend_case, resend_case.case_id == Message.case_id)
        .where(
            ~exists().where(ResendCase.message_id == Message.message_id),
            or_(
                # A first attempt or a requeue: owned once its statement goes to print.
                and_(Message.case_id.is_(None), Statement.channel == "email"),
                resend_case.state.in_(COUNTING_ON_RESEND),
            ),
            or_(
                Message.state.in_(ENDED_UNSENT),
                # A resend that fell back to no TLS; a first attempt's fallback sent the
                # PHI-free notice or moved the statement to print (delivery's steps).
                and_(Message.state == MessageState.FALLBACK, Message.case_id.is_not(None)),
                and_(Message.state == MessageState.ACCEPTED, reported),
            ),
        )
        .order_by(Message.message_id)
    )
    return list(session.scalars(query).all())


def _due(session: Session, message: Message, policy: Policy) -> tuple[datetime, str] | None:
    """When the attempt's failure is due a case, and why; None while none is (a delivered
    report or no failure)."""
    ended = as_utc(message.updated_at)
    if message.case_id is not None and message.state != MessageState.ACCEPTED:
        return ended, f"resend {message.state}"
    if message.state in (MessageState.EXPIRED, MessageState.SUPPRESSED):
        return ended, str(message.state)
    requeued = message.attempt > 1 and message.case_id is None
    first_sent = session.scalar(
        select(func.min(Message.created_at)).where(Message.statement_id == message.statement_id)
    )
    assert first_sent is not None
    waits = {
        BounceClass.HARD_BOUNCE: timedelta(0),
        BounceClass.POLICY_BLOCK: timedelta(0) if requeued else policy.policy_block_ack,
        BounceClass.UNKNOWN: policy.unknown_review,
    }
    dues = []
    for bounce in session.scalars(
        select(Bounce).where(
            Bounce.message_id == message.message_id,
            Bounce.bounce_class.in_([str(c) for c in FAILURES]),
        )
    ):
        cls = BounceClass(bounce.bounce_class)
        if cls == BounceClass.SOFT_BOUNCE:
            at = as_utc(first_sent) + policy.soft_max_age
        else:
            at = as_utc(bounce.received_at) + waits[cls]
        dues.append((at, f"{cls} not resolved in time"))
    if not dues and message.state == MessageState.BOUNCED:
        return ended, "bounced"
    return min(dues) if dues else None


def _escalate(session: Session, message: Message, reason: str, policy: Policy) -> None:
    audit(session, "failure_escalated", "message", message.message_id, actor=ACTOR, detail=reason)
    if message.state == MessageState.ACCEPTED:
        transition_message(session, message, MessageState.BOUNCED, actor=ACTOR, reason=reason)
    if message.case_id is not None and message.state == MessageState.FALLBACK:
        # No TLS at the verified address either: paper, not another round of verification.
        case = session.get_one(ResendCase, message.case_id)
        transition_case(session, case, CaseState.PRINT_FALLBACK, actor=ACTOR, reason=reason)
        audit(session, "case_routed_to_print", "case", case.case_id, actor=ACTOR)
        return
    reconcile.open_or_reopen_case(session, message, reason, policy)


def reclassify(session: Session, bounce_id: int, to: BounceClass, *, actor: str) -> Bounce:
    """Operations read an `unknown` report and say what it was; the next reconcile applies it."""
    bounce = session.get(Bounce, bounce_id)
    if bounce is None or bounce.bounce_class != BounceClass.UNKNOWN:
        raise cases.CaseActionRefused(f"bounce {bounce_id}: not found or not unknown")
    if to not in RECLASSIFY_TO:
        raise cases.CaseActionRefused(f"bounce {bounce_id}: cannot be reclassified as {to}")
    bounce.bounce_class, bounce.reconciled = to, False
    audit(
        session,
        "bounce_reclassified",
        "bounce",
        str(bounce_id),
        actor=actor,
        detail=f"from=unknown to={to}",
    )
    return bounce
