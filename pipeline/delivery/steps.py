"""Delivery's steps bound to the ledger: plan messages over the sending IPs, send what is due."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import ColumnElement, Row, func, or_, select
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from pipeline.delivery.claims import Owner, deliver_pass, grant_claims, recover_interrupted
from pipeline.delivery.compose import compose_eob_email, compose_portal_notice
from pipeline.delivery.outcomes import hold, record_result
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
from pipeline.delivery.shaping import Lane, provider_for, recipient_domain
from pipeline.delivery.signing import DkimSigner
from pipeline.documents.templates import DEFAULT_LANGUAGE
from pipeline.errors import LedgerError
from pipeline.records.atrest import (
    read_decrypted,
)
from pipeline.records.ledger import is_suppressed, paused_routes, suppressed_among
from pipeline.records.ledger.models import Message, Statement
from pipeline.records.ledger.states import (
    MessageMove,
    MessageState,
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


# Due messages read from the ledger at a time: a pass's memory does not grow with the backlog.
DUE_BATCH = 5000


def send_due(ctx: LedgerContext) -> dict[str, int]:
    """One deliver pass: send every message due now, whatever run planned it, in batches of
    DUE_BATCH by message id. Safe beside another pass and to kill at any point (claims.py).
    A database error ends the pass with a LedgerError of one line."""
    policy = policy_for(ctx.settings)
    try:
        with deliver_pass(ctx) as owner:
            return _DeliverPass(ctx, policy, owner).run()
    except SQLAlchemyError as err:
        raise _ledger_failure(err) from err


def due_batch(
    session: Session, now: datetime, after: str, limit: int
) -> Sequence[Row[Message, Statement]]:
    """Up to `limit` messages due at `now` with an id after `after`, each with its statement."""
    return session.execute(
        select(Message, Statement)
        .join(Statement, Statement.statement_id == Message.statement_id)
        .where(*_due(now), Message.message_id > after)
        .order_by(Message.message_id)
        .limit(limit)
    ).all()


def _due(now: datetime) -> list[ColumnElement[bool]]:
    return [
        Message.state.in_([MessageState.PLANNED, MessageState.DEFERRED]),
        or_(Message.send_day.is_(None), Message.send_day <= now.date()),
        or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now),
    ]


class _DeliverPass:
    """The state of one pass: its counts and lanes, and what the current batch's messages
    need (their email parts, and the state and tries each claim must find)."""

    def __init__(self, ctx: LedgerContext, policy: SendingPolicy, owner: Owner) -> None:
        self.ctx, self.policy, self.owner = ctx, policy, owner
        self.counts = {o.value: 0 for o in Outcome} | {"expired": 0, "suppressed": 0}
        self.signer = DkimSigner(policy.dkim)
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.parts: dict[str, _EmailParts] = {}
        self.claimable: dict[str, tuple[MessageState, int]] = {}
        self.resends: set[str] = set()
        # Messages this pass has claimed: their results are its own to write.
        self.claimed: set[str] = set()
        self.progress: Iterator[object] = iter(())

    def run(self) -> dict[str, int]:
        settings = self.ctx.settings
        router: Router = (
            RelayRouter(self.policy, settings.smtp_host, settings.smtp_port)
            if self.policy.mode == "relay"
            else MxRouter()
        )
        tls = tls_context(settings.ca_file, self.policy.tls_min_version)
        callbacks = Callbacks(self.render, self.notice, self.record)
        now, after = datetime.now(UTC), ""
        with self.ctx.sessions.begin() as session:
            recover_interrupted(session, self.owner)
            total = session.scalar(select(func.count()).where(*_due(now))) or 0
        self.progress = iter(self.ctx.track(range(total), "send", total))
        while True:
            with self.ctx.sessions.begin() as session:
                rows = due_batch(session, now, after, DUE_BATCH)
                # A bounce rate over the pause threshold holds that IP and provider until
                # acknowledged.
                paused = paused_routes(session)
            if not rows:
                return self.counts
            after = rows[-1].Message.message_id
            self.parts, self.claimable, self.resends = {}, {}, set()
            outgoing = [
                self.prepare(message, statement)
                for message, statement in rows
                if (message.source_ip, recipient_domain(message.recipient)) not in paused
            ]
            send_all(outgoing, self.policy, router, tls, callbacks, lanes=self.lanes)

    def prepare(self, message: Message, statement: Statement) -> Outgoing:
        """What this batch needs to send `message`."""
        self.parts[message.message_id] = _email_parts(self.ctx, statement)
        self.claimable[message.message_id] = (MessageState(message.state), message.tries)
        if message.case_id is not None:
            self.resends.add(message.message_id)
        return _outgoing(self.ctx, message)

    def render(self, message: Outgoing) -> bytes:
        settings, statement = self.ctx.settings, self.parts[message.message_id]
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
            pdf=read_decrypted(statement.pdf, self.ctx.keyring, statement.statement_id),
        )
        return self.signer.sign(content)

    def notice(self, message: Outgoing) -> bytes:
        content = compose_portal_notice(
            message_id=message.message_id,
            from_address=self.ctx.settings.from_address,
            plan_name=self.ctx.settings.plan_name,
            portal_url=self.policy.portal_url,
            language=self.parts[message.message_id].language,
        )
        return self.signer.sign(content)

    def record(self, events: Sequence[Event]) -> set[str]:
        """One transaction per batch: claims move to `sending` (or to `suppressed`, when the
        address was suppressed since the message was planned), results to their outcome.
        Claims, plain acceptances and held messages (a suspended lane's whole queue) are
        written in bulk; the other results (bounces, deferrals, failures, fallbacks, resends)
        row by row with what they entail. Returns the claims refused."""
        claims = {e.message.message_id for e in events if isinstance(e, Claim)}
        results = [e for e in events if isinstance(e, SendResult)]
        # Results for messages this pass never claimed (a suspended lane's held queue, and
        # messages that could not be composed): another pass may be claiming them right now.
        # Only those still as this pass read them, locked without waiting, are written; the
        # others belong to that pass (waiting on its row locks could deadlock the two).
        unclaimed = {
            r.message_id
            for r in results
            if r.outcome == Outcome.HELD
            or (r.outcome == Outcome.FAILED and r.message_id not in self.claimed)
        }
        with self.ctx.sessions.begin() as session:
            granted = grant_claims(
                session, {m: self.claimable[m] for m in claims | unclaimed if m in self.claimable}
            )
            results = [
                r for r in results if r.message_id not in unclaimed or r.message_id in granted
            ]
            accepted = [
                MessageMove(r.message_id, MessageState.SENDING, f"SMTP {r.code}",
                            {"smtp_code": r.code, "smtp_reply": r.reply})
                for r in results
                if r.outcome == Outcome.ACCEPTED and r.message_id not in self.resends
            ]  # fmt: skip
            held = [r for r in results if r.outcome == Outcome.HELD]
            outcomes = [Outcome.ACCEPTED.value] * len(accepted) + [Outcome.HELD.value] * len(held)
            to_claim = {m: granted[m] for m in claims if m in granted}
            suppressed = suppressed_among(session, to_claim.values())
            late = {m for m, recipient in to_claim.items() if recipient.lower() in suppressed}
            transition_messages(session, [
                MessageMove(m, self.claimable[m][0], "address suppressed") for m in late
            ], MessageState.SUPPRESSED, actor="send")  # fmt: skip
            claimed = [
                MessageMove(m, state, values={"tries": tries + 1, "claimed_by": self.owner.name})
                for m in to_claim.keys() - late
                for state, tries in [self.claimable[m]]
            ]
            transition_messages(session, claimed, MessageState.SENDING, actor="send")
            transition_messages(session, accepted, MessageState.ACCEPTED, actor="send")
            hold(session, held)
            bulk = {move.message_id for move in accepted} | {r.message_id for r in held}
            for result in results:
                if result.message_id not in bulk:
                    message = session.get_one(Message, result.message_id)
                    outcomes.append(record_result(session, message, result, self.policy))
        self.claimed |= to_claim.keys() - late
        for outcome in outcomes + ["suppressed"] * len(late):
            self.counts[outcome] += 1
            next(self.progress, None)
        return claims - (to_claim.keys() - late)


def _ledger_failure(err: SQLAlchemyError) -> LedgerError:
    """One line for the operator. An OperationalError says what the database could not do
    (full, unreachable); other errors can quote row values (PHI), so only their kind is named."""
    cause = err.orig if isinstance(err, DBAPIError) else err
    detail = type(cause).__name__
    if isinstance(err, OperationalError):
        detail += ": " + (str(cause).strip().splitlines() or [""])[0]
    return LedgerError(
        f"send stopped: the ledger could not be written ({detail}); "
        "messages in flight are retried, marked possible duplicates, by the next pass"
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
