"""Who may claim a message, and whose claims a pass may recover.

Every deliver pass is an owner with a unique name, written to each message it claims
(`messages.claimed_by`). Two passes never claim the same message: a claim is granted only if the
message is still as the pass read it (state and tries), under a row lock that a concurrent claim
skips (PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED). A message left in `sending` is recovered
only once its owner is gone:

- PostgreSQL: a pass holds a session advisory lock named after itself for as long as it runs;
  the server releases it when the pass's connection ends, however the process died. A pass that
  can take an owner's lock knows that owner is gone. Passes run side by side.
- SQLite: a pass holds an exclusive flock on `deliver.lock` in the data directory; the kernel
  releases it when the process dies. One pass runs at a time (a second waits for the first), so
  every claim a pass finds in `sending` is of a pass that is gone.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from uuid import uuid4

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from pipeline.records.ledger.models import Message
from pipeline.records.ledger.states import MessageState, transition_message
from pipeline.records.run_context import LedgerContext


@dataclass(frozen=True)
class Owner:
    """One deliver pass."""

    name: str
    # The pass holds the ledger alone (SQLite): any other owner is gone.
    alone: bool


@contextmanager
def deliver_pass(ctx: LedgerContext) -> Iterator[Owner]:
    """Be an owner for the duration of the block (see the module docstring)."""
    name = f"deliver-{uuid4().hex[:16]}"
    engine = ctx.sessions.kw["bind"]
    if engine.dialect.name == "postgresql":
        # Autocommit: the lock connection holds no transaction open for the whole pass.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(select(func.pg_advisory_lock(_lock_key(name))))
            try:
                yield Owner(name, alone=False)
            finally:
                connection.execute(select(func.pg_advisory_unlock(_lock_key(name))))
        return
    ctx.settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (ctx.settings.data_dir / "deliver.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed or the process dies
        yield Owner(name, alone=True)


def _lock_key(name: str) -> ColumnElement[int]:
    return func.hashtextextended(name, 0)


def recover_interrupted(session: Session, owner: Owner) -> int:
    """Messages left in `sending` by a pass that is gone may or may not have reached the
    server: each is deferred for another attempt and marked a possible duplicate
    (at-least-once). A live pass's claims are left alone. Returns how many were recovered."""
    sending = Message.state == MessageState.SENDING
    owners = set(session.scalars(select(Message.claimed_by).where(sending).distinct()))
    gone = owners if owner.alone else {o for o in owners if o is None or _is_gone(session, o)}
    if not gone:
        return 0
    # Only the rows of passes that are gone are locked: locking a live pass's in-flight rows
    # would make its next group commit wait on this transaction, which may itself wait on a
    # row that pass holds (a deadlock between two passes).
    of_gone: ColumnElement[bool] = Message.claimed_by.in_(gone - {None})
    if None in gone:
        of_gone = or_(of_gone, Message.claimed_by.is_(None))
    recovered = session.scalars(
        select(Message).where(sending, of_gone).with_for_update(skip_locked=True)
    ).all()
    for message in recovered:
        message.possible_duplicate = True
        transition_message(
            session,
            message,
            MessageState.DEFERRED,
            actor="send",
            reason="interrupted mid-transaction; outcome unknown",
        )
    return len(recovered)


def _is_gone(session: Session, name: str) -> bool:
    """Whether pass `name` has ended (PostgreSQL): its lock can be taken, until this
    transaction ends."""
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(_lock_key(name)))))


def grant_claims(
    session: Session, expected: Mapping[str, tuple[MessageState, int]]
) -> dict[str, str]:
    """Of the messages this pass wants to claim, the ones still in the state and at the try
    count it read them with, locked until this transaction ends: a message that another pass
    is claiming at this moment (locked) or has claimed since is not granted. Returns each
    granted message's recipient."""
    rows = session.execute(
        select(Message.message_id, Message.state, Message.tries, Message.recipient)
        .where(Message.message_id.in_(expected))
        .with_for_update(skip_locked=True)
    )
    return {
        message_id: recipient
        for message_id, state, tries, recipient in rows
        if (MessageState(state), tries) == expected[message_id]
    }
