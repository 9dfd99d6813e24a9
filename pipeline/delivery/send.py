"""Send stage: hand each message to SMTP over its planned source IP, shaped per provider.

Messages are grouped into lanes, one per (source IP, provider). A lane runs up to the provider's
max_connections_per_ip connections, each reused for up to max_messages_per_connection messages,
and paces them with one token bucket at max_rate_per_ip; back-off rules slow or suspend it.

TLS is required: STARTTLS, TLS >= the policy's minimum, a certificate the trust store verifies.
A receiver without that gets no PHI: the message gets the PHI-free portal notice instead (or
nothing, for print), and its outcome says so.

Persistence is injected as `record`, called with a batch of events: a Claim (the message is
about to be handed to SMTP) or a SendResult. Every attempted message gets one Claim before its
transaction and one SendResult after it; a message a suspended lane never attempted gets only a
SendResult with Outcome.HELD, one that cannot be composed only one with Outcome.FAILED. Events
are group-committed: a connection's next Claim is recorded in the same batch as its previous
result, and its transaction starts only once that batch is durable. So at any moment each
connection has at most one claimed message without a result, and the ledger is written once per
batch instead of twice per message. `record` may refuse a claim (another deliver process holds
the message): that message is skipped and gets no result. When `record` fails, every lane stops
before its next transaction and send_all raises that error.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import aiosmtplib

from pipeline.delivery.policy import SendingPolicy
from pipeline.delivery.routing import NoRoute, Route, Router
from pipeline.delivery.shaping import Lane, retry_hint_seconds
from pipeline.records.bounce_classes import SmtpStage

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    # The receiver offered no usable TLS: no PHI sent; the notice went out (code 2xx) or not.
    FALLBACK = "fallback"
    # Not attempted: its lane was suspended by a back-off rule.
    HELD = "held"
    # Not sent, and not worth retrying: the message could not be composed, or the server
    # cannot take its address (non-ASCII, no SMTPUTF8).
    FAILED = "failed"


@dataclass(frozen=True)
class Outgoing:
    message_id: str
    # Envelope sender: the VERP return path.
    mail_from: str
    recipient: str
    source_ip: str
    ehlo_name: str
    provider: str


@dataclass(frozen=True)
class SendResult:
    message_id: str
    outcome: Outcome
    # SMTP reply code, or None when no reply came (connection or TLS failure).
    code: int | None
    # Reply text; may name the recipient, so it goes to the ledger and never to a log.
    reply: str
    # Seconds the server (a retry hint) or a back-off suspension asks us to wait.
    retry_after: float | None = None
    # The command the server answered when it refused: the bounce rules tell a refused
    # recipient (RCPT) from a content filter (DATA) by it.
    smtp_stage: SmtpStage | None = None
    # The connection was lost or timed out after the end of DATA: the server may have taken it.
    possible_duplicate: bool = False


@dataclass(frozen=True)
class Claim:
    """The message is about to be handed to SMTP."""

    message: Outgoing


Event = Claim | SendResult


@dataclass(frozen=True)
class Callbacks:
    # The signed message bytes, built just before its claim (keeps memory flat); may raise.
    render: Callable[[Outgoing], bytes]
    # The PHI-free portal notice for a receiver without usable TLS.
    notice: Callable[[Outgoing], bytes]
    # Makes a batch of events durable, in order, and returns the ids of the claims it refused;
    # runs in a worker thread, one batch at a time.
    record: Callable[[Sequence[Event]], AbstractSet[str]]


class GroupCommit:
    """Collects events from every connection and writes them in batches, one at a time. Once
    a write fails, every commit raises its error: nothing more is claimed or sent."""

    def __init__(self, record: Callable[[Sequence[Event]], AbstractSet[str]]) -> None:
        self._record = record
        self._pending: list[tuple[Sequence[Event], asyncio.Future[AbstractSet[str]]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._failure: Exception | None = None

    async def commit(self, events: Sequence[Event]) -> AbstractSet[str]:
        """Return, once `events` are durable, the ids of the claims among them refused."""
        if self._failure is not None:
            raise self._failure
        done: asyncio.Future[AbstractSet[str]] = asyncio.get_running_loop().create_future()
        self._pending.append((events, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await done

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            refused: AbstractSet[str] = frozenset()
            if self._failure is None:
                try:
                    refused = await asyncio.to_thread(
                        self._record, [e for events, _ in batch for e in events]
                    )
                except Exception as err:  # every waiter, now and later, sees the ledger's error
                    self._failure = err
            for _, done in batch:
                if done.cancelled():  # its lane was stopped while it waited
                    continue
                if self._failure is not None:
                    done.set_exception(self._failure)
                else:
                    done.set_result(refused)


def tls_context(ca_file: Path | str, min_version: str = "1.2") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    return context


def send_all(
    messages: Sequence[Outgoing],
    policy: SendingPolicy,
    router: Router,
    tls: ssl.SSLContext,
    callbacks: Callbacks,
    clock: Callable[[], float] = time.monotonic,
    lanes: dict[tuple[str, str], Lane] | None = None,
) -> None:
    """Send every message in its lane; returns when every result is recorded. `lanes` keeps
    each lane's pace and back-off state from one call to the next (one deliver pass sends its
    backlog in several calls)."""
    lanes = {} if lanes is None else lanes
    queues: dict[tuple[str, str], deque[Outgoing]] = {}
    for message in messages:
        queues.setdefault((message.source_ip, message.provider), deque()).append(message)
    for ip, provider in queues:
        if (ip, provider) not in lanes:
            lanes[ip, provider] = Lane(ip, policy.providers[provider], policy.backoff, clock)

    async def main() -> None:
        env = _Env(policy, router, tls, callbacks, GroupCommit(callbacks.record))
        await asyncio.gather(*(_run_lane(lanes[key], queue, env) for key, queue in queues.items()))

    asyncio.run(main())


class _NoTls(Exception):
    """The receiver offered no STARTTLS, or its TLS failed (bad certificate, old version)."""

    def __init__(self, reason: str, plain: aiosmtplib.SMTP | None) -> None:
        super().__init__(reason)
        self.reason = reason
        # A connection still usable in clear (for the PHI-free notice only).
        self.plain = plain


@dataclass(frozen=True)
class _Env:
    """What every lane shares."""

    policy: SendingPolicy
    router: Router
    tls: ssl.SSLContext
    callbacks: Callbacks
    ledger: GroupCommit


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    route: Route
    sent: int = 0


async def _run_lane(lane: Lane, queue: deque[Outgoing], env: _Env) -> None:
    workers = 0 if lane.suspended else min(lane.provider.max_connections_per_ip, len(queue))
    await asyncio.gather(*(_lane_worker(lane, queue, env) for _ in range(workers)))
    if not queue:
        return
    wait = lane.suspended_until - lane.clock()
    log.warning("lane %s/%s suspended: %d messages held", lane.ip, lane.provider.name, len(queue))
    held = [SendResult(m.message_id, Outcome.HELD, None, "lane suspended", wait) for m in queue]
    queue.clear()
    await env.ledger.commit(held)


async def _lane_worker(lane: Lane, queue: deque[Outgoing], env: _Env) -> None:
    connection: _Connection | None = None
    # The previous message's result, recorded together with the next claim.
    unrecorded: list[Event] = []
    try:
        while queue and not lane.suspended:
            message = queue.popleft()
            try:
                content = env.callbacks.render(message)
            except Exception as err:  # one message that cannot be composed fails alone
                log.warning("message %s not composed: %s", message.message_id, type(err).__name__)
                reason = f"not composed: {type(err).__name__}"
                unrecorded.append(SendResult(message.message_id, Outcome.FAILED, None, reason))
                continue
            await lane.take()
            if lane.suspended:  # suspended by another connection's reply while we waited
                queue.appendleft(message)
                break
            no_route: NoRoute | None = None
            try:
                routes = await env.router.routes(message.source_ip, _domain(message.recipient))
            except NoRoute as err:
                routes, no_route = [], err
            if connection is not None and (
                connection.route not in routes
                or connection.sent >= lane.provider.max_messages_per_connection
                or not connection.client.is_connected
            ):
                await _close(connection.client)
                connection = None
            refused = await env.ledger.commit([*unrecorded, Claim(message)])
            unrecorded = []
            if message.message_id in refused:  # another deliver process has it
                continue
            if no_route is not None:
                # No host to try: the reply a server would have given (bounce or retry).
                reply = f"{no_route.status} {no_route.reason}"
                result = _replied(message, no_route.code, reply, SmtpStage.CONNECT)
            else:
                result, connection = await _attempt(connection, routes, message, content, env)
            # A message refused for its own sake (FAILED) says nothing about the lane.
            if result.outcome != Outcome.FAILED and (result.code is None or result.code >= 400):
                rule = lane.observe(result.code, result.reply)
                if rule is not None:
                    log.warning("back-off %s fired for %s/%s: %s", rule.name, lane.ip,
                                lane.provider.name, rule.action)  # fmt: skip
            unrecorded = [result]
    finally:
        if connection is not None:
            await _close(connection.client)
    if unrecorded:
        await env.ledger.commit(unrecorded)


async def _attempt(
    connection: _Connection | None,
    routes: Sequence[Route],
    message: Outgoing,
    content: bytes,
    env: _Env,
) -> tuple[SendResult, _Connection | None]:
    if connection is None:
        opened = await _connect(routes, message, env)
        if isinstance(opened, SendResult):
            return opened, None
        connection = opened
    result = await _transaction(connection.client, message, content)
    connection.sent += 1
    return result, connection if connection.client.is_connected else None


async def _connect(
    routes: Sequence[Route], message: Outgoing, env: _Env
) -> _Connection | SendResult:
    """A TLS connection to the first mail host that takes one, in order (RFC 5321 5.1: a host
    that cannot be reached, answers with a 4xx greeting or offers no usable TLS is passed
    over); when none does, the PHI-free fallback if one offered only clear text, else a retry."""
    no_tls: tuple[_NoTls, Route] | None = None
    failure: BaseException | None = None
    for route in routes:
        try:
            client = await _open(route, message, env.policy, env.tls)
        except _NoTls as err:
            if no_tls is None:
                no_tls = (err, route)
            elif err.plain is not None:
                err.plain.close()
            continue
        except (aiosmtplib.SMTPException, OSError) as err:
            failure = err
            continue
        if no_tls is not None and no_tls[0].plain is not None:
            no_tls[0].plain.close()
        return _Connection(client, route)
    if no_tls is not None:
        return await _fallback(no_tls[0], no_tls[1], message, env.policy, env.callbacks)
    log.warning("no connection from %s: %s", message.source_ip, type(failure).__name__)
    return _failed(message, failure or OSError("no mail host"))


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


async def _open(
    route: Route, message: Outgoing, policy: SendingPolicy, tls: ssl.SSLContext | None
) -> aiosmtplib.SMTP:
    """A connected client from the message's source IP; with `tls`, STARTTLS done or _NoTls."""
    client = aiosmtplib.SMTP(
        hostname=route.host,
        port=route.port,
        source_address=(message.source_ip, 0),
        local_hostname=message.ehlo_name,
        start_tls=False,
        timeout=policy.timeout_seconds,
    )
    await client.connect()
    await client.ehlo()
    if tls is None:
        return client
    if not client.supports_extension("starttls"):
        raise _NoTls("no STARTTLS offered", client)
    try:
        await client.starttls(tls_context=tls)
    except (ssl.SSLError, aiosmtplib.SMTPException) as err:
        client.close()
        raise _NoTls(f"TLS failed: {type(err).__name__}", None) from err
    # EHLO again now (RFC 3207), not lazily at MAIL: the transaction reads the extensions.
    await client.ehlo()
    if route.username and route.password:
        await client.login(route.username, route.password)
    return client


