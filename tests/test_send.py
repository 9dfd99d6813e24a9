"""The sender against real SMTP servers on loopback: TLS required, outcomes, shaping, faults.

Limits are asserted at the receiver, from the source address each message arrived from.
"""

from __future__ import annotations

import statistics
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.delivery.policy import DEFAULT_POLICY_FILE, SendingPolicy, parse_policy
from pipeline.delivery.routing import NoRoute, Route
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
from pipeline.ops.demo import free_port
from pipeline.ops.sink import ensure_certificates
from pipeline.records.bounce_classes import smtp_rejection
from pipeline.returns.bounces import BounceClass, SmtpStage
from tests.smtp_servers import HOST, Receiver, Script, smtp_server

IPS = ("127.0.0.20", "127.0.0.21")


def policy(**default_provider: Any) -> SendingPolicy:
    """The shipped policy over IPS, with the default provider's shaping overridden."""
    raw = tomllib.loads(DEFAULT_POLICY_FILE.read_text())
    raw["pool"] = [{"address": ip, "ehlo_name": f"mta{i}.test", "weight": 1}
                   for i, ip in enumerate(IPS)]  # fmt: skip
    raw["delivery"]["timeout_seconds"] = default_provider.pop("timeout", 5.0)
    raw["tls"]["fallback"] = default_provider.pop("fallback", "notification")
    if "backoff" in default_provider:
        raw["backoff"] = default_provider.pop("backoff")
    raw["providers"]["default"].update(default_provider)
    return parse_policy(raw)


class FixedRoute:
    """Every domain's mail hosts: the server under test, after any hosts listed before it;
    a domain in `unroutable` has none (the router's NoRoute)."""

    def __init__(
        self,
        port: int,
        before: tuple[Route, ...] = (),
        unroutable: dict[str, NoRoute] | None = None,
    ) -> None:
        self.hosts = [*before, Route(HOST, port)]
        self.unroutable = unroutable or {}

    async def routes(self, source_ip: str, domain: str) -> list[Route]:
        if domain in self.unroutable:
            raise self.unroutable[domain]
        return self.hosts


def outgoing(n: int, source_ip: str = IPS[0]) -> Outgoing:
    return Outgoing(message_id=f"m{n}", mail_from=f"bounces+m{n}@b.example",
                    recipient=f"r{n}@example.org", source_ip=source_ip, ehlo_name="mta.test",
                    provider="default")  # fmt: skip


def statement(message: Outgoing) -> bytes:
    return f"Subject: statement\r\nX-Id: {message.message_id}\r\n\r\nPHI\r\n".encode()


def send(
    messages: list[Outgoing],
    port: int,
    ca_file: Path,
    sending: SendingPolicy | None = None,
    render: Callable[[Outgoing], bytes] = statement,
    router: FixedRoute | None = None,
) -> dict[str, SendResult]:
    events: list[Event] = []

    def record(batch: Sequence[Event]) -> frozenset[str]:
        events.extend(batch)
        return frozenset()  # every claim granted

    callbacks = Callbacks(
        render=render,
        notice=lambda m: f"Subject: notice\r\nX-Id: {m.message_id}\r\n\r\nportal\r\n".encode(),
        record=record,
    )
    send_all(
        messages,
        sending or policy(),
        router or FixedRoute(port),
        tls_context(str(ca_file)),
        callbacks,
    )
    claimed = [e.message.message_id for e in events if isinstance(e, Claim)]
    results = [e for e in events if isinstance(e, SendResult)]
    # Each message gets exactly one result; each attempted one was claimed once, before it.
    assert sorted(r.message_id for r in results) == sorted(m.message_id for m in messages)
    # A held message was never claimed; one that could not be composed may not have been.
    assert len(claimed) == len(set(claimed))
    for result in results:
        if result.outcome == Outcome.HELD:
            assert result.message_id not in claimed
        elif result.outcome != Outcome.FAILED:
            assert result.message_id in claimed
    claimed_at = {e.message.message_id: i for i, e in enumerate(events) if isinstance(e, Claim)}
    for at, event in enumerate(events):
        if isinstance(event, SendResult) and event.message_id in claimed_at:
            assert claimed_at[event.message_id] < at
    return {r.message_id: r for r in results}


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    ensure_certificates(tmp_path / "certs", HOST)
    return tmp_path / "certs"


def test_accepts_over_tls_from_each_planned_source_ip(certs):
    receiver = Receiver(Script())
    with smtp_server(receiver, certs) as port:
        messages = [outgoing(1, IPS[0]), outgoing(2, IPS[1]), outgoing(3, IPS[1])]
        results = send(messages, port, certs / "ca.pem")
    assert {r.outcome for r in results.values()} == {Outcome.ACCEPTED}
    assert sorted((a.peer, a.recipients) for a in receiver.arrivals) == [
        (IPS[0], ("r1@example.org",)),
        (IPS[1], ("r2@example.org",)),
        (IPS[1], ("r3@example.org",)),
    ]


