"""Send stage: hand each message to SMTP over its planned source IP, TLS required.

One connection per source IP, reused for that IP's messages; the IPs send concurrently.
The receiver must offer STARTTLS and present a certificate the trust store verifies, with
TLS 1.2 at least; otherwise nothing is sent (no PHI travels in clear).
Persistence is injected: `on_result` records each outcome before the next message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import aiosmtplib

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True)
class Outgoing:
    message_id: str
    # Envelope sender: the VERP return path.
    mail_from: str
    recipient: str
    source_ip: str
    ehlo_name: str
    content: bytes


@dataclass(frozen=True)
class SendResult:
    message_id: str
    outcome: Outcome
    # SMTP reply code, or None when no reply came (connection or TLS failure).
    code: int | None
    # Reply text; may name the recipient, so it goes to the ledger and never to a log.
    reply: str


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    tls: ssl.SSLContext
    timeout: float


def tls_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def send_all(
    messages: Sequence[Outgoing],
    target: SmtpTarget,
    *,
    before_send: Callable[[Outgoing], None],
    on_result: Callable[[SendResult], None],
) -> None:
    """Send every message; `before_send` runs before its SMTP transaction, `on_result` after."""
    by_ip: dict[str, list[Outgoing]] = defaultdict(list)
    for message in messages:
        by_ip[message.source_ip].append(message)

    async def main() -> None:
        await asyncio.gather(
            *(_send_over_ip(batch, target, before_send, on_result) for batch in by_ip.values())
        )

    asyncio.run(main())


async def _send_over_ip(
    batch: list[Outgoing],
    target: SmtpTarget,
    before_send: Callable[[Outgoing], None],
    on_result: Callable[[SendResult], None],
) -> None:
    first = batch[0]
    client = aiosmtplib.SMTP(
        hostname=target.host,
        port=target.port,
        source_address=(first.source_ip, 0),
        local_hostname=first.ehlo_name,
        start_tls=True,
        tls_context=target.tls,
        timeout=target.timeout,
    )
    try:
        for message in batch:
            before_send(message)
            on_result(await _transaction(client, message))
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()


async def _transaction(client: aiosmtplib.SMTP, message: Outgoing) -> SendResult:
    if not client.is_connected:
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError) as err:
            # Also a missing STARTTLS offer or a certificate that does not verify: nothing sent.
            log.warning("no TLS session from %s: %s", message.source_ip, type(err).__name__)
            return SendResult(message.message_id, Outcome.DEFERRED, None, type(err).__name__)
    try:
        _, reply = await client.sendmail(message.mail_from, [message.recipient], message.content)
    except aiosmtplib.SMTPRecipientsRefused as err:
        refused = err.recipients[0]
        await client.rset()
        return SendResult(message.message_id, _outcome(refused.code), refused.code, refused.message)
    except aiosmtplib.SMTPResponseException as err:
        if client.is_connected:
            await client.rset()
        return SendResult(message.message_id, _outcome(err.code), err.code, err.message)
    except (aiosmtplib.SMTPException, OSError) as err:
        # Dropped mid-transaction: the outcome is unknown, so it is retried later.
        client.close()
        return SendResult(message.message_id, Outcome.DEFERRED, None, type(err).__name__)
    return SendResult(message.message_id, Outcome.ACCEPTED, 250, reply)


def _outcome(code: int) -> Outcome:
    return Outcome.BOUNCED if 500 <= code < 600 else Outcome.DEFERRED
