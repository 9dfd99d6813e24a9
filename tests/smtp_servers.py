"""Real SMTP servers on loopback for the send tests: aiosmtpd with scripted faults.

The server records each message's peer source address, connection and time, and how many
connections each peer holds at once, so per-IP limits are checked where they matter: at the
receiver.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from pipeline.config import Settings
from pipeline.ops.demo import free_port
from pipeline.ops.sink import ensure_certificates
from pipeline.records.atrest import load_keyring, write_encrypted
from pipeline.records.ledger import open_ledger
from pipeline.records.ledger.models import Statement
from pipeline.runner import run_stage
from tests.conftest import REPO
from tests.ledger_seed import seed_run_and_file

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Arrival:
    peer: str
    connection: int
    at: float
    recipients: tuple[str, ...]
    content: bytes


@dataclass
class Script:
    """How the server misbehaves. Replies are keyed by recipient address."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 queued"
    # Recipients whose DATA the server answers by dropping the connection.
    drop_in_data: frozenset[str] = frozenset()
    data_delay: float = 0.0


class Receiver:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.arrivals: list[Arrival] = []
        # Connections open per peer; one ends at QUIT or, without QUIT, when it drops.
        self.open_connections: dict[str, set[int]] = {}
        self.max_open: Counter[str] = Counter()
        self.connections = 0

    def connected(self, peer: str) -> int:
        self.connections += 1
        open_now = self.open_connections.setdefault(peer, set())
        open_now.add(self.connections)
        self.max_open[peer] = max(self.max_open[peer], len(open_now))
        return self.connections

    def disconnected(self, peer: str, connection: int) -> None:
        self.open_connections[peer].discard(connection)

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.disconnected(session.peer[0], session.connection_number)  # type: ignore[attr-defined]
        return "221 Bye"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:  # fmt: skip
        if address in self.script.rcpt_replies:
            return self.script.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.script.data_delay:
            await asyncio.sleep(self.script.data_delay)
        if set(envelope.rcpt_tos) & self.script.drop_in_data:
            assert server.transport is not None
            server.transport.close()
            return "421 gone"
        self.arrivals.append(
            Arrival(
                session.peer[0],
                session.connection_number,
                time.monotonic(),  # type: ignore[attr-defined]
                tuple(envelope.rcpt_tos),
                envelope.original_content or b"",
            )  # fmt: skip
        )
        return self.script.data_reply

    def per_peer(self) -> Counter[str]:
        return Counter(a.peer for a in self.arrivals)


class _CountingSMTP(SMTP):
    def connection_made(self, transport: Any) -> None:
        # STARTTLS calls this again on the same connection, with the TLS transport.
        first = not hasattr(self, "peer_address")
        super().connection_made(transport)
        if first:
            self.peer_address: str = transport.get_extra_info("peername")[0]
            self.connection_number = self.event_handler.connected(self.peer_address)
        self.session.connection_number = self.connection_number  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.event_handler.disconnected(self.peer_address, self.connection_number)
        super().connection_lost(exc)


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


@contextmanager
def smtp_server(
    receiver: Receiver,
    certs_dir: Path | None,
    host: str = HOST,
    require_starttls: bool = True,
    smtputf8: bool = False,
) -> Iterator[int]:
    """A server on a free port; STARTTLS offered when `certs_dir` is given, SMTPUTF8 when
    `smtputf8`."""
    port = free_port(host)
    kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8}
    if certs_dir is not None:
        certs = ensure_certificates(certs_dir, host)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs.cert_file, certs.key_file)
        kwargs |= {"tls_context": context, "require_starttls": require_starttls}
    controller = _Controller(receiver, hostname=host, port=port, ready_timeout=10, **kwargs)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def policy_toml(
    ips: Sequence[str],
    connections_per_ip: int,
    fallback: str = "notification",
    *,
    rate_per_ip: float = 10000.0,
    messages_per_connection: int = 500,
    dkim_key_file: str = "",
) -> str:
    """The shipped policy's delivery/TLS/retry settings over `ips`, fully warmed, fast.
    Also the Postfix benchmark's policy (benchmarks/send_postfix.py)."""
    shipped = (REPO / "config" / "sending.toml").read_text().split("[[pool]]", 1)[0]
    shipped = shipped.replace('fallback = "notification"', f'fallback = "{fallback}"')
    shipped = shipped.replace('key_file = ""', f'key_file = "{dkim_key_file}"')
    pool = "".join(f'[[pool]]\naddress = "{ip}"\nehlo_name = "mta{i}.test"\nweight = 1\n\n'
                   for i, ip in enumerate(ips))  # fmt: skip
    return (
        shipped
        + pool
        + f"""
[warmup]
daily_cap = [1000000]

[providers.default]
domains = []
mx_suffixes = []
max_connections_per_ip = {connections_per_ip}
max_messages_per_connection = {messages_per_connection}
max_rate_per_ip = {rate_per_ip}
"""
    )