def test_content_arrives_intact_with_dot_stuffing_and_crlf_line_ends(certs):
    # Lines that start with a dot, a lone dot (the end-of-data marker), bare LF and CR.
    content = b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nbare LF\nbare CR\rend"
    receiver = Receiver(Script())
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(1)], port, certs / "ca.pem", render=lambda _: content)
    assert results["m1"].outcome == Outcome.ACCEPTED and results["m1"].code == 250
    [arrival] = receiver.arrivals
    assert arrival.content == (
        b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nbare LF\r\nbare CR\r\nend\r\n"
    )


def test_a_server_without_starttls_gets_the_notice_and_no_phi(certs):
    receiver = Receiver(Script())
    with smtp_server(receiver, None) as port:
        results = send([outgoing(1)], port, certs / "ca.pem")
    assert results["m1"].outcome == Outcome.FALLBACK and results["m1"].code == 250
    [arrival] = receiver.arrivals
    assert b"Subject: notice" in arrival.content and b"PHI" not in arrival.content


def test_an_untrusted_certificate_gets_the_notice_and_no_phi(tmp_path, certs):
    receiver = Receiver(Script())
    with smtp_server(receiver, tmp_path / "theirs", require_starttls=False) as port:
        results = send([outgoing(1), outgoing(2)], port, certs / "ca.pem")
    assert {r.outcome for r in results.values()} == {Outcome.FALLBACK}
    assert len(receiver.arrivals) == 2
    assert not any(b"PHI" in a.content for a in receiver.arrivals)


def test_print_fallback_sends_nothing_without_tls(certs):
    receiver = Receiver(Script())
    with smtp_server(receiver, None) as port:
        results = send([outgoing(1)], port, certs / "ca.pem", policy(fallback="print"))
    assert results["m1"].outcome == Outcome.FALLBACK and results["m1"].code is None
    assert receiver.arrivals == []


@pytest.mark.parametrize(
    ("reply", "outcome", "code"),
    [
        ("550 5.1.1 <r2@example.org>: Recipient address rejected", Outcome.BOUNCED, 550),
        ("451 4.3.0 try again later", Outcome.DEFERRED, 451),
        ("452 4.2.2 mailbox full", Outcome.DEFERRED, 452),
        ("421 4.7.0 closing connection", Outcome.DEFERRED, 421),
    ],
)
def test_rejected_recipients_get_their_outcome_and_the_rest_still_go(certs, reply, outcome, code):
    receiver = Receiver(Script(rcpt_replies={"r2@example.org": reply}))
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(1), outgoing(2), outgoing(3)], port, certs / "ca.pem",
                       policy(max_connections_per_ip=1))  # fmt: skip
    assert (results["m2"].outcome, results["m2"].code) == (outcome, code)
    assert results["m1"].outcome == results["m3"].outcome == Outcome.ACCEPTED
    assert [a.recipients for a in receiver.arrivals] == [("r1@example.org",), ("r3@example.org",)]


@pytest.mark.parametrize(
    ("script", "stage", "bounce_class"),
    [
        (Script(rcpt_replies={"r1@example.org": "550 User unknown"}), SmtpStage.RCPT,
         BounceClass.HARD_BOUNCE),
        (Script(data_reply="550 User unknown"), SmtpStage.DATA, BounceClass.POLICY_BLOCK),
    ],
)  # fmt: skip
def test_a_refusal_carries_the_command_it_answered_into_the_bounce_rules(
    certs, script, stage, bounce_class
):
    # The same words: an unknown address when RCPT is refused, a content filter's answer
    # after DATA (the address was accepted), as sisimai and the rules file read a DSN.
    with smtp_server(Receiver(script), certs) as port:
        result = send([outgoing(1)], port, certs / "ca.pem")["m1"]
    assert (result.outcome, result.smtp_stage) == (Outcome.BOUNCED, stage)
    assert smtp_rejection(result.code or 0, result.reply, result.smtp_stage)[1] == bounce_class


def test_a_retry_hint_is_passed_on(certs):
    receiver = Receiver(
        Script(rcpt_replies={"r1@example.org": "450 4.2.0 try again in 10 minutes"})
    )
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(1)], port, certs / "ca.pem")
    assert results["m1"].outcome == Outcome.DEFERRED and results["m1"].retry_after == 600


