"""The delivery state machines, as data, and the one function that changes state.

A message row is one delivery attempt of one statement. A bounce never sends that message
again: it opens a resend case, whose own machine requires verification before a new attempt
(a new message row) may be planned.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from sqlalchemy.orm import Session

from pipeline.errors import IllegalTransition
from pipeline.ledger.models import Message, ResendCase, StateTransition


class MessageState(StrEnum):
    PLANNED = "planned"
    """Assigned an IP and waiting to be sent."""
    SENDING = "sending"
    """Handed to an SMTP transaction; the outcome is not known yet."""
    ACCEPTED = "accepted"
    """The receiving server answered 2xx to the end of DATA."""
    DEFERRED = "deferred"
    """A 4xx answer, or recovered from a crash mid-transaction: to be retried."""
    BOUNCED = "bounced"
    """A 5xx answer at SMTP time, or a DSN reporting failure later."""
    FALLBACK = "fallback"
    """The receiver offered no usable TLS: no PHI sent; the PHI-free notice or print instead."""
    EXPIRED = "expired"
    """Deferred for longer than the retry policy allows."""
    DELIVERED = "delivered"
    """A positive DSN confirmed delivery."""
    SUPPRESSED = "suppressed"
    """Never sent: the address was suppressed before the attempt."""


class CaseState(StrEnum):
    NEEDS_VERIFICATION = "needs_verification"
    """Opened by a bounce: operations must confirm the address by another channel."""
    VERIFIED = "verified"
    """The address (same or new) was confirmed; a resend may be approved."""
    UNREACHABLE = "unreachable"
    """The member could not be reached to verify the address."""
    RESEND_PLANNED = "resend_planned"
    """An approved resend has a new message planned."""
    RESENT = "resent"
    """The new attempt was accepted by the receiving server."""
    PRINT_FALLBACK = "print_fallback"
    """The statement goes to the mail vendor instead."""
    CLOSED = "closed"
    """Finished, with a reason."""


M, C = MessageState, CaseState
S = TypeVar("S", MessageState, CaseState)

MESSAGE_TRANSITIONS: dict[MessageState, frozenset[MessageState]] = {
    M.PLANNED: frozenset({M.SENDING, M.SUPPRESSED}),
    M.SENDING: frozenset({M.ACCEPTED, M.DEFERRED, M.BOUNCED, M.FALLBACK}),
    M.DEFERRED: frozenset({M.SENDING, M.EXPIRED, M.SUPPRESSED}),
    M.ACCEPTED: frozenset({M.BOUNCED, M.DELIVERED}),
    M.BOUNCED: frozenset(),
    M.EXPIRED: frozenset(),
    M.FALLBACK: frozenset(),
    M.DELIVERED: frozenset(),
    M.SUPPRESSED: frozenset(),
}

CASE_TRANSITIONS: dict[CaseState, frozenset[CaseState]] = {
    C.NEEDS_VERIFICATION: frozenset({C.VERIFIED, C.UNREACHABLE, C.PRINT_FALLBACK, C.CLOSED}),
    C.VERIFIED: frozenset({C.RESEND_PLANNED, C.PRINT_FALLBACK, C.CLOSED}),
    C.UNREACHABLE: frozenset({C.PRINT_FALLBACK, C.CLOSED}),
    C.RESEND_PLANNED: frozenset({C.RESENT, C.NEEDS_VERIFICATION, C.PRINT_FALLBACK}),
    # A resent message can bounce too: verify again, or print after repeated failure.
    C.RESENT: frozenset({C.CLOSED, C.NEEDS_VERIFICATION, C.PRINT_FALLBACK}),
    C.PRINT_FALLBACK: frozenset({C.CLOSED}),
    C.CLOSED: frozenset(),
}


def transition_message(
    session: Session, message: Message, to: MessageState, *, actor: str, reason: str = ""
) -> None:
    """Move `message` to `to`, recording the transition; raise IllegalTransition otherwise."""
    from_state = MessageState(message.state)
    at = _check_and_record(
        session, "message", message.message_id, MESSAGE_TRANSITIONS, from_state, to, actor, reason
    )
    message.state, message.updated_at = to, at


def transition_case(
    session: Session, case: ResendCase, to: CaseState, *, actor: str, reason: str = ""
) -> None:
    """Move `case` to `to`, recording the transition; raise IllegalTransition otherwise."""
    from_state = CaseState(case.state)
    at = _check_and_record(
        session, "case", case.case_id, CASE_TRANSITIONS, from_state, to, actor, reason
    )
    case.state, case.updated_at = to, at


def _check_and_record(
    session: Session,
    kind: str,
    entity_id: str,
    table: Mapping[S, frozenset[S]],
    from_state: S,
    to: S,
    actor: str,
    reason: str,
) -> datetime:
    """Raise unless `table` allows from_state -> to; else record it and return its time."""
    if to not in table[from_state]:
        raise IllegalTransition(kind, entity_id, from_state, to)
    at = datetime.now(UTC)
    session.add(
        StateTransition(
            entity_kind=kind,
            entity_id=entity_id,
            from_state=from_state,
            to_state=to,
            at=at,
            actor=actor,
            reason=reason,
        )
    )
    return at
