"""Verify-before-resend: the actions operations take on a resend case.

needs_verification -> verified | unreachable; verified + approval (by someone other than the
verifier) -> the next run's plan stage makes a NEW message row (attempt n+1, case_id set) to the
verified address -> resend_planned -> resent when accepted -> closed; print_fallback from any
open state. Every action checks the state machine (pipeline.records.ledger.states), records who and
when on the case, and writes an audit event with ids only. Nothing here sends anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.delivery.plan import NewMessage, add_planned_messages
from pipeline.delivery.policy import DEFAULT_PROVIDER, SendingPolicy
from pipeline.delivery.shaping import recipient_domain
from pipeline.errors import LedgerError
from pipeline.records.ledger import audit, is_suppressed
from pipeline.records.ledger.models import Incident, Message, ResendCase, Statement
from pipeline.records.ledger.states import CaseState, transition_case

CHANNELS = ("phone", "secure_sms", "portal", "mail")
# HIPAA breach assessment window for a suspected misdelivery.
INCIDENT_DUE = timedelta(days=60)


class CaseActionRefused(LedgerError):
    """An action the case's state, the policy or the actor's identity does not allow."""


@dataclass(frozen=True)
class CasePolicy:
    # The resend approver must differ from the verifier (four eyes).
    require_different_approver: bool = True
    # Resends that bounced again before the case goes to print instead.
    max_failures: int = 2


def get_case(session: Session, case_id: str) -> ResendCase:
    case = session.get(ResendCase, case_id)
    if case is None:
        raise CaseActionRefused(f"case {case_id}: not found")
    return case


def verify(
    session: Session, case_id: str, *, actor: str, channel: str, evidence: str, address: str
) -> ResendCase:
    """Record a verification by another channel and the confirmed (same or new) address."""
    case = get_case(session, case_id)
    if channel not in CHANNELS:
        raise CaseActionRefused(f"case {case_id}: channel must be one of {', '.join(CHANNELS)}")
    if not evidence.strip():
        raise CaseActionRefused(f"case {case_id}: an evidence note is required")
    try:
        normalized = validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError as err:
        # The message names the rule broken, never the value.
        raise CaseActionRefused(f"case {case_id}: verified address is not valid") from err
    transition_case(session, case, CaseState.VERIFIED, actor=actor, reason=f"via {channel}")
    case.verified_channel, case.verified_evidence = channel, evidence.strip()
    case.verified_by, case.verified_at = actor, datetime.now(UTC)
    case.verified_address = normalized
    case.approved_by = case.approved_at = None
    same = normalized.lower() == _bounced_recipient(session, case).lower()
    audit(
        session,
        "case_verified",
        "case",
        case_id,
        actor=actor,
        detail=f"channel={channel} address={'same' if same else 'new'}",
    )
    return case


def mark_unreachable(session: Session, case_id: str, *, actor: str, note: str) -> ResendCase:
    return _move(session, case_id, CaseState.UNREACHABLE, "case_unreachable", actor, note)


def approve(
    session: Session, case_id: str, *, actor: str, policy: CasePolicy = CasePolicy()
) -> ResendCase:
    """Approve the resend of a verified case; the next plan stage makes the new attempt."""
    case = get_case(session, case_id)
    if case.state != CaseState.VERIFIED or case.verified_address is None:
        raise CaseActionRefused(f"case {case_id}: only a verified case can be approved")
    if policy.require_different_approver and actor == case.verified_by:
        raise CaseActionRefused(f"case {case_id}: the approver must not be the verifier")
    if is_suppressed(session, case.verified_address):
        raise CaseActionRefused(
            f"case {case_id}: the verified address is suppressed; verify another or print"
        )
    case.approved_by, case.approved_at = actor, datetime.now(UTC)
    audit(session, "case_approved", "case", case_id, actor=actor)
    return case


def route_to_print(session: Session, case_id: str, *, actor: str, reason: str) -> ResendCase:
    return _move(session, case_id, CaseState.PRINT_FALLBACK, "case_routed_to_print", actor, reason)


def close(session: Session, case_id: str, *, actor: str, reason: str) -> ResendCase:
    return _move(session, case_id, CaseState.CLOSED, "case_closed", actor, reason)


def _move(
    session: Session, case_id: str, to: CaseState, action: str, actor: str, reason: str
) -> ResendCase:
    """An operator's state change of a case, with its audit event."""
    case = get_case(session, case_id)
    transition_case(session, case, to, actor=actor, reason=reason)
    audit(session, action, "case", case_id, actor=actor)
    return case


