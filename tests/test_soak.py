"""Soak: three drops taken in one after another while the deliver and returns loops run in
their own processes, each killed with SIGKILL at random points and restarted, against a real
SMTP server on loopback that is down for a while, defers some recipients before accepting,
refuses some outright and sends a late DSN for others.

At the end every statement is accepted, in a case or in print; the receiver and the ledger
agree; a message arrives twice only when the ledger marks it `possible_duplicate`.
"""

from __future__ import annotations

import mailbox
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.delivery.policy import policy_for
from pipeline.ops.sink import delivery_status_notification
from pipeline.ops.synthetic import generate_extract
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import DeliverabilityAlert, Message, ResendCase, Statement
from pipeline.records.ledger.states import MessageState
from pipeline.returns.reconcile import acknowledge_alert
from pipeline.runner import intake
from tests.smtp_servers import Receiver, Script, policy_toml, smtp_server

IPS = ("127.0.0.41", "127.0.0.42")
MEMBERS_PER_DROP = 30
# One pass of a loop, then a short sleep, forever: what `eob deliver --every` does, in a
# process the test can kill at any instruction.
LOOP = """
import sys, time
from pipeline import runner
from pipeline.config import load_settings
settings = load_settings()
step = getattr(runner, sys.argv[1])
while True:
    step(settings)
    time.sleep(0.2)
"""


def _member(address: str) -> int:
    return int(address.partition("@")[0].removeprefix("member"))


class FlakyReceiver(Receiver):
    """Down until `outage_until`; then some recipients are deferred twice, some refused, and
    some accepted and later reported failed by a DSN written to the return path."""

    def __init__(self, return_path: Path, outage_seconds: float) -> None:
        super().__init__(Script())
        self.return_path = mailbox.Maildir(return_path, create=True)
        self.outage_until = time.monotonic() + outage_seconds
        self.deferrals: Counter[str] = Counter()

    @staticmethod
    def refused(address: str) -> bool:
        return _member(address) % 11 == 5

    @staticmethod
    def late_dsn(address: str) -> bool:
        return _member(address) % 13 == 7

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:  # fmt: skip
        if time.monotonic() < self.outage_until:
            return "451 4.3.2 System not accepting network messages, try again in 1 second"
        if _member(address) % 7 == 3 and self.deferrals[address] < 2:
            self.deferrals[address] += 1
            return "451 4.7.1 Greylisted, try again in 1 second"
        if self.refused(address):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        late = [r for r in envelope.rcpt_tos if self.late_dsn(r)]
        if late and envelope.mail_from:
            content = envelope.original_content or b""
            report = delivery_status_notification(envelope.mail_from, late, content)
            self.return_path.add(report.as_bytes())
        return reply


class Loop:
    """One due-work loop in its own process, restarted after each kill."""

    def __init__(self, step: str, env: dict[str, str], log: Path) -> None:
        self.step, self.env, self.log = step, env, log
        self.kills = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-c", LOOP, self.step], env=self.env, stdout=out, stderr=out
            )

    def kill_and_restart(self) -> None:
        assert self.process.poll() is None, f"the {self.step} loop died: see {self.log}"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.kills += 1
        self.process = self._start()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _drop(tmp_path: Path, day: int) -> Path:
    drop = tmp_path / f"landing-day{day}"
    (drop / "soak").mkdir(parents=True)
    generate_extract(drop / "soak" / "extract.csv", MEMBERS_PER_DROP * 8, bad_share=0.0, seed=day)
    return drop


def _acknowledge_pauses(sessions, settings: Settings) -> None:
    """Operations at work: the refusals push routes over the pause threshold; an operator
    looks and acknowledges, and the route sends again."""
    with sessions.begin() as session:
        for alert in session.scalars(
            select(DeliverabilityAlert).where(DeliverabilityAlert.acknowledged_at.is_(None))
        ).all():
            acknowledge_alert(session, alert.alert_id, actor="ops", policy=policy_for(settings))


def _report(sessions, loops: list[Loop]) -> str:
    """What is still open, and the end of each loop's log: why it did not settle."""
    with sessions() as session:
        rows = session.execute(
            select(Message.state, Message.next_attempt_at, Message.tries, Message.smtp_reply)
        ).all()
    states = Counter(row.state for row in rows)
    waiting = [
        (row.tries, str(row.next_attempt_at), (row.smtp_reply or "")[:50])
        for row in rows
        if row.state != MessageState.ACCEPTED and row.state != MessageState.BOUNCED
    ]
    logs = "\n".join(
        f"--- {loop.step}\n" + loop.log.read_text(errors="replace")[-1500:] for loop in loops
    )
    return f"the loops did not settle: {dict(states)} {waiting[:5]} at {datetime.now(UTC)}\n{logs}"


