"""The send stage against real SMTP servers on loopback: TLS is required, outcomes recorded."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from pipeline.demo import free_port
from pipeline.send import Outcome, Outgoing, SendResult, SmtpTarget, send_all, tls_context
from pipeline.sink import ensure_certificates

HOST = "127.0.0.1"


class Recorder:
    """Accepts mail, records (peer address, recipients); answers `reply` for chosen recipients."""

    def __init__(self, replies: dict[str, str] | None = None) -> None:
        self.replies = replies or {}
        self.received: list[tuple[str, list[str]]] = []

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:  # fmt: skip
        if address in self.replies:
            return self.replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append((session.peer[0], list(envelope.rcpt_tos)))
        return "250 2.0.0 queued"


@contextmanager
def server(handler: Recorder, certs_dir: Path | None) -> Iterator[int]:
    """A server on a free port; with STARTTLS required when `certs_dir` is given."""
    port = free_port(HOST)
    kwargs: dict[str, object] = {}
    if certs_dir is not None:
        certs = ensure_certificates(certs_dir, HOST)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs.cert_file, certs.key_file)
        kwargs = {"tls_context": context, "require_starttls": True}
    controller = Controller(handler, hostname=HOST, port=port, **kwargs)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def outgoing(n: int, source_ip: str = "127.0.0.2") -> Outgoing:
    return Outgoing(
        message_id=f"m{n}", mail_from=f"bounces+m{n}@b.example", recipient=f"r{n}@example.org",
        source_ip=source_ip, ehlo_name="mta.example", content=b"Subject: t\r\n\r\nbody\r\n",
    )  # fmt: skip


def send(messages: list[Outgoing], port: int, ca_file: Path) -> list[SendResult]:
    started: list[str] = []
    results: list[SendResult] = []
    target = SmtpTarget(HOST, port, tls_context(ca_file), timeout=10)
    send_all(messages, target, before_send=lambda m: started.append(m.message_id),
             on_result=results.append)  # fmt: skip
    # Every message is announced before its transaction and gets exactly one result.
    assert sorted(started) == sorted(r.message_id for r in results)
    return results


def test_accepts_over_tls_from_each_planned_source_ip(tmp_path):
    handler = Recorder()
    with server(handler, tmp_path / "certs") as port:
        messages = [outgoing(1, "127.0.0.2"), outgoing(2, "127.0.0.3"), outgoing(3, "127.0.0.3")]
        results = send(messages, port, tmp_path / "certs" / "ca.pem")
    assert {r.outcome for r in results} == {Outcome.ACCEPTED}
    assert sorted(handler.received) == [
        ("127.0.0.2", ["r1@example.org"]),
        ("127.0.0.3", ["r2@example.org"]),
        ("127.0.0.3", ["r3@example.org"]),
    ]


def test_a_server_without_starttls_gets_nothing(tmp_path):
    ensure_certificates(tmp_path / "certs", HOST)
    handler = Recorder()
    with server(handler, None) as port:
        [result] = send([outgoing(1)], port, tmp_path / "certs" / "ca.pem")
    assert result.outcome == Outcome.DEFERRED and result.code is None
    assert handler.received == []


def test_an_untrusted_certificate_gets_nothing(tmp_path):
    ensure_certificates(tmp_path / "ours", HOST)
    handler = Recorder()
    with server(handler, tmp_path / "theirs") as port:
        [result] = send([outgoing(1)], port, tmp_path / "ours" / "ca.pem")
    assert result.outcome == Outcome.DEFERRED
    assert handler.received == []


@pytest.mark.parametrize(
    ("reply", "outcome", "code"),
    [
        ("550 5.1.1 <r2@example.org>: Recipient address rejected", Outcome.BOUNCED, 550),
        ("451 4.3.0 try again later", Outcome.DEFERRED, 451),
    ],
)
def test_rejected_recipients_get_their_outcome_and_the_rest_still_go(
    tmp_path, reply, outcome, code
):
    handler = Recorder({"r2@example.org": reply})
    with server(handler, tmp_path / "certs") as port:
        results = send([outgoing(1), outgoing(2), outgoing(3)], port, tmp_path / "certs" / "ca.pem")
    by_id = {r.message_id: r for r in results}
    assert (by_id["m2"].outcome, by_id["m2"].code) == (outcome, code)
    assert by_id["m1"].outcome == by_id["m3"].outcome == Outcome.ACCEPTED
    assert [rcpts for _, rcpts in handler.received] == [["r1@example.org"], ["r3@example.org"]]


def test_nothing_listening_defers(tmp_path):
    ensure_certificates(tmp_path / "certs", HOST)
    [result] = send([outgoing(1)], free_port(HOST), tmp_path / "certs" / "ca.pem")
    assert result.outcome == Outcome.DEFERRED
