"""The EOB email: text and HTML bodies from templates/email.<language>.toml, the PDF attached,
no PHI in any header. The body carries at most what `email_body_phi` allows (none, or the
member's first name in the greeting)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from functools import cache
from html import escape

from pipeline.errors import ConfigError
from pipeline.render_templates import DEFAULT_LANGUAGE, TEMPLATES_DIR, check_language, read_toml

# What the email body may say about the member.
BODY_PHI_LEVELS = ("none", "first_name")


@dataclass(frozen=True)
class EmailWording:
    subject: str
    greeting_anonymous: str
    greeting_named: str
    password_hint_date_of_birth: str
    password_hint_postal_code_and_birth_year: str
    text: str
    html: str
    notice_subject: str
    notice_text: str


@cache
def load_email_wording(language: str = DEFAULT_LANGUAGE) -> EmailWording:
    check_language(language)
    path = TEMPLATES_DIR / f"email.{language}.toml"
    if not path.exists():
        path = TEMPLATES_DIR / f"email.{DEFAULT_LANGUAGE}.toml"
    try:
        wording = EmailWording(**read_toml(path))
    except TypeError as err:
        raise ConfigError(
            f"{path}: expected keys {[f.name for f in fields(EmailWording)]}"
        ) from err
    if "{" in wording.subject or "{" in wording.notice_subject:
        # The subject is fixed text: nothing can ever be substituted into it.
        raise ConfigError(f"{path}: key subject: no placeholders allowed")
    return wording


def compose_eob_email(
    *,
    message_id: str,
    statement_id: str,
    recipient: str,
    from_address: str,
    plan_name: str,
    pdf: bytes,
    language: str = DEFAULT_LANGUAGE,
    first_name: str | None = None,
    password_rule: str = "",
) -> EmailMessage:
    """first_name is used only when given: the caller passes it only if the body may carry it.
    password_rule names the rule the attached PDF is protected with ("" for none)."""
    wording = load_email_wording(language)
    greeting = (
        wording.greeting_named.format(first_name=first_name)
        if first_name
        else wording.greeting_anonymous
    )
    hint = getattr(wording, f"password_hint_{password_rule}") if password_rule else ""
    message = EmailMessage()
    message["From"] = f"{plan_name} <{from_address}>"
    message["To"] = recipient
    message["Subject"] = wording.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    # One Message-ID per attempt, so a DSN that quotes it leads back to the attempt.
    message["Message-ID"] = f"<{message_id}@{from_address.rpartition('@')[2]}>"
    message.set_content(
        wording.text.format(greeting=greeting, plan_name=plan_name, password_hint=hint)
    )
    message.add_alternative(
        wording.html.format(
            greeting=escape(greeting), plan_name=escape(plan_name), password_hint=escape(hint)
        ),
        subtype="html",
    )
    message.add_attachment(
        pdf, maintype="application", subtype="pdf", filename=f"EOB-{statement_id}.pdf"
    )
    return message


def compose_portal_notice(
    *,
    message_id: str,
    from_address: str,
    plan_name: str,
    portal_url: str,
    language: str = DEFAULT_LANGUAGE,
) -> EmailMessage:
    """The fallback for a receiver without usable TLS: no PHI at all, not even the recipient in
    a header, no attachment; it points to the member portal."""
    wording = load_email_wording(language)
    message = EmailMessage()
    message["From"] = f"{plan_name} <{from_address}>"
    message["To"] = "undisclosed-recipients:;"
    message["Subject"] = wording.notice_subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = f"<{message_id}.notice@{from_address.rpartition('@')[2]}>"
    message.set_content(wording.notice_text.format(plan_name=plan_name, portal_url=portal_url))
    return message
