"""Crash test, on SQLite and PostgreSQL: a deliver pass killed with SIGKILL at random points,
then resumed, loses nothing and duplicates only what was in flight at a kill, each duplicate
marked in the ledger.

The kill points differ from run to run (the seed is printed; EOB_CRASH_SEED repeats one). The
pass runs in a forked child process; the receiver is a real aiosmtpd server with STARTTLS in
this process, recording every Message-ID that arrives.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import random
import signal
import time
from collections import Counter
from email import message_from_bytes
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.delivery.steps import send_due
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Message, StateTransition
from pipeline.records.ledger.states import MessageState
from pipeline.records.run_context import LedgerContext, ledger_sessions
from tests.smtp_servers import Receiver, Script, policy_toml, seed_run, smtp_server

MESSAGES = int(os.environ.get("EOB_CRASH_MESSAGES", "5000"))
KILLS = 5
IPS = ("127.0.0.24", "127.0.0.25", "127.0.0.26", "127.0.0.27")
CONNECTIONS_PER_IP = 2
# At most this many messages can be mid-transaction at once: one per connection.
CONCURRENCY = len(IPS) * CONNECTIONS_PER_IP


def _send_in_child(settings: Settings) -> None:
    # A forked child must not share the parent's database connections.
    ledger_sessions.cache_clear()
    send_due(LedgerContext(settings, ledger_sessions(settings.ledger_url)))


def start_send(settings: Settings) -> multiprocessing.process.BaseProcess:
    """A deliver pass in a child process, forked so that it starts at once (no re-import)."""
    child = multiprocessing.get_context("fork").Process(
        target=_send_in_child, args=(settings,), daemon=True
    )
    child.start()
    return child


@pytest.mark.slow
def test_sigkill_mid_send_then_resume_delivers_everything_at_least_once(
    tmp_path: Path, ledger_url: str
):
    seed = int(os.environ.get("EOB_CRASH_SEED") or random.randrange(2**32))
    print(f"crash test seed: EOB_CRASH_SEED={seed}")
    rng = random.Random(seed)
    policy_file = tmp_path / "sending.toml"
    policy_file.write_text(policy_toml(IPS, CONNECTIONS_PER_IP))
    receiver = Receiver(Script())
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = Settings(data_dir=tmp_path / "data", database_url=ledger_url, smtp_port=port,
                            tls_ca_file=str(tmp_path / "certs" / "ca.pem"),
                            sending_policy_file=str(policy_file))  # fmt: skip
        seed_run(settings, MESSAGES)
        sessions = open_ledger(settings.ledger_url)
        kill_at = sorted(rng.sample(range(MESSAGES // 10, MESSAGES * 9 // 10), KILLS))
        in_flight: set[str] = set()
        for threshold in kill_at:
            child = start_send(settings)
            deadline = time.monotonic() + 300
            while len(receiver.arrivals) < threshold and child.is_alive():
                assert time.monotonic() < deadline, "the send made no progress"
                time.sleep(0.002)
            assert child.is_alive(), f"the send ended early: exit code {child.exitcode}"
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            with sessions() as session:
                caught = set(session.scalars(
                    select(Message.message_id).where(Message.state == MessageState.SENDING)
                ))  # fmt: skip
            # Only a connection's current message can be mid-transaction.
            assert len(caught) <= CONCURRENCY
            in_flight |= caught
        child = start_send(settings)
        child.join(timeout=600)
        assert child.exitcode == 0

    arrived = Counter(
        message_from_bytes(a.content)["Message-ID"].strip("<>").split("@")[0]
        for a in receiver.arrivals
    )
    with sessions() as session:
        messages = session.scalars(select(Message)).all()
    assert len(messages) == MESSAGES
    # Ledger and receiver agree: everything accepted, everything arrived at least once.
    assert {m.state for m in messages} == {MessageState.ACCEPTED}
    assert set(arrived) == {m.message_id for m in messages}
    # Duplicates only among the messages caught in flight, and every one of those is marked.
    duplicates = {message_id for message_id, n in arrived.items() if n > 1}
    marked = {m.message_id for m in messages if m.possible_duplicate}
    assert duplicates <= in_flight == marked
    assert len(marked) <= KILLS * CONCURRENCY
    # The recovery path was taken: kills caught messages mid-transaction, and each was moved
    # from sending back to deferred before it went out again.
    assert marked, f"no kill caught a message in flight (seed {seed})"
    with sessions() as session:
        recovered = set(session.scalars(
            select(StateTransition.entity_id).where(
                StateTransition.from_state == MessageState.SENDING,
                StateTransition.to_state == MessageState.DEFERRED,
            )
        ))  # fmt: skip
    assert recovered == marked