def test_a_connection_dropped_after_the_final_dot_defers_as_a_possible_duplicate(certs):
    # The server has the whole message, then drops the connection instead of answering.
    receiver = Receiver(Script(drop_in_data=frozenset({"r2@example.org"})))
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(n) for n in range(1, 5)], port, certs / "ca.pem",
                       policy(max_connections_per_ip=1))  # fmt: skip
    assert (results["m2"].outcome, results["m2"].code) == (Outcome.DEFERRED, None)
    assert results["m2"].possible_duplicate
    assert [results[f"m{n}"].outcome for n in (1, 3, 4)] == [Outcome.ACCEPTED] * 3
    assert not any(results[f"m{n}"].possible_duplicate for n in (1, 3, 4))
    assert len({a.connection for a in receiver.arrivals}) == 2


def test_a_refusal_before_data_is_a_plain_retry(certs):
    receiver = Receiver(Script(rcpt_replies={"r1@example.org": "451 4.3.0 try later"}))
    with smtp_server(receiver, certs) as port:
        result = send([outgoing(1)], port, certs / "ca.pem")["m1"]
    assert result.outcome == Outcome.DEFERRED and not result.possible_duplicate


@pytest.mark.parametrize(("delay", "outcome"), [(0.2, Outcome.ACCEPTED), (1.5, Outcome.DEFERRED)])
def test_a_slow_server_is_waited_for_up_to_the_timeout(certs, delay, outcome):
    receiver = Receiver(Script(data_delay=delay))
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(1)], port, certs / "ca.pem", policy(timeout=0.8))
    assert results["m1"].outcome == outcome
    # A timeout after the final dot: the server may have taken it.
    assert results["m1"].possible_duplicate == (outcome == Outcome.DEFERRED)


@pytest.mark.timeout(60)
def test_a_message_that_cannot_be_composed_fails_alone(certs):
    def render(message: Outgoing) -> bytes:
        if message.message_id == "m2":
            raise UnicodeEncodeError("ascii", "x", 0, 1, "not ASCII")
        return statement(message)

    receiver = Receiver(Script())
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(n) for n in range(1, 5)], port, certs / "ca.pem",
                       policy(max_connections_per_ip=1), render=render)  # fmt: skip
    assert results["m2"].outcome == Outcome.FAILED and results["m2"].code is None
    assert results["m2"].reply == "not composed: UnicodeEncodeError"
    assert [results[f"m{n}"].outcome for n in (1, 3, 4)] == [Outcome.ACCEPTED] * 3
    assert len(receiver.arrivals) == 3


@pytest.mark.timeout(60)
def test_a_ledger_that_fails_stops_every_lane_before_its_next_transaction(certs):
    durable: list[Sequence[Event]] = []
    calls = 0

    def record(batch: Sequence[Event]) -> frozenset[str]:
        nonlocal calls
        calls += 1
        if calls == 4:  # one failed write, e.g. a full disk
            raise OSError("disk full")
        durable.append(batch)
        return frozenset()

    callbacks = Callbacks(statement, statement, record)
    receiver = Receiver(Script())
    with smtp_server(receiver, certs) as port, pytest.raises(OSError, match="disk full"):
        messages = [outgoing(n, IPS[n % 2]) for n in range(40)]
        send_all(messages, policy(max_connections_per_ip=2), FixedRoute(port),
                 tls_context(str(certs / "ca.pem")), callbacks)  # fmt: skip
    # Nothing is written after the failure, and nothing was sent but what a durable batch
    # claimed.
    assert calls == 4
    claimed = {e.message.recipient for b in durable for e in b if isinstance(e, Claim)}
    assert {r for a in receiver.arrivals for r in a.recipients} <= claimed
    assert len(receiver.arrivals) < 40


def test_a_refused_claim_is_not_sent_and_gets_no_result(certs):
    events: list[Event] = []

    def record(batch: Sequence[Event]) -> frozenset[str]:
        events.extend(batch)
        return frozenset({"m2"})  # another deliver process holds m2

    receiver, callbacks = Receiver(Script()), Callbacks(statement, statement, record)
    with smtp_server(receiver, certs) as port:
        send_all([outgoing(n) for n in range(1, 4)], policy(), FixedRoute(port),
                 tls_context(str(certs / "ca.pem")), callbacks)  # fmt: skip
    assert sorted(e.message_id for e in events if isinstance(e, SendResult)) == ["m1", "m3"]
    assert sorted(r for a in receiver.arrivals for r in a.recipients) == [
        "r1@example.org",
        "r3@example.org",
    ]


def test_the_next_mail_host_is_tried_when_one_cannot_be_reached(certs):
    # RFC 5321 5.1: the MX hosts in order; one that does not answer is passed over.
    receiver = Receiver(Script())
    nobody = Route(HOST, free_port(HOST))
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(1), outgoing(2)], port, certs / "ca.pem",
                       router=FixedRoute(port, before=(nobody,)))  # fmt: skip
    assert {r.outcome for r in results.values()} == {Outcome.ACCEPTED}
    assert len(receiver.arrivals) == 2