def _settled(sessions, receiver: FlakyReceiver, return_path: Path) -> bool:
    """Nothing left to send or to read, and every outcome that needs a case has one: the
    returns loop reconciles what the deliver loop last did on its next pass."""
    with sessions() as session:
        open_states = [MessageState.PLANNED, MessageState.DEFERRED, MessageState.SENDING]
        waiting = session.scalar(select(Message.message_id).where(Message.state.in_(open_states)))
        ended = [MessageState.BOUNCED, MessageState.SUPPRESSED, MessageState.EXPIRED]
        sent = [MessageState.ACCEPTED, MessageState.DELIVERED]
        without_case = session.scalar(
            select(Message.message_id)
            .join(Statement, Statement.statement_id == Message.statement_id)
            .where(
                Message.state.in_(ended),
                Statement.channel != "print",
                Message.statement_id.not_in(select(ResendCase.statement_id)),
                Message.statement_id.not_in(
                    select(Message.statement_id).where(Message.state.in_(sent))
                ),
            )
        )
    unread = any(any((return_path / sub).iterdir()) for sub in ("new", "cur"))
    return waiting is None and without_case is None and not unread


@pytest.mark.slow
def test_soak_loops_killed_at_random_lose_nothing_and_duplicate_only_when_marked(
    tmp_path: Path, ledger_url: str
):
    seed = int(os.environ.get("EOB_SOAK_SEED", str(random.randrange(1 << 30))))
    print(f"soak seed {seed} (EOB_SOAK_SEED to repeat)")
    rng = random.Random(seed)
    policy_file = tmp_path / "sending.toml"
    policy = policy_toml(IPS, 2).replace("first_delay_seconds = 300", "first_delay_seconds = 1")
    policy_file.write_text(policy.replace("max_delay_seconds = 14400", "max_delay_seconds = 2"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    receiver = FlakyReceiver(data_dir / "returnpath", outage_seconds=4)
    with smtp_server(receiver, tmp_path / "certs") as port:
        settings = Settings(
            data_dir=data_dir,
            database_url=ledger_url,
            smtp_port=port,
            tls_ca_file=str(tmp_path / "certs" / "ca.pem"),
            sending_policy_file=str(policy_file),
        )
        env = os.environ | {
            "EOB_DATA_DIR": str(data_dir),
            "EOB_DATABASE_URL": ledger_url,
            "EOB_SMTP_PORT": str(port),
            "EOB_TLS_CA_FILE": settings.tls_ca_file,
            "EOB_SENDING_POLICY_FILE": str(policy_file),
        }
        sessions = open_ledger(ledger_url)  # migrated before any loop opens it
        loops = [Loop(step, env, tmp_path / f"{step}.log") for step in ("deliver", "returns")]
        try:
            for day in range(3):
                intake(settings, _drop(tmp_path, day))
                until = time.monotonic() + 6
                while time.monotonic() < until:
                    time.sleep(rng.uniform(0.3, 2.0))
                    rng.choice(loops).kill_and_restart()
                    _acknowledge_pauses(sessions, settings)
            deadline = time.monotonic() + 180
            while not _settled(sessions, receiver, data_dir / "returnpath"):
                assert time.monotonic() < deadline, _report(sessions, loops)
                _acknowledge_pauses(sessions, settings)
                time.sleep(0.5)
        finally:
            for loop in loops:
                loop.stop()
    print(f"kills: {[(loop.step, loop.kills) for loop in loops]}")
    assert all(loop.kills for loop in loops)

    received = Counter(
        str(message_from_bytes(a.content)["Message-ID"]).strip("<>").partition("@")[0]
        for a in receiver.arrivals
    )
    with sessions() as session:
        messages = session.scalars(select(Message)).all()
        by_id = {m.message_id: m for m in messages}
        statements = session.scalars(select(Statement)).all()
        case_statements = set(session.scalars(select(ResendCase.statement_id)))
    assert len(statements) == 3 * MEMBERS_PER_DROP
    # The receiver and the ledger agree.
    assert set(received) <= set(by_id)
    accepted_states = {MessageState.ACCEPTED, MessageState.DELIVERED, MessageState.BOUNCED}
    for message_id, count in received.items():
        assert by_id[message_id].state in accepted_states
        assert count == 1 or by_id[message_id].possible_duplicate, message_id
    for message in messages:
        if message.state in (MessageState.ACCEPTED, MessageState.DELIVERED):
            assert received[message.message_id] >= 1, message.message_id
    # Every statement has a path to its member.
    sent = {m.statement_id for m in messages if m.state == MessageState.ACCEPTED}
    for statement in statements:
        assert (
            statement.statement_id in sent
            or statement.statement_id in case_statements
            or statement.channel == "print"
        ), statement.statement_id
    # The refusals and late DSNs became cases; so did statements whose address was suppressed
    # (by an earlier drop's bounce) after their statement was made; nothing else did.
    bounced = {m.statement_id for m in messages if m.state == MessageState.BOUNCED}
    suppressed = {m.statement_id for m in messages if m.state == MessageState.SUPPRESSED}
    assert bounced <= case_statements <= bounced | suppressed
    assert any(receiver.refused(m.recipient) for m in messages if m.state == "bounced")
    assert any(receiver.late_dsn(m.recipient) for m in messages if m.state == "bounced")
    print(
        f"received {sum(received.values())} for {len(received)} messages, "
        f"{sum(m.possible_duplicate for m in messages)} marked possible_duplicate"
    )
