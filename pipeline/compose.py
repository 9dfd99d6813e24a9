"""The EOB email: wording from templates/email.toml, the PDF attached, no PHI in any header."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from functools import cache
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


@dataclass(frozen=True)
class EmailWording:
    subject: str
    text: str


@cache
def load_email_wording() -> EmailWording:
    raw = tomllib.loads((TEMPLATES_DIR / "email.toml").read_text(encoding="utf-8"))
    return EmailWording(subject=raw["subject"], text=raw["text"])


def compose_eob_email(
    *,
    message_id: str,
    statement_id: str,
    recipient: str,
    from_address: str,
    plan_name: str,
    pdf: bytes,
) -> EmailMessage:
    wording = load_email_wording()
    message = EmailMessage()
    message["From"] = f"{plan_name} <{from_address}>"
    message["To"] = recipient
    message["Subject"] = wording.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    # One Message-ID per attempt, so a DSN that quotes it leads back to the attempt.
    message["Message-ID"] = f"<{message_id}@{from_address.rpartition('@')[2]}>"
    message.set_content(wording.text.format(plan_name=plan_name))
    message.add_attachment(
        pdf, maintype="application", subtype="pdf", filename=f"EOB-{statement_id}.pdf"
    )
    return message


def compose_portal_notice(
    *, message_id: str, from_address: str, plan_name: str, portal_url: str
) -> EmailMessage:
    """The fallback for a receiver without usable TLS: no PHI at all, not even the recipient in
    a header, no attachment; it points to the member portal."""
    message = EmailMessage()
    message["From"] = f"{plan_name} <{from_address}>"
    message["To"] = "undisclosed-recipients:;"
    message["Subject"] = "A new document is ready in your member portal"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = f"<{message_id}.notice@{from_address.rpartition('@')[2]}>"
    message.set_content(
        f"A new document from {plan_name} is ready for you.\n\n"
        "Your mail server does not support the encrypted delivery we require for private\n"
        f"health information, so it was not sent by email. Sign in at {portal_url} to read it.\n"
    )
    return message