async def _fallback(
    no_tls: _NoTls, route: Route, message: Outgoing, policy: SendingPolicy, callbacks: Callbacks
) -> SendResult:
    """No PHI without TLS: send the PHI-free notice in clear, or nothing (print fallback)."""
    log.warning("no usable TLS from %s's receiver: %s", message.source_ip, no_tls.reason)
    if policy.tls_fallback == "print":
        if no_tls.plain is not None:
            await _close(no_tls.plain)
        return SendResult(message.message_id, Outcome.FALLBACK, None, no_tls.reason)
    try:
        plain = no_tls.plain or await _open(route, message, policy, None)
    except (aiosmtplib.SMTPException, OSError) as err:
        return SendResult(message.message_id, Outcome.FALLBACK, None, type(err).__name__)
    sent = await _transaction(plain, message, callbacks.notice(message))
    await _close(plain)
    return SendResult(
        message.message_id, Outcome.FALLBACK, sent.code, f"{no_tls.reason}; notice: {sent.reply}"
    )


async def _transaction(client: aiosmtplib.SMTP, message: Outgoing, content: bytes) -> SendResult:
    # An internationalized address (RFC 6531) needs a server that offers SMTPUTF8.
    utf8 = not message.recipient.isascii()
    if utf8 and not client.supports_extension("smtputf8"):
        reason = "non-ASCII address and no SMTPUTF8 offered"
        return SendResult(message.message_id, Outcome.FAILED, None, reason)
    stage = SmtpStage.MAIL
    try:
        options = [f"SIZE={len(content)}"] if client.supports_extension("size") else []
        await client.mail(message.mail_from, options=options + ["SMTPUTF8"] * utf8)
        stage = SmtpStage.RCPT
        await client.rcpt(message.recipient, encoding="utf-8" if utf8 else "ascii")
        stage = SmtpStage.DATA
        reply = await _data(client, content)
    except aiosmtplib.SMTPResponseException as err:
        await _reset(client, err.code)
        return _replied(message, err.code, err.message, stage)
    except _NoReplyAfterData as err:
        client.close()
        return SendResult(message.message_id, Outcome.DEFERRED, None, err.reason,
                          possible_duplicate=True)  # fmt: skip
    except (aiosmtplib.SMTPException, OSError) as err:
        # Dropped or timed out before the end of DATA: not taken, so it is retried later.
        client.close()
        return _failed(message, err)
    return SendResult(message.message_id, Outcome.ACCEPTED, reply.code, reply.message)


