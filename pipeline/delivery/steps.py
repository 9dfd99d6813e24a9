"""Delivery's steps bound to the ledger: plan messages over the sending IPs, send what is due."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from pipeline.delivery.compose import compose_eob_email, compose_portal_notice
from pipeline.delivery.plan import NewMessage, add_planned_messages, message_token
from pipeline.delivery.policy import DEFAULT_PROVIDER, SendingPolicy, policy_for
from pipeline.delivery.routing import MxRouter, RelayRouter, Router
from pipeline.delivery.send import (
    Callbacks,
    Claim,
    Event,
    Outcome,
    Outgoing,
    SendResult,
    send_all,
    tls_context,
)
from pipeline.delivery.shaping import provider_for, recipient_domain
from pipeline.delivery.signing import DkimSigner
from pipeline.documents.templates import DEFAULT_LANGUAGE
from pipeline.records.atrest import (
    read_decrypted,
)
from pipeline.records.bounce_classes import ReportKind, smtp_rejection
from pipeline.records.ledger import is_suppressed, paused_routes
from pipeline.records.ledger.models import (
    Bounce,
    Message,
    Statement,
)
from pipeline.records.ledger.states import (
    MessageMove,
    MessageState,
    mark_resend_accepted,
    transition_message,
    transition_messages,
)
from pipeline.records.run_context import LedgerContext, RunContext
from pipeline.records.verp import verp_return_path


def plan_messages(ctx: RunContext) -> dict[str, int]:
    policy = policy_for(ctx.settings)
    today = datetime.now(UTC).date()
    counts = {"planned": 0, "suppressed": 0, "spilled_to_later_days": 0}
    with ctx.sessions.begin() as session:
        statements = session.scalars(
            select(Statement).where(
                Statement.run_id == ctx.run_id,
                Statement.channel == "email",
                Statement.pdf_path.is_not(None),
            )
        ).all()
        to_plan: dict[str, Statement] = {}
        for statement in statements:
            token = message_token(statement.statement_id, 1)
            if session.get(Message, token) is not None or statement.email is None:
                continue
            to_plan[statement.statement_id] = statement
        providers = providers_of(policy, [s.email or "" for s in to_plan.values()])
        wanted = [
            NewMessage(s.statement_id, s.statement_id, 1, email, providers[recipient_domain(email)])
            for s in to_plan.values()
            if (email := s.email) is not None
        ]
        for message in add_planned_messages(session, wanted, ctx.run_id, policy, today):
            if is_suppressed(session, message.recipient):
                transition_message(
                    session,
                    message,
                    MessageState.SUPPRESSED,
                    actor="plan",
                    reason="address suppressed",
                )
                counts["suppressed"] += 1
            else:
                counts["planned"] += 1
                assert message.send_day is not None  # the planner gave it a day
                counts["spilled_to_later_days"] += message.send_day > today
    return counts


def providers_of(policy: SendingPolicy, addresses: list[str]) -> dict[str, str]:
    """Each recipient domain's provider; in direct mode rolled up from its MX hosts."""
    domains = sorted({recipient_domain(a) for a in addresses})
    if policy.mode == "relay":
        return {d: provider_for(policy, d) for d in domains}
    router = MxRouter()

    async def lookup() -> list[list[str]]:
        return await asyncio.gather(*(router.mx_hosts(d) for d in domains))

    return {
        d: provider_for(policy, d, hosts)
        for d, hosts in zip(domains, asyncio.run(lookup()), strict=True)
    }


