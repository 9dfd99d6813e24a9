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
