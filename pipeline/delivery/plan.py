"""Plan stage: give each message a dedicated sending IP, a send day and a VERP return path.

Assignment is deterministic: a stable weighted hash of the statement id picks the preferred IP,
so re-planning gives the same answer and traffic splits across the pool by weight. An IP in
warm-up takes no more than today's cap (overall and per provider); what it cannot take overflows
to the warmed IPs, and what the whole pool cannot take today spills to the first day that has room.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.delivery.policy import PoolIp, SendingPolicy
from pipeline.errors import ConfigError
from pipeline.records.ledger.models import Message
from pipeline.records.ledger.states import MessageState

# A pool that cannot take a message within this many days is a configuration mistake.
_MAX_SPILL_DAYS = 366


def message_token(statement_id: str, attempt: int) -> str:
    """The message's id in the ledger, its Message-ID local part and its VERP token."""
    return "m" + hashlib.sha256(f"{statement_id}:{attempt}".encode()).hexdigest()[:24]


def assign_ip(statement_id: str, pool: Sequence[PoolIp]) -> PoolIp:
    total = sum(ip.weight for ip in pool)
    slot = int(hashlib.sha256(statement_id.encode()).hexdigest()[:12], 16) % total
    for ip in pool:
        if slot < ip.weight:
            return ip
        slot -= ip.weight
    raise AssertionError("unreachable: slot is below the total weight")


@dataclass(frozen=True)
class ToPlan:
    statement_id: str
    provider: str


@dataclass(frozen=True)
class Assignment:
    statement_id: str
    ip: PoolIp
    day: date


# Messages already planned: (ip address, provider or None for all providers, day) -> count.
Usage = Counter[tuple[str, str | None, date]]


def plan_sends(
    items: Iterable[ToPlan], policy: SendingPolicy, today: date, used: Usage | None = None
) -> list[Assignment]:
    """Assign each item an IP and a day >= today within the warm-up caps, in statement-id order."""
    usage: Usage = Counter(used or {})
    warmed = [ip for ip in policy.pool if ip.warmup_start is None]
    assignments = []
    for item in sorted(items, key=lambda i: i.statement_id):
        preferred = assign_ip(item.statement_id, policy.pool)
        candidates = [preferred] + [ip for ip in warmed if ip != preferred]
        candidates += [ip for ip in policy.pool if ip not in candidates]
        ip, day = _first_with_room(candidates, item.provider, policy, today, usage)
        usage[ip.address, None, day] += 1
        usage[ip.address, item.provider, day] += 1
        assignments.append(Assignment(item.statement_id, ip, day))
    return assignments


@dataclass(frozen=True)
class NewMessage:
    """A message row to plan. `key` seeds the IP choice: a first attempt uses its statement id,
    a later one "<statement id>:<attempt>" so it may go out over another IP."""

    key: str
    statement_id: str
    attempt: int
    recipient: str
    provider: str
    case_id: str | None = None


def add_planned_messages(
    session: Session, wanted: Sequence[NewMessage], run_id: str, policy: SendingPolicy, today: date
) -> list[Message]:
    """The message rows of `run_id`, each given an IP and a send day by `plan_sends` within the
    warm-up caps, counting what the ledger has already planned; added to the session."""
    by_key = {item.key: item for item in wanted}
    to_plan = [ToPlan(item.key, item.provider) for item in wanted]
    messages = []
    for assignment in plan_sends(to_plan, policy, today, planned_usage(session, today)):
        item = by_key[assignment.statement_id]
        now = datetime.now(UTC)
        message = Message(
            message_id=message_token(item.statement_id, item.attempt),
            statement_id=item.statement_id,
            run_id=run_id,
            attempt=item.attempt,
            case_id=item.case_id,
            recipient=item.recipient,
            source_ip=assignment.ip.address,
            ehlo_name=assignment.ip.ehlo_name,
            provider=item.provider,
            send_day=assignment.day,
            state=MessageState.PLANNED,
            created_at=now,
            updated_at=now,
        )
        session.add(message)
        messages.append(message)
    return messages


def planned_usage(session: Session, today: date) -> Usage:
    """Messages already planned from today on, per IP and per (IP, provider): warm-up caps count
    them."""
    rows = session.execute(
        select(Message.source_ip, Message.provider, Message.send_day, func.count())
        .where(Message.send_day >= today, Message.state != MessageState.SUPPRESSED)
        .group_by(Message.source_ip, Message.provider, Message.send_day)
    ).all()
    usage: Usage = Counter()
    for ip, provider, day, count in rows:
        assert day is not None  # filtered on send_day >= today
        usage[ip, None, day] += count
        usage[ip, provider, day] += count
    return usage


def _first_with_room(
    candidates: list[PoolIp], provider: str, policy: SendingPolicy, today: date, usage: Usage
) -> tuple[PoolIp, date]:
    for offset in range(_MAX_SPILL_DAYS):
        day = today + timedelta(days=offset)
        for ip in candidates:
            if _has_room(ip, None, day, policy, usage) and _has_room(
                ip, provider, day, policy, usage
            ):
                return ip, day
    raise ConfigError(f"setting pool: no IP has room within {_MAX_SPILL_DAYS} days")


def _has_room(
    ip: PoolIp, provider: str | None, day: date, policy: SendingPolicy, usage: Usage
) -> bool:
    cap = policy.daily_cap(ip, day, provider)
    return cap is None or usage[ip.address, provider, day] < cap