def seed_run(settings: Settings, count: int, run_id: str = "rsend") -> str:
    """A run with `count` email statements (member<n>@example.org) and their PDF, planned."""
    sessions = open_ledger(settings.ledger_url)
    # Encrypted at rest as the render stage leaves them, bound to each statement's id.
    pdf_dir = settings.runs_dir / run_id / "pdf"
    pdf_dir.mkdir(parents=True)
    tiny, keyring = (
        (REPO / "tests" / "data" / "tiny.pdf").read_bytes(),
        load_keyring(settings.data_dir),
    )
    for n in range(count):
        write_encrypted(pdf_dir / f"s{n:05d}.pdf", tiny, keyring, f"s{n:05d}")
    with sessions.begin() as session:
        seed_run_and_file(session, run_id)
        session.add_all(
            Statement(
                statement_id=f"s{n:05d}",
                run_id=run_id,
                file_id=1,
                member_id=f"M{n}",
                channel="email",
                email=f"member{n}@example.org",
                claim_lines=1,
                member_owes=0,
                pdf_path=f"pdf/s{n:05d}.pdf",
            )  # fmt: skip
            for n in range(count)
        )
    run_stage(settings, run_id, "plan")
    return run_id


def deliver_settings(
    tmp_path: Path,
    port: int,
    database_url: str = "",
    ips: Sequence[str] = ("127.0.0.30",),
    connections_per_ip: int = 1,
    fallback: str = "notification",
) -> Settings:
    """Settings for a deliver pass against a test server on `port` (TLS from tmp_path/certs)."""
    policy_file = tmp_path / "sending.toml"
    policy_file.write_text(policy_toml(ips, connections_per_ip, fallback))
    return Settings(data_dir=tmp_path / "data", database_url=database_url, smtp_port=port,
                    tls_ca_file=str(tmp_path / "certs" / "ca.pem"),
                    sending_policy_file=str(policy_file))  # fmt: skip


def deliver(settings: Settings) -> dict[str, int]:
    """One deliver pass in this process, as `eob deliver` runs it."""
    from pipeline.delivery.steps import send_due
    from pipeline.records.run_context import LedgerContext, ledger_sessions

    return send_due(LedgerContext(settings, ledger_sessions(settings.ledger_url)))


# One deliver pass in a child process; an EobError ends it with its one-line message, as
# the command line does. {setup} runs first (e.g. to limit the database's size).
_DELIVER_CHILD = """
import sys
from pipeline.config import load_settings
from pipeline.delivery.steps import send_due
from pipeline.errors import EobError
from pipeline.records.run_context import LedgerContext, ledger_sessions
{setup}
settings = load_settings()
try:
    print(send_due(LedgerContext(settings, ledger_sessions(settings.ledger_url))))
except EobError as err:
    print(err, file=sys.stderr)
    sys.exit(1)
"""


def deliver_process(settings: Settings, setup: str = "") -> subprocess.Popen[str]:
    """A deliver pass in a child process (`python -c`), configured by EOB_* variables."""
    env = os.environ | {
        "EOB_DATA_DIR": str(settings.data_dir),
        "EOB_DATABASE_URL": settings.ledger_url,
        "EOB_SMTP_PORT": str(settings.smtp_port),
        "EOB_TLS_CA_FILE": str(settings.tls_ca_file),
        "EOB_SENDING_POLICY_FILE": str(settings.sending_policy_file),
    }
    return subprocess.Popen(
        [sys.executable, "-c", _DELIVER_CHILD.format(setup=setup)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def arrived_message_ids(receiver: Receiver) -> Counter[str]:
    """How many times each message (by its Message-ID's local part) reached the receiver."""
    return Counter(
        str(message_from_bytes(a.content)["Message-ID"]).strip("<>").split("@")[0]
        for a in receiver.arrivals
    )
