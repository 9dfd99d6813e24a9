"""A local TLS SMTP sink standing in for the receiving side in demos and tests.

It requires STARTTLS with a certificate from its own CA (written to data_dir/sink/ca.pem, the
sender's trust store by default), keeps every accepted message in a maildir with the peer's
source address, and behaves as a relay whose next hop does not know some mailboxes: for those
recipients it writes an RFC 3464 DSN, as Postfix words one, to the return-path maildir.
"""

from __future__ import annotations

import logging
import mailbox
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

SINK_HOSTNAME = "sink.eob.test"
# aiosmtpd logs every envelope address at INFO: addresses are PHI, so only its warnings pass.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@dataclass(frozen=True)
class SinkCertificates:
    ca_file: Path
    cert_file: Path
    key_file: Path


def ensure_certificates(directory: Path, host: str) -> SinkCertificates:
    """A CA and a server certificate for `host`, made once and kept."""
    certs = SinkCertificates(
        directory / "ca.pem", directory / "server.pem", directory / "server.key"
    )
    if not certs.ca_file.exists():
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert(host, "localhost", SINK_HOSTNAME)
        server.private_key_pem.write_to_path(str(certs.key_file))
        certs.key_file.chmod(0o600)
        server.cert_chain_pems[0].write_to_path(str(certs.cert_file))
        ca.cert_pem.write_to_path(str(certs.ca_file))
    return certs


class SinkHandler:
    def __init__(self, inbox: Path, return_path: Path, unknown_mailboxes: frozenset[str]) -> None:
        self.inbox = mailbox.Maildir(inbox, create=True)
        self.return_path = mailbox.Maildir(return_path, create=True)
        self.unknown_mailboxes = unknown_mailboxes

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        trace = (
            f"Return-Path: <{envelope.mail_from}>\r\n"
            f"X-Sink-Peer: {peer}\r\n"
            f"X-Sink-Rcpt: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        self.inbox.add(trace + content)
        unknown = [r for r in envelope.rcpt_tos if r.lower() in self.unknown_mailboxes]
        if unknown and envelope.mail_from:
            self.return_path.add(
                delivery_status_notification(envelope.mail_from, unknown, content).as_bytes()
            )
        return "250 2.0.0 Ok: queued"


def delivery_status_notification(
    return_path: str, recipients: list[str], original: bytes
) -> EmailMessage:
    """A failure DSN (RFC 3464) for `recipients`, laid out as Postfix writes one."""
    # The returned-headers part carries the original header block verbatim, as MTAs do.
    original_headers = original.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    now = format_datetime(datetime.now(UTC))
    report = EmailMessage(policy=policy.SMTP)
    report["From"] = f"MAILER-DAEMON@{SINK_HOSTNAME} (Mail Delivery System)"
    report["To"] = return_path
    report["Delivered-To"] = return_path
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = now
    report["Message-ID"] = make_msgid(domain=SINK_HOSTNAME)
    report["Auto-Submitted"] = "auto-replied"
    report.set_content(
        f"This is the mail system at host {SINK_HOSTNAME}.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients.\n"
    )
    report.make_mixed()
    report.replace_header("Content-Type", "multipart/report; report-type=delivery-status")
    status = Message()
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {SINK_HOSTNAME}"
    per_message["Arrival-Date"] = now
    blocks: list[Any] = [per_message]
    for recipient in recipients:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {recipient}"
        block["Original-Recipient"] = f"rfc822;{recipient}"
        block["Action"] = "failed"
        block["Status"] = "5.1.1"
        block["Remote-MTA"] = "dns; mx.members.example"
        block["Diagnostic-Code"] = (
            f"smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown"
        )
        blocks.append(block)
    status.set_type("message/delivery-status")
    status.set_payload(blocks)
    report.attach(status)  # type: ignore[arg-type]
    headers = EmailMessage(policy=policy.SMTP)
    headers.set_content(
        original_headers.decode("ascii", "replace") + "\n", subtype="rfc822-headers", cte="7bit"
    )
    report.attach(headers)
    return report


@contextmanager
def start_sink(
    host: str, port: int, data_dir: Path, unknown_mailboxes: frozenset[str] = frozenset()
) -> Iterator[SinkCertificates]:
    """Run the sink on host:port in a background thread for the duration of the block."""
    certs = ensure_certificates(data_dir / "sink", host)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(certs.cert_file, certs.key_file)
    handler = SinkHandler(
        data_dir / "sink" / "inbox",
        data_dir / "returnpath",
        frozenset(m.lower() for m in unknown_mailboxes),
    )
    controller = Controller(
        handler,
        hostname=host,
        port=port,
        server_hostname=SINK_HOSTNAME,
        tls_context=tls,
        require_starttls=True,
        ready_timeout=10,
    )
    controller.start()
    try:
        yield certs
    finally:
        controller.stop()