class _NoReplyAfterData(Exception):
    """The connection was lost or timed out after the end of DATA: the server may have taken
    the message (RFC 1047), so a retry is a possible duplicate."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _data(client: aiosmtplib.SMTP, content: bytes) -> aiosmtplib.SMTPResponse:
    """DATA with the content dot-stuffed here: aiosmtplib's data() normalizes line ends and
    dot-stuffs with regular expressions, about 1.5 ms of CPU per 55 KB message, where
    splitting on line ends and one bytes.replace do the same in a tenth of that."""
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    assert client.protocol is not None  # connected: execute_command succeeded
    payload = b"\r\n" + b"\r\n".join(content.splitlines())
    client.protocol.write(payload.replace(b"\r\n.", b"\r\n..")[2:] + b"\r\n.\r\n")
    # No await between the write and read_response: the reply cannot arrive unawaited.
    try:
        reply = await client.protocol.read_response(timeout=client.timeout)
    except (aiosmtplib.SMTPException, OSError) as err:
        raise _NoReplyAfterData(f"no reply after DATA: {type(err).__name__}") from err
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


def _replied(message: Outgoing, code: int, text: str, stage: SmtpStage) -> SendResult:
    if 500 <= code < 600:
        return SendResult(message.message_id, Outcome.BOUNCED, code, text, smtp_stage=stage)
    outcome = Outcome.ACCEPTED if 200 <= code < 300 else Outcome.DEFERRED
    return SendResult(message.message_id, outcome, code, text, retry_hint_seconds(text))


def _failed(message: Outgoing, err: BaseException) -> SendResult:
    return SendResult(message.message_id, Outcome.DEFERRED, None, type(err).__name__)


async def _reset(client: aiosmtplib.SMTP, code: int) -> None:
    """Ready the connection for the next message; 421 means the server is closing it."""
    if code == 421 or not client.is_connected:
        client.close()
        return
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


async def _close(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()
