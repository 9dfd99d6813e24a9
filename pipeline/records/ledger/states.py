"""The delivery state machines, as data, and the one function that changes state.

A message row is one delivery attempt of one statement. A bounce never sends that message
again: it opens a resend case, whose own machine requires verification before a new attempt
(a new message row) may be planned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy.orm import Session

from pipeline.errors import IllegalTransition
from pipeline.records.ledger.models import Message, ResendCase, StateTransition


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
    FAILED = "failed"
    """Never sent: the message could not be composed (its PDF missing or undecryptable) or the
    server cannot take its address; an alert is raised and the statement goes to print."""


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
    M.PLANNED: frozenset({M.SENDING, M.SUPPRESSED, M.FAILED}),
    M.SENDING: frozenset({M.ACCEPTED, M.DEFERRED, M.BOUNCED, M.FALLBACK, M.FAILED}),
    M.DEFERRED: frozenset({M.SENDING, M.EXPIRED, M.SUPPRESSED, M.FAILED}),
    M.ACCEPTED: frozenset({M.BOUNCED, M.DELIVERED}),
    M.BOUNCED: frozenset(),
    M.EXPIRED: frozenset(),
    M.FALLBACK: frozenset(),
    M.DELIVERED: frozenset(),
    M.SUPPRESSED: frozenset(),
    M.FAILED: frozenset(),
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


@dataclass(frozen=True)
class MessageMove:
    """One message of a bulk transition: the state it must be in now, and what to record."""

    message_id: str
    from_state: MessageState
    reason: str = ""
    # Other columns of the message row set with its new state, e.g. smtp_code; every move of
    # one transition_messages call sets the same columns.
    values: Mapping[str, Any] = field(default_factory=dict)


def transition_messages(
    session: Session, moves: Sequence[MessageMove], to: MessageState, *, actor: str
) -> None:
    """Move many messages to `to` with one UPDATE and one INSERT (executemany), recording a
    transition each: the send stage's hot path, where loading and flushing each row through
    the ORM cost more than a millisecond per message. Raise IllegalTransition when the state
    machine forbids a move or a row is no longer in its `from_state`."""
    if not moves:
        return
    for move in moves:
        if to not in MESSAGE_TRANSITIONS[move.from_state]:
            raise IllegalTransition("message", move.message_id, move.from_state, to)
    at = datetime.now(UTC)
    columns = list(moves[0].values)
    # The table itself: an ORM update with a parameter list would be a bulk update by key,
    # which cannot also require the current state.
    table = cast(Table, Message.__table__)
    statement = (
        update(table)
        .where(table.c.message_id == bindparam("m_id"), table.c.state == bindparam("m_from"))
        .values(state=to, updated_at=at, **{c: bindparam(f"m_{c}") for c in columns})
    )
    params = [
        {"m_id": m.message_id, "m_from": m.from_state, **{f"m_{c}": m.values[c] for c in columns}}
        for m in moves
    ]
    changed = session.execute(statement, params).rowcount  # type: ignore[attr-defined]
    if changed != len(moves):
        raise IllegalTransition(
            "message", f"({len(moves) - changed} of a batch)", "a state changed meanwhile", to
        )
    session.execute(
        insert(StateTransition),
        [
            dict(entity_kind="message", entity_id=m.message_id, from_state=m.from_state,
                 to_state=to, at=at, actor=actor, reason=m.reason)
            for m in moves
        ],
    )  # fmt: skip


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


def mark_resend_accepted(session: Session, message: Message, *, actor: str = "send") -> None:
    """A resend's acceptance moves its case to resent (the send loop records it; the case
    belongs to returns, which the send loop does not import)."""
    if message.case_id is None:
        return
    case = session.get_one(ResendCase, message.case_id)
    if case.state == CaseState.RESEND_PLANNED:
        transition_case(
            session,
            case,
            CaseState.RESENT,
            actor=actor,
            reason=f"message {message.message_id} accepted",
        )
