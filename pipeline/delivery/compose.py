"""The EOB email: text and HTML bodies from templates/email.<language>.toml, the PDF attached,
no PHI in any header. The body carries at most what `email_body_phi` allows (none, or the
member's first name in the greeting).

Messages are written straight to SMTP-ready bytes (CRLF line ends) rather than through the
`email` package, whose MIME tree and generator cost several milliseconds per message: the
parts every message shares (encoded bodies, MIME headers) are built once and cached, and per
message only the few headers, a named greeting and the PDF's base64 are filled in. Text parts
are quoted-printable and the PDF base64, so the boundaries, which start with "=_", can never
occur in the content (quoted-printable writes "=" as "=3D"; base64 has "=" only as padding).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, fields
from email.header import Header
from email.utils import formataddr, formatdate
from functools import cache
from html import escape

from pipeline.documents.templates import DEFAULT_LANGUAGE, check_language, read_toml
from pipeline.errors import ConfigError
from pipeline.resources import TEMPLATES_DIR

# One pair of MIME boundaries per process (see the module docstring for why they are safe).
_BOUNDARY = "=_eob_" + secrets.token_hex(12)
_MIXED, _ALTERNATIVE = f"{_BOUNDARY}_mixed", f"{_BOUNDARY}_alt"
_TEXT_PART = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
)


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
) -> bytes:
    """The message as CRLF bytes. first_name is used only when given: the caller passes it only
    if the body may carry it. password_rule names the rule the attached PDF is protected with
    ("" for none)."""
    if "\r" in recipient or "\n" in recipient:
        raise ValueError("recipient address contains a line break")
    wording = load_email_wording(language)
    bodies = (
        _alternative_part(
            wording, wording.greeting_named.format(first_name=first_name), plan_name, password_rule
        )  # fmt: skip
        if first_name
        else _anonymous_alternative_part(language, plan_name, password_rule)
    )
    return b"".join((
        _headers(message_id, from_address, plan_name, recipient, wording.subject),
        b'Content-Type: multipart/mixed;\r\n boundary="%s"\r\n\r\n--%s\r\n' % (
            _MIXED.encode(), _MIXED.encode()),
        bodies,
        b"\r\n--%s\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="EOB-%s.pdf"\r\n\r\n' % (
            _MIXED.encode(), statement_id.encode("ascii")),
        base64.encodebytes(pdf).replace(b"\n", b"\r\n"),
        b"--%s--\r\n" % _MIXED.encode(),
    ))  # fmt: skip


def compose_portal_notice(
    *,
    message_id: str,
    from_address: str,
    plan_name: str,
    portal_url: str,
    language: str = DEFAULT_LANGUAGE,
) -> bytes:
    """The fallback for a receiver without usable TLS: no PHI at all, not even the recipient in
    a header, no attachment; it points to the member portal."""
    wording = load_email_wording(language)
    return b"".join((
        _headers(f"{message_id}.notice", from_address, plan_name, "undisclosed-recipients:;",
                 wording.notice_subject),
        _TEXT_PART % b"plain",
        _quoted_printable(wording.notice_text.format(plan_name=plan_name, portal_url=portal_url)),
    ))  # fmt: skip


def _headers(message_id: str, from_address: str, plan_name: str, to: str, subject: str) -> bytes:
    """The top-level headers, up to and including MIME-Version."""
    return (
        f"From: {_display_address(plan_name, from_address)}\r\n"
        f"To: {to}\r\n"
        f"Subject: {_encoded_subject(subject)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        # One Message-ID per attempt, so a DSN that quotes it leads back to the attempt.
        f"Message-ID: <{message_id}@{from_address.rpartition('@')[2]}>\r\n"
        "MIME-Version: 1.0\r\n"
        # ASCII but for an internationalized recipient address (RFC 6532): such a message is
        # handed only to a server that offers SMTPUTF8 (send.py).
    ).encode()


@cache
def _display_address(plan_name: str, from_address: str) -> str:
    return formataddr((plan_name, from_address))


@cache
def _encoded_subject(subject: str) -> str:
    """RFC 2047-encoded and folded when it is not plain ASCII."""
    if subject.isascii():
        return subject
    return Header(subject, "utf-8").encode(linesep="\r\n")


@cache
def _anonymous_alternative_part(language: str, plan_name: str, password_rule: str) -> bytes:
    """The bodies without a name in them: the same for every message of a run, built once."""
    wording = load_email_wording(language)
    return _alternative_part(wording, wording.greeting_anonymous, plan_name, password_rule)


def _alternative_part(
    wording: EmailWording, greeting: str, plan_name: str, password_rule: str
) -> bytes:
    """The multipart/alternative part: text and HTML bodies, quoted-printable."""
    hint = getattr(wording, f"password_hint_{password_rule}") if password_rule else ""
    text = wording.text.format(greeting=greeting, plan_name=plan_name, password_hint=hint)
    html = wording.html.format(
        greeting=escape(greeting), plan_name=escape(plan_name), password_hint=escape(hint)
    )
    alternative = _ALTERNATIVE.encode()
    return b"".join((
        b'Content-Type: multipart/alternative;\r\n boundary="%s"\r\n\r\n' % alternative,
        b"--%s\r\n" % alternative, _TEXT_PART % b"plain", _quoted_printable(text),
        b"\r\n--%s\r\n" % alternative, _TEXT_PART % b"html", _quoted_printable(html),
        b"\r\n--%s--\r\n" % alternative,
    ))  # fmt: skip


def _quoted_printable(text: str) -> bytes:
    """UTF-8, CRLF line ends, quoted-printable (binascii keeps CRLF when the text uses it)."""
    crlf = text.replace("\r\n", "\n").replace("\n", "\r\n")
    if not crlf.endswith("\r\n"):
        crlf += "\r\n"
    return binascii.b2a_qp(crlf.encode("utf-8"), istext=True)