def open_incident(
    session: Session, message_id: str, *, actor: str, reason: str, case_id: str | None = None
) -> Incident:
    """A suspected misdelivery: the breach assessment is due in 60 days."""
    now = datetime.now(UTC)
    incident = Incident(
        case_id=case_id,
        message_id=message_id,
        opened_at=now,
        due_at=now + INCIDENT_DUE,
        opened_by=actor,
        reason=reason,
    )
    session.add(incident)
    session.flush()
    audit(
        session,
        "incident_opened",
        "message",
        message_id,
        actor=actor,
        detail=f"incident={incident.incident_id} due={incident.due_at.date().isoformat()}",
    )
    return incident


def plan_approved_resends(
    session: Session,
    policy: SendingPolicy,
    *,
    providers_of: Callable[[list[str]], Mapping[str, str]] | None = None,
    actor: str = "plan",
) -> int:
    """Plan one new attempt per approved, verified case, honouring suppression.

    `providers_of` rolls the verified addresses' domains up to their mailbox providers (domain
    -> provider), as the send engine's planner does for first attempts, so each resend goes
    out on its provider's shaped lane."""
    approved = session.scalars(
        select(ResendCase)
        .where(ResendCase.state == CaseState.VERIFIED, ResendCase.approved_by.is_not(None))
        .order_by(ResendCase.case_id)
    ).all()
    sendable: list[tuple[ResendCase, str]] = []
    for case in approved:
        assert case.verified_address is not None
        if is_suppressed(session, case.verified_address):
            # Suppressed since approval (a complaint, another bounce): never sent; print.
            route_to_print(session, case.case_id, actor=actor, reason="address suppressed")
            continue
        sendable.append((case, case.verified_address))
    # One roll-up for all of them (in direct mode: one round of MX lookups).
    providers = providers_of([address for _, address in sendable]) if providers_of else {}
    wanted = [
        NewAttempt(
            case.statement_id,
            address,
            case.case_id,
            providers.get(recipient_domain(address), DEFAULT_PROVIDER),
        )
        for case, address in sendable
    ]
    for message in plan_attempts(session, wanted, policy):
        assert message.case_id is not None
        case = get_case(session, message.case_id)
        attempt = message.attempt
        transition_case(
            session, case, CaseState.RESEND_PLANNED, actor=actor, reason=f"attempt {attempt}"
        )
        audit(
            session,
            "resend_planned",
            "case",
            case.case_id,
            actor=actor,
            detail=f"message={message.message_id} attempt={attempt}",
        )
    return len(wanted)


@dataclass(frozen=True)
class NewAttempt:
    """A statement to send again: to `recipient`, for `case_id` (None: a requeue)."""

    statement_id: str
    recipient: str
    case_id: str | None
    provider: str


def plan_attempts(
    session: Session, wanted: Sequence[NewAttempt], policy: SendingPolicy
) -> list[Message]:
    """New message rows, each its statement's next attempt, in the run of the drop that brought
    the statement (whenever it is planned, an attempt belongs to that intake), by the same
    planner as first attempts: an IP and a send day within the warm-up caps, counting what is
    already planned (a new attempt may go out over another IP than the one that failed, or
    spill to a later day)."""
    latest = dict(
        session.execute(
            select(Message.statement_id, func.max(Message.attempt))
            .where(Message.statement_id.in_({item.statement_id for item in wanted}))
            .group_by(Message.statement_id)
        ).all()
    )
    runs = dict(
        session.execute(
            select(Statement.statement_id, Statement.run_id).where(
                Statement.statement_id.in_({item.statement_id for item in wanted})
            )
        ).all()
    )
    by_run: dict[str, list[NewMessage]] = {}
    for item in wanted:
        attempt = latest.get(item.statement_id, 0) + 1
        by_run.setdefault(runs[item.statement_id], []).append(
            NewMessage(
                f"{item.statement_id}:{attempt}",
                item.statement_id,
                attempt,
                item.recipient,
                item.provider,
                item.case_id,
            )
        )
    today = datetime.now(UTC).date()
    return [
        message
        for run_id, new_messages in by_run.items()
        for message in add_planned_messages(session, new_messages, run_id, policy, today)
    ]


def reopen_after_bounce(
    session: Session, case: ResendCase, *, actor: str, policy: CasePolicy
) -> None:
    """A resend bounced again: verify again, or print after repeated failure."""
    case.failures += 1
    if case.failures > policy.max_failures:
        transition_case(
            session,
            case,
            CaseState.PRINT_FALLBACK,
            actor=actor,
            reason=f"{case.failures} failed attempts",
        )
        audit(session, "case_routed_to_print", "case", case.case_id, actor=actor)
        return
    transition_case(
        session, case, CaseState.NEEDS_VERIFICATION, actor=actor, reason="resend bounced"
    )
    case.approved_by = case.approved_at = None
    audit(session, "case_reopened", "case", case.case_id, actor=actor)


def _bounced_recipient(session: Session, case: ResendCase) -> str:
    return session.get_one(Message, case.message_id).recipient