def test_a_domain_without_mail_hosts_bounces_or_waits_as_its_reply_says(certs):
    null_mx = NoRoute("the domain accepts no mail (null MX)", code=556, status="5.1.10")
    lookup_failed = NoRoute("the MX lookup failed", code=451, status="4.4.3")
    receiver = Receiver(Script())
    messages = [outgoing(1), outgoing(2), outgoing(3)]
    with smtp_server(receiver, certs) as port:
        router = FixedRoute(port)
        # FixedRoute keys on the domain: give each message its own.
        messages = [replace(m, recipient=m.recipient.replace("example.org", f"d{n}.example"))
                    for n, m in enumerate(messages, 1)]  # fmt: skip
        router.unroutable = {"d1.example": null_mx, "d2.example": lookup_failed}
        results = send(messages, port, certs / "ca.pem", router=router)
    assert (results["m1"].outcome, results["m1"].code) == (Outcome.BOUNCED, 556)
    assert smtp_rejection(556, results["m1"].reply, results["m1"].smtp_stage)[0] == "5.1.10"
    assert (results["m2"].outcome, results["m2"].code) == (Outcome.DEFERRED, 451)
    assert results["m3"].outcome == Outcome.ACCEPTED
    assert [a.recipients for a in receiver.arrivals] == [("r3@d3.example",)]


def test_nothing_listening_defers(certs):
    results = send([outgoing(1)], free_port(HOST), certs / "ca.pem")
    assert results["m1"].outcome == Outcome.DEFERRED and results["m1"].code is None


def arrival_rate(times: list[float]) -> float:
    """Messages per second at the receiver: the least-squares slope of arrival number over
    time. Unlike (n - 1) / span, one arrival delayed by a busy machine at either end barely
    moves it, while a lane that really runs fast or slow still shows."""
    return statistics.linear_regression(times, range(len(times))).slope


def test_per_ip_rate_connections_and_reuse_hold_at_the_receiver(certs):
    per_ip, rate = 30, 20.0
    receiver = Receiver(Script())
    shaping = policy(max_connections_per_ip=3, max_messages_per_connection=4, max_rate_per_ip=rate)
    messages = [outgoing(n, IPS[n % 2]) for n in range(2 * per_ip)]
    with smtp_server(receiver, certs) as port:
        results = send(messages, port, certs / "ca.pem", shaping)
    assert {r.outcome for r in results.values()} == {Outcome.ACCEPTED}
    assert receiver.per_peer() == {IPS[0]: per_ip, IPS[1]: per_ip}
    for ip in IPS:
        times = sorted(a.at for a in receiver.arrivals if a.peer == ip)
        assert arrival_rate(times) == pytest.approx(rate, rel=0.05)
        assert 1 <= receiver.max_open[ip] <= 3
    per_connection = Counter(a.connection for a in receiver.arrivals)
    assert max(per_connection.values()) <= 4
    assert len(per_connection) >= 2 * per_ip // 4


def test_throttle_replies_slow_the_lane(certs):
    throttled = {f"r{n}@example.org": "451 4.7.0 rate limited, slow down" for n in range(2)}
    receiver = Receiver(Script(rcpt_replies=throttled))
    rule = {"name": "rl", "pattern": "rate limited", "threshold_per_hour": 2, "action": "slow",
            "rate": 5.0, "duration_minutes": 10}  # fmt: skip
    shaping = policy(max_connections_per_ip=1, max_rate_per_ip=100.0, backoff=[rule])
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(n) for n in range(12)], port, certs / "ca.pem", shaping)
    assert [results[f"m{n}"].outcome for n in range(2)] == [Outcome.DEFERRED] * 2
    times = sorted(a.at for a in receiver.arrivals)
    assert len(times) == 10
    assert arrival_rate(times) == pytest.approx(5.0, rel=0.1)


def test_a_block_reply_suspends_the_lane_and_holds_the_rest(certs):
    blocked = {"r0@example.org": "421 4.7.28 blocked by policy"}
    receiver = Receiver(Script(rcpt_replies=blocked))
    rule = {"name": "blocked", "pattern": "blocked", "threshold_per_hour": 1, "action": "suspend",
            "duration_minutes": 30}  # fmt: skip
    shaping = policy(max_connections_per_ip=1, backoff=[rule])
    with smtp_server(receiver, certs) as port:
        results = send([outgoing(n) for n in range(5)], port, certs / "ca.pem", shaping)
    assert results["m0"].outcome == Outcome.DEFERRED
    held = [results[f"m{n}"] for n in range(1, 5)]
    assert {r.outcome for r in held} == {Outcome.HELD}
    assert all(r.retry_after is not None and 1790 < r.retry_after <= 1800 for r in held)
    assert receiver.arrivals == []