def send_due(ctx: LedgerContext) -> dict[str, int]:
    settings = ctx.settings
    policy = policy_for(settings)
    now = datetime.now(UTC)
    with ctx.sessions.begin() as session:
        _recover_interrupted(session)
        # Each message with its statement, in one query (not one query per statement).
        rows = session.execute(
            select(Message, Statement)
            .join(Statement, Statement.statement_id == Message.statement_id)
            .where(
                Message.state.in_([MessageState.PLANNED, MessageState.DEFERRED]),
                or_(Message.send_day.is_(None), Message.send_day <= now.date()),
                or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now),
            )
            .order_by(Message.message_id)
        ).all()
        # A bounce rate over the pause threshold holds that IP and provider until acknowledged.
        paused = paused_routes(session)
        rows = [
            row for row in rows
            if (row.Message.source_ip, recipient_domain(row.Message.recipient)) not in paused
        ]  # fmt: skip
        keyring = ctx.keyring
        parts = {message.message_id: _email_parts(ctx, statement) for message, statement in rows}
        pending = [message for message, _ in rows]
        outgoing = [_outgoing(ctx, m) for m in pending]
        # What a claim must find in the ledger (each message is claimed once per send stage).
        claimable = {m.message_id: (MessageState(m.state), m.tries) for m in pending}
        resends = {m.message_id for m in pending if m.case_id is not None}
    counts = {outcome.value: 0 for outcome in Outcome} | {"expired": 0}
    progress = iter(ctx.track(outgoing, "send", len(outgoing)))
    signer = DkimSigner(policy.dkim)

    def render(message: Outgoing) -> bytes:
        statement = parts[message.message_id]
        content = compose_eob_email(
            message_id=message.message_id,
            statement_id=statement.statement_id,
            recipient=message.recipient,
            from_address=settings.from_address,
            plan_name=settings.plan_name,
            language=statement.language,
            first_name=statement.first_name if settings.email_body_phi == "first_name" else None,
            # The PDF was protected at render time when the member had the data the rule needs.
            password_rule=settings.pdf_password if statement.pdf_protected else "",
            # Decrypted in memory only: the plaintext PDF is never written anywhere.
            pdf=read_decrypted(statement.pdf, keyring, statement.statement_id),
        )
        return signer.sign(content)

    def notice(message: Outgoing) -> bytes:
        content = compose_portal_notice(
            message_id=message.message_id,
            from_address=settings.from_address,
            plan_name=settings.plan_name,
            portal_url=policy.portal_url,
            language=parts[message.message_id].language,
        )
        return signer.sign(content)

    def record(events: Sequence[Event]) -> None:
        """One transaction per batch: claims move to `sending`, results to their outcome.
        Claims, plain acceptances and held messages (a suspended lane's whole queue) are
        written in bulk; the other results (bounces, deferrals, fallbacks, resends) row by
        row with what they entail."""
        claims = [
            MessageMove(e.message.message_id, claimable[e.message.message_id][0],
                        values={"tries": claimable[e.message.message_id][1] + 1})
            for e in events if isinstance(e, Claim)
        ]  # fmt: skip
        results = [e for e in events if isinstance(e, SendResult)]
        accepted = [
            MessageMove(r.message_id, MessageState.SENDING, f"SMTP {r.code}",
                        {"smtp_code": r.code, "smtp_reply": r.reply})
            for r in results if r.outcome == Outcome.ACCEPTED and r.message_id not in resends
        ]  # fmt: skip
        held = [r for r in results if r.outcome == Outcome.HELD]
        outcomes = [Outcome.ACCEPTED.value] * len(accepted) + [Outcome.HELD.value] * len(held)
        with ctx.sessions.begin() as session:
            transition_messages(session, claims, MessageState.SENDING, actor="send")
            transition_messages(session, accepted, MessageState.ACCEPTED, actor="send")
            _hold(session, held)
            bulk = {move.message_id for move in accepted} | {r.message_id for r in held}
            for result in results:
                if result.message_id not in bulk:
                    message = session.get_one(Message, result.message_id)
                    expired = _record_result(session, message, result, policy)
                    outcomes.append("expired" if expired else result.outcome.value)
        for outcome in outcomes:
            counts[outcome] += 1
            next(progress, None)

    router: Router = (
        RelayRouter(policy, settings.smtp_host, settings.smtp_port)
        if policy.mode == "relay"
        else MxRouter()
    )
    tls = tls_context(settings.ca_file, policy.tls_min_version)
    send_all(outgoing, policy, router, tls, Callbacks(render, notice, record))
    return counts


def _hold(session: Session, held: Sequence[SendResult]) -> None:
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


def _record_result(
    session: Session, message: Message, result: SendResult, policy: SendingPolicy
) -> bool:
    """Record one SMTP outcome; True when a deferral outlived the retry policy and expired."""
    now = datetime.now(UTC)
    message.smtp_code, message.smtp_reply = result.code, result.reply
    reason = f"SMTP {result.code or 'no reply'}"
    transition_message(session, message, MessageState(result.outcome), actor="send", reason=reason)
    if result.outcome == Outcome.BOUNCED:
        _record_smtp_rejection(session, message, result)
    elif result.outcome == Outcome.ACCEPTED:
        mark_resend_accepted(session, message)
    elif result.outcome == Outcome.FALLBACK:
        notified = result.code is not None and 200 <= result.code < 300
        if policy.tls_fallback == "print" or not notified:
            session.get_one(Statement, message.statement_id).channel = "print"
    elif result.outcome == Outcome.DEFERRED:
        delay = policy.retry.delay(message.tries, result.retry_after)
        message.next_attempt_at = now + timedelta(seconds=delay)
        created = message.created_at.replace(tzinfo=message.created_at.tzinfo or UTC)
        if (message.next_attempt_at - created).total_seconds() > policy.retry.max_age_seconds:
            transition_message(
                session, message, MessageState.EXPIRED, actor="send", reason="retry max age"
            )
            return True
    return False


def _recover_interrupted(session: Session) -> None:
    """A message left in `sending` by a crash may or may not have reached the server: it is
    deferred for another attempt and marked as a possible duplicate (at-least-once)."""
    stuck = session.scalars(select(Message).where(Message.state == MessageState.SENDING)).all()
    for message in stuck:
        message.possible_duplicate = True
        transition_message(
            session,
            message,
            MessageState.DEFERRED,
            actor="send",
            reason="interrupted mid-transaction; outcome unknown",
        )


@dataclass(frozen=True)
class _EmailParts:
    """What the email of one statement needs, read from the ledger before sending starts."""

    statement_id: str
    # The encrypted PDF on disk.
    pdf: Path
    language: str
    first_name: str | None
    pdf_protected: bool


def _email_parts(ctx: LedgerContext, statement: Statement) -> _EmailParts:
    assert statement.pdf_path is not None
    return _EmailParts(
        statement_id=statement.statement_id,
        pdf=ctx.settings.runs_dir / statement.run_id / statement.pdf_path,
        language=statement.language or DEFAULT_LANGUAGE,
        first_name=statement.first_name,
        pdf_protected=statement.pdf_protected,
    )


def _outgoing(ctx: LedgerContext, message: Message) -> Outgoing:
    return Outgoing(
        message_id=message.message_id,
        mail_from=verp_return_path(message.message_id, ctx.settings.return_path_domain),
        recipient=message.recipient,
        source_ip=message.source_ip,
        ehlo_name=message.ehlo_name,
        provider=message.provider or DEFAULT_PROVIDER,
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
