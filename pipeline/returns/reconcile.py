"""Reconcile stage: act on classified bounces by the policy in config/reconcile_policy.toml.

Nothing is ever resent from here. hard -> the address is suppressed and a verify-before-resend
case opened (or a resend's case reopened); soft -> tolerated up to a count or age, then a case;
policy_block -> the address is not in doubt: a deliverability alert per sending IP and provider,
its messages planned again only when operations acknowledge it; complaint -> the address is
suppressed, the statement goes to print and an incident is opened (a complaint after
acceptance is a suspected misdelivery); delivered -> the attempt is delivered. A bounce that
matched no message waits on the review list.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.delivery.policy import DEFAULT_PROVIDER, SendingPolicy
from pipeline.delivery.shaping import recipient_domain
from pipeline.errors import ConfigError
from pipeline.records.bounce_classes import BounceClass
from pipeline.records.ledger import as_utc, audit, is_suppressed, raise_alert
from pipeline.records.ledger.models import (
    Bounce,
    DeliverabilityAlert,
    Message,
    ResendCase,
    Suppression,
)
from pipeline.records.ledger.states import (
    CaseState,
    MessageState,
    transition_case,
    transition_message,
)
from pipeline.resources import CONFIG_DIR
from pipeline.returns import cases

ACTOR = "reconcile"
POLICY_FILE = CONFIG_DIR / "reconcile_policy.toml"
FAILURES = (BounceClass.HARD_BOUNCE, BounceClass.SOFT_BOUNCE, BounceClass.POLICY_BLOCK)


@dataclass(frozen=True)
class Policy:
    soft_max_bounces: int = 3
    soft_max_age: timedelta = timedelta(hours=72)
    rate_warn: float = 0.02
    rate_pause: float = 0.05
    rate_min_sent: int = 20
    rate_window: timedelta = timedelta(hours=24)
    cases: cases.CasePolicy = cases.CasePolicy()
    misdelivery: re.Pattern[str] = re.compile(r"not me", re.IGNORECASE)
    # How long a failure may wait on operations before its statement gets a case
    # (pipeline.returns.deadlines), and an open case before its statement goes to print.
    unknown_review: timedelta = timedelta(hours=24)
    policy_block_ack: timedelta = timedelta(hours=24)
    case_due: timedelta = timedelta(hours=120)


def load_policy(path: Path = POLICY_FILE) -> Policy:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    try:
        soft, rate, case = raw["soft_bounce"], raw["bounce_rate"], raw["cases"]
        waits = raw["deadlines"]
        policy = Policy(
            soft_max_bounces=int(soft["max_bounces"]),
            soft_max_age=timedelta(hours=float(soft["max_age_hours"])),
            rate_warn=float(rate["warn"]),
            rate_pause=float(rate["pause"]),
            rate_min_sent=int(rate["min_sent"]),
            rate_window=timedelta(hours=float(rate["window_hours"])),
            cases=cases.CasePolicy(
                require_different_approver=bool(case["require_different_approver"]),
                max_failures=int(case["max_failures"]),
            ),
            misdelivery=re.compile(raw["misdelivery"]["reply_text"], re.IGNORECASE),
            unknown_review=timedelta(hours=float(waits["unknown_review_hours"])),
            policy_block_ack=timedelta(hours=float(waits["policy_block_ack_hours"])),
            case_due=timedelta(hours=float(waits["case_due_hours"])),
        )
    except (KeyError, TypeError, ValueError, re.error) as err:
        raise ConfigError(f"{path.name}: missing or invalid setting {err}") from err
    if not 0 < policy.rate_warn <= policy.rate_pause <= 1:
        raise ConfigError(f"{path.name}: bounce_rate needs 0 < warn <= pause <= 1")
    return policy


def case_id_for(message_id: str) -> str:
    return "c" + hashlib.sha256(message_id.encode()).hexdigest()[:24]


def reconcile_bounce(session: Session, bounce: Bounce, policy: Policy) -> bool:
    """Apply the policy for one bounce; True when a resend case was opened."""
    bounce.reconciled = True
    message = session.get(Message, bounce.message_id) if bounce.message_id else None
    if message is None:
        audit(session, "bounce_unmatched", "bounce", str(bounce.bounce_id), actor=ACTOR)
        return False
    cls = BounceClass(bounce.bounce_class)
    audit(
        session,
        f"bounce_{cls}",
        "message",
        message.message_id,
        actor=ACTOR,
        detail=f"bounce={bounce.bounce_id} status={bounce.status_code or '-'}",
    )
    if cls == BounceClass.DELIVERED:
        if message.state == MessageState.ACCEPTED:
            transition_message(session, message, MessageState.DELIVERED, actor=ACTOR)
        return False
    if cls == BounceClass.COMPLAINT:
        return _misdelivered(session, message, bounce, "complaint after acceptance")
    if cls == BounceClass.NOT_BOUNCE and policy.misdelivery.search(bounce.diagnostic or ""):
        return _misdelivered(session, message, bounce, "reply says wrong recipient")
    if cls == BounceClass.POLICY_BLOCK:
        _mark_bounced(session, message, bounce)
        _raise_alert(session, "policy_block", message, count=1, rate=None)
        return False
    if cls == BounceClass.SOFT_BOUNCE and not _soft_limit_reached(session, message, policy):
        return False
    if cls in (BounceClass.HARD_BOUNCE, BounceClass.SOFT_BOUNCE):
        _mark_bounced(session, message, bounce)
        if cls == BounceClass.HARD_BOUNCE:
            _suppress(session, message.recipient, bounce)
        return open_or_reopen_case(session, message, _why(bounce), policy)
    # auto_reply, not_bounce, unknown: recorded above; unknown waits for review, and
    # pipeline.returns.deadlines gives the statement a case when review takes too long.
    return False


def _mark_bounced(session: Session, message: Message, bounce: Bounce) -> None:
    if message.state == MessageState.ACCEPTED:
        transition_message(session, message, MessageState.BOUNCED, actor=ACTOR, reason=_why(bounce))


def _soft_limit_reached(session: Session, message: Message, policy: Policy) -> bool:
    soft = session.scalar(
        select(func.count())
        .select_from(Bounce)
        .join(Message, Message.message_id == Bounce.message_id)
        .where(
            Message.statement_id == message.statement_id,
            Bounce.bounce_class == BounceClass.SOFT_BOUNCE,
        )
    )
    first = session.scalar(
        select(func.min(Message.created_at)).where(Message.statement_id == message.statement_id)
    )
    assert first is not None
    age = datetime.now(UTC) - as_utc(first)
    return (soft or 0) >= policy.soft_max_bounces or age >= policy.soft_max_age


def _misdelivered(session: Session, message: Message, bounce: Bounce, why: str) -> bool:
    """Suspected misdelivery: suppress the address, print instead, open an incident."""
    _suppress(session, message.recipient, bounce)
    opened = open_or_reopen_case(session, message, _why(bounce), None)
    case = session.get_one(ResendCase, message.case_id or case_id_for(message.message_id))
    if case.state not in (CaseState.PRINT_FALLBACK, CaseState.CLOSED):
        transition_case(session, case, CaseState.PRINT_FALLBACK, actor=ACTOR, reason=why)
    cases.open_incident(
        session,
        message.message_id,
        actor=ACTOR,
        case_id=case.case_id,
        reason=f"{why}: suspected misdelivery",
    )
    return opened


def _suppress(session: Session, address: str, bounce: Bounce) -> None:
    key = address.lower()
    if not is_suppressed(session, key):
        session.add(
            Suppression(
                address=key,
                reason=bounce.bounce_class,
                created_at=datetime.now(UTC),
                bounce_id=bounce.bounce_id,
            )
        )
        audit(session, "address_suppressed", "message", bounce.message_id or "", actor=ACTOR)


def _why(bounce: Bounce) -> str:
    return f"{bounce.bounce_class} {bounce.status_code or ''}".strip()


def open_or_reopen_case(
    session: Session, message: Message, reason: str, policy: Policy | None
) -> bool:
    """A verify-before-resend case for the failed attempt (a resend's own case reopened when
    a policy is given); True when one was opened."""
    if message.case_id is not None:
        case = session.get_one(ResendCase, message.case_id)
        if policy is not None and case.state in (CaseState.RESEND_PLANNED, CaseState.RESENT):
            cases.reopen_after_bounce(session, case, actor=ACTOR, policy=policy.cases)
        return False
    case_id = case_id_for(message.message_id)
    if session.get(ResendCase, case_id) is not None:
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
            reason=reason,
        )
    )
    session.flush()
    audit(
        session,
        "resend_case_opened",
        "case",
        case_id,
        actor=ACTOR,
        detail=f"message={message.message_id}",
    )
    return True


def _raise_alert(
    session: Session, kind: str, message: Message, *, count: int, rate: float | None
) -> DeliverabilityAlert:
    provider = recipient_domain(message.recipient)
    return raise_alert(session, kind, message.source_ip, provider, count=count, rate=rate,
                       actor=ACTOR)  # fmt: skip


def monitor_bounce_rates(
    session: Session, policy: Policy, now: datetime | None = None
) -> dict[str, int]:
    """Failure share per sending IP and provider over the messages whose outcome came within
    the policy's window; warn or pause over the thresholds. The returns loop runs this on its
    own schedule, so it is not scoped to a run: a drop's sends spread over days. Outcomes from
    before a route's last acknowledged rate alert do not count again, so an acknowledged pause
    is not raised again by the evidence that raised it."""
    since = (now or datetime.now(UTC)) - policy.rate_window
    sent_states = (MessageState.ACCEPTED, MessageState.BOUNCED, MessageState.DELIVERED)
    messages = session.scalars(
        select(Message).where(Message.state.in_(sent_states), Message.updated_at >= since)
    ).all()
    failed_ids = set(
        session.scalars(
            select(Bounce.message_id)
            .join(Message, Message.message_id == Bounce.message_id)
            .where(
                Message.updated_at >= since,
                Bounce.bounce_class.in_([str(c) for c in FAILURES]),
            )
        )
    )
    rows = session.execute(
        select(
            DeliverabilityAlert.source_ip,
            DeliverabilityAlert.provider,
            func.max(DeliverabilityAlert.acknowledged_at),
        )
        .where(
            DeliverabilityAlert.kind.in_(["bounce_rate_warn", "bounce_rate_pause"]),
            DeliverabilityAlert.acknowledged_at.is_not(None),
        )
        .group_by(DeliverabilityAlert.source_ip, DeliverabilityAlert.provider)
    )
    acknowledged = {(ip, provider): as_utc(at) for ip, provider, at in rows if at is not None}
    groups: dict[tuple[str, str], list[Message]] = {}
    for message in messages:
        route = (message.source_ip, recipient_domain(message.recipient))
        after = acknowledged.get(route)
        if after is None or as_utc(message.updated_at) > after:
            groups.setdefault(route, []).append(message)
    counts = {"warn": 0, "pause": 0}
    for batch in groups.values():
        if len(batch) < policy.rate_min_sent:
            continue
        failed = sum(m.message_id in failed_ids for m in batch)
        rate = failed / len(batch)
        level = "pause" if rate >= policy.rate_pause else "warn" if rate >= policy.rate_warn else ""
        if level:
            _raise_alert(session, f"bounce_rate_{level}", batch[0], count=failed, rate=rate)
            counts[level] += 1
    return counts


def acknowledge_alert(session: Session, alert_id: int, *, actor: str, policy: SendingPolicy) -> int:
    """Operations acknowledged the alert: policy-blocked messages are planned again (same
    address: it is not in doubt); the next deliver pass sends them. Returns how many were
    requeued."""
    alert = session.get(DeliverabilityAlert, alert_id)
    if alert is None or alert.acknowledged_at is not None:
        raise cases.CaseActionRefused(f"alert {alert_id}: not found or already acknowledged")
    alert.acknowledged_by, alert.acknowledged_at = actor, datetime.now(UTC)
    audit(session, "alert_acknowledged", "alert", str(alert_id), actor=actor)
    if alert.kind != "policy_block":
        return 0
    blocked = session.scalars(
        select(Message)
        .join(Bounce, Bounce.message_id == Message.message_id)
        .where(
            Bounce.bounce_class == BounceClass.POLICY_BLOCK,
            Message.source_ip == alert.source_ip,
            Message.state == MessageState.BOUNCED,
        )
    ).all()
    requeue: list[cases.NewAttempt] = []
    for old in blocked:
        if recipient_domain(old.recipient) != alert.provider:
            continue
        if is_suppressed(session, old.recipient):
            continue
        if session.get(ResendCase, case_id_for(old.message_id)) is not None:
            continue  # not acknowledged in time: its case decides now
        latest = session.scalar(
            select(func.max(Message.attempt)).where(Message.statement_id == old.statement_id)
        )
        if latest != old.attempt:
            continue  # already requeued
        requeue.append(
            cases.NewAttempt(
                old.statement_id, old.recipient, old.case_id, old.provider or DEFAULT_PROVIDER
            )
        )
    requeued = len(cases.plan_attempts(session, requeue, policy))
    audit(
        session,
        "policy_block_requeued",
        "alert",
        str(alert_id),
        actor=actor,
        detail=f"messages={requeued}",
    )
    return requeued
