"""Bounces stage: parse what reaches the return path, classify it, find the message it is about.

What arrives is one of: an RFC 3464 DSN (per recipient: Action, Status, Diagnostic-Code), an
ARF complaint (RFC 5965), a provider's notification (Amazon SES's JSON), an automatic reply
(RFC 3834), a non-standard bounce in an MTA's own words, or an ordinary message. Recipients of
non-standard bounces come from flufl.bounce (Mailman's detectors for ~30 MTAs). The class comes
from `config/bounce_rules.toml`: ordered rules of enhanced-status and reply-text patterns; this
module holds no class decisions of its own beyond the report's kind (a complaint is a complaint,
a positive DSN is delivered).

Parsing does no I/O beyond loading the rules file; reading mailboxes lives in `collect.py`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from email.utils import getaddresses

from flufl.bounce import all_failures

from pipeline.records.bounce_classes import (
    BounceClass,
    Finality,
    ReportKind,
    SmtpStage,
    load_rules,
)
from pipeline.records.verp import token_from_verp
from pipeline.returns import findings, mailtext


@dataclass(frozen=True)
class BounceReport:
    # sha256 of the raw report and the recipient's position: a report is processed once.
    dedupe_key: str
    kind: ReportKind
    # Our message token from the VERP return path, when the report came back to one.
    message_token: str | None
    # The Message-ID of the returned original, when the report quotes it.
    original_message_id: str | None
    recipient: str | None
    status: str | None
    diagnostic: str | None
    bounce_class: BounceClass
    # Failed, delayed or delivered; None for complaints, automatic replies and other messages.
    finality: Finality | None = None
    # The SMTP command the refusal answered, when the report names it.
    smtp_stage: SmtpStage | None = None


def parse_report(raw: bytes, *, return_path_domain: str) -> list[BounceReport]:
    """One BounceReport per recipient the report names (at least one)."""
    message = message_from_bytes(raw, policy=policy.compat32)
    digest = hashlib.sha256(raw).hexdigest()
    token = _verp_token(message, return_path_domain)
    original_id = _original_message_id(message)

    def report(index: int, kind: ReportKind, found: findings.Finding) -> BounceReport:
        # A report may name the same recipient in several blocks: each block counts once.
        key = hashlib.sha256(f"{digest}:{index}:{found.recipient}".encode()).hexdigest()
        return BounceReport(
            key,
            kind,
            token,
            original_id,
            found.recipient,
            found.status,
            found.diagnostic,
            found.bounce_class,
            found.finality,
            found.smtp_stage,
        )

    if (feedback := mailtext.part(message, "message/feedback-report")) is not None:
        recipients = _feedback_recipients(feedback, message)
        return [
            report(i, ReportKind.ARF, findings.Finding(r, bounce_class=BounceClass.COMPLAINT))
            for i, r in enumerate(recipients)
        ]
    if str(message.get("X-Apple-Unsubscribe") or "").strip().lower() == "true":
        # Apple Mail's unsubscribe request, sent from the recipient's own address (and marked
        # auto-replied): the recipient asks for no more mail, an opt-out feedback.
        opt_out = findings.Finding(
            mailtext.bare(str(message.get("From") or "")), bounce_class=BounceClass.COMPLAINT
        )
        return [report(0, ReportKind.ARF, opt_out)]
    status_part, explained = _status_part(message)
    human = mailtext.human_text(explained)
    if status_part is not None:
        blocks = _recipient_blocks(status_part)
        reporting_mta = _reporting_mta(status_part)
        if blocks:
            return [
                report(i, ReportKind.DSN, findings.dsn_block(block, human, reporting_mta))
                for i, block in enumerate(blocks)
            ]
    if (notice := findings.ses_notice(message)) is not None and (
        ses := findings.ses_findings(notice)
    ):
        # SES sends from its own return path, so no VERP token: the original's Message-ID,
        # which the notification records, is what matches it (report() reads it at call time).
        original_id = findings.ses_original_message_id(notice) or original_id
        return [report(i, kind, found) for i, (kind, found) in enumerate(ses)]
    temporary, permanent = _flufl_failures(message)
    failure_found = bool(temporary or permanent)
    # RFC 3834 headers are set on bounces too: they decide only when neither a detector nor
    # the sender and subject say bounce (a null return path does not: replies use one too).
    if not (failure_found or _says_bounce(message)) and _is_auto_reply(message):
        # RFC 3834: the reply comes from the recipient's own address.
        replier = mailtext.bare(str(message.get("From") or ""))
        auto_reply = findings.Finding(replier, bounce_class=BounceClass.AUTO_REPLY)
        return [report(0, ReportKind.AUTO_REPLY, auto_reply)]
    if not (failure_found or _looks_like_bounce(message)):
        # Kept (ledger only) so reconcile can tell a "this is not me" reply.
        excerpt = mailtext.excerpt(human)
        return [report(0, ReportKind.NOT_BOUNCE, findings.Finding(diagnostic=excerpt))]
    # Mailman's detectors tell a delay warning (temporary) from a final failure (permanent),
    # and Sendmail's transcript lines name the recipients they miss; when none of them knows
    # the format, the original's recipients the report names.
    detected = {r.lower() for r in permanent | temporary}
    found: list[tuple[str | None, Finality | None]] = (
        [
            *((r, Finality.FAILED) for r in sorted(permanent)),
            *((r, Finality.DELAYED) for r in sorted(temporary)),
            *((r, None) for r in _sendmail_listed(human) if r.lower() not in detected),
        ]
        or [(r, None) for r in _named_recipients(message, human)]
        or [(None, None)]
    )
    others = [r for r, _ in found if r]
    return [
        report(
            i,
            ReportKind.NON_STANDARD,
            findings.non_standard(
                recipient, human, finality, others, str(message.get("Subject") or "")
            ),
        )
        for i, (recipient, finality) in enumerate(found)
    ]


def _named_recipients(message: Message, human: str) -> list[str]:
    """The recipients a report in an unknown format names, for want of a detector that knows it.

    Addresses the returned original was sent to that the report's own words name; else the
    addresses its lines begin with ("<address>: reason") or give as "RCPT TO:"; else those it
    gives in angle brackets; never the report's own sender or recipient (the original's sender).
    """
    lowered = human.lower()
    named = {a for a in _original_recipients(message) if a.lower() in lowered}
    if not named:
        own = {
            a.lower()
            for _, a in getaddresses(
                [str(v) for h in ("From", "To", "Return-Path") for v in message.get_all(h) or []]
            )
        }
        for pattern in (_LISTED_ADDRESS, _BRACKETED_ADDRESS):
            if named := {a for a in pattern.findall(human) if a.lower() not in own}:
                break
    return sorted(named, key=str.lower)


_ADDRESS = r"[\w.+'=%-]+@[\w-]+(?:\.[\w-]+)+"
# Sendmail's per-recipient error line: "550 <address>... reason" (every Sendmail version's
# transcript and its imitators').
_SENDMAIL_LINE = re.compile(rf"^[45]\d\d <?({_ADDRESS})>?\.\.\. ", re.MULTILINE)


def _sendmail_listed(human: str) -> list[str]:
    return list(dict.fromkeys(_SENDMAIL_LINE.findall(human)))


# An address that begins a line of a report, or follows "RCPT TO:" in a transcript.
_LISTED_ADDRESS = re.compile(rf"(?:^|rcpt to:)\s*<?({_ADDRESS})>?", re.IGNORECASE | re.MULTILINE)
# Else an address in angle brackets anywhere in the report's words ("... in <list@example.org>").
_BRACKETED_ADDRESS = re.compile(rf"<({_ADDRESS})>")


def _returned_headers(message: Message) -> Message | None:
    """The returned original's headers when the report attaches them: the whole message
    (message/rfc822) or its headers only (text/rfc822-headers, as with DSN RET=HDRS)."""
    original = mailtext.part(message, "message/rfc822") or mailtext.part(
        message, "text/rfc822-headers"
    )
    inner = original.get_payload() if original is not None else None
    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
        return inner[0]
    if isinstance(inner, str):
        return message_from_bytes(inner.encode("utf-8", "replace"))
    return None


def _original_recipients(message: Message) -> list[str]:
    """Whom the returned original was addressed to: attached, or quoted after the report."""
    headers = _returned_headers(message) or _quoted_message(message)
    if headers is None:
        return []
    fields = [str(v) for name in ("To", "Cc") for v in headers.get_all(name) or []]
    return [a for _, a in getaddresses(fields) if "@" in a]


def _quoted_message(message: Message) -> Message | None:
    """The message a report quotes in its text after its own words, if any."""
    if quoted := load_rules().original_marker.search(body := mailtext.body_text(message)):
        # The quote starts at a header ("Received: from") or on the line after a marker.
        start = quoted.start() if ":" in quoted.group(0) else body.find("\n", quoted.end()) + 1
        return message_from_bytes(body[start:].lstrip().encode("utf-8", "replace"))
    return None


def _verp_token(message: Message, domain: str) -> str | None:
    for header in ("Delivered-To", "X-Original-To", "To", "Return-Path"):
        for value in message.get_all(header) or []:
            if token := token_from_verp(str(value), domain):
                return token
    return None


_MESSAGE_ID = re.compile(r"^Message-ID:\s*<([^>\s]+)>", re.IGNORECASE | re.MULTILINE)


def _original_message_id(message: Message) -> str | None:
    """The Message-ID of the returned original (attached or quoted), not the report's own."""
    headers = _returned_headers(message)
    if headers is not None and (attached := mailtext.bracketed(headers.get("Message-ID"))):
        return attached
    own = str(message.get("Message-ID") or "")
    for found in _MESSAGE_ID.finditer(mailtext.body_text(message)):
        if found.group(1) not in own:
            return found.group(1)
    # A person's reply names what it answers.
    return mailtext.bracketed(message.get("In-Reply-To"))


_DELIVERY_STATUS = "message/delivery-status"
# A delivery-status part in a report's text: its header line, and the MIME boundary after it.
_UNPARSED_STATUS = re.compile(r"^content-type:\s*message/delivery-status[^\n]*\n", re.I | re.M)
_BOUNDARY_LINE = re.compile(r"^\s*--\S+\s*$", re.MULTILINE)
# RFC 3464 fields written into a report's text instead of a delivery-status part (Sun/Oracle
# Messaging Server): from the first per-message or per-recipient field on, when the text has
# both a recipient and an Action field.
_TEXT_STATUS_START = re.compile(
    r"^(reporting-mta|original-envelope-id|final-recipient|original-recipient):", re.I | re.M
)
_TEXT_STATUS_FIELDS = re.compile(r"^final-recipient:.*?^action:|^action:.*?^final-recipient:",
                                 re.I | re.M | re.S)  # fmt: skip


def _status_part(message: Message) -> tuple[Message | None, Message]:
    """The report's delivery-status part, and the message whose own words explain it.

    The report's part; else that of a DSN forwarded whole as text (a provider's helpdesk quoting
    the bounce it received); else one whose MIME structure does not parse (an indented boundary
    line), or whose fields are written in the text itself, read from the text.
    """
    if (part := mailtext.part(message, _DELIVERY_STATUS)) is not None:
        return part, message
    quoted = _quoted_message(message)
    if quoted is not None and (part := mailtext.part(quoted, _DELIVERY_STATUS)) is not None:
        return part, quoted
    body = mailtext.body_text(message)
    found = _UNPARSED_STATUS.search(body)
    start = found.end() if found else None
    if start is None and _TEXT_STATUS_FIELDS.search(body):
        start = m.start() if (m := _TEXT_STATUS_START.search(body)) else None
    if start is not None:
        fields = _BOUNDARY_LINE.split(body[start:], maxsplit=1)[0]
        unparsed = Message()
        unparsed.set_payload(fields)
        return unparsed, message
    return None, message


def _recipient_blocks(status_part: Message) -> list[Message]:
    """The per-recipient blocks: those naming a recipient (the first block is the message's,
    but some MTAs, McAfee's, send only the recipient's)."""
    payload = status_part.get_payload()
    if isinstance(payload, list):
        blocks = [b for b in payload if isinstance(b, Message)]
    else:
        # Some MTAs send the report as an unparsed string: read its blocks by hand.
        text = payload if isinstance(payload, str) else ""
        blocks = [message_from_bytes(b.strip().encode()) for b in re.split(r"\n\s*\n", text)]
    return [
        recipient
        for block in blocks
        for recipient in _one_per_recipient(block)
        if recipient.get("Final-Recipient") or recipient.get("Original-Recipient")
    ]


_RECIPIENT_FIELDS = ("final-recipient", "original-recipient")


def _one_per_recipient(block: Message) -> list[Message]:
    """A block per recipient of a block that names several without the blank lines between
    them (AOL's): each starts at the recipient field the first one starts with."""
    names = [name.lower() for name in block.keys()]
    lead = next((name for name in names if name in _RECIPIENT_FIELDS), None)
    if lead is None or names.count(lead) < 2:
        return [block]
    recipients: list[Message] = []
    for name, value in block.items():
        if name.lower() == lead:
            recipients.append(Message())
        if recipients:
            recipients[-1][name] = value
    return recipients


def _reporting_mta(status_part: Message) -> str | None:
    """The Reporting-MTA field of a delivery-status mailtext.part (its per-message block)."""
    payload = status_part.get_payload()
    if isinstance(payload, list):
        fields = (b.get("Reporting-MTA") for b in payload if isinstance(b, Message))
        return next((str(f) for f in fields if f), None)
    # A report sent as an unparsed string (see _recipient_blocks): the field's line.
    text = payload if isinstance(payload, str) else ""
    found = re.search(r"^Reporting-MTA:(.*)$", text, re.IGNORECASE | re.MULTILINE)
    return found.group(1) if found else None


def _feedback_recipients(feedback: Message, message: Message) -> list[str | None]:
    fields = feedback.get_payload()
    block = fields[0] if isinstance(fields, list) and isinstance(fields[0], Message) else feedback
    found = [mailtext.address(str(v)) for v in block.get_all("Original-Rcpt-To") or []]
    if not found:
        headers = _returned_headers(message)
        if headers is not None and headers.get("To"):
            found = [mailtext.bare(str(headers.get("To")))]
    return found or [None]


def _is_auto_reply(message: Message) -> bool:
    submitted = str(message.get("Auto-Submitted") or "").lower()
    precedence = str(message.get("Precedence") or "").lower()
    return (
        submitted.startswith("auto-replied")
        or message.get("X-Autoreply") is not None
        or message.get("X-Autorespond") is not None
        or precedence == "auto_reply"
        or bool(load_rules().auto_reply_subject.search(str(message.get("Subject") or "")))
    )


def _says_bounce(message: Message) -> bool:
    """The sender or the subject is a mailer daemon's."""
    rules = load_rules()
    sender = str(message.get("From") or "")
    return bool(
        rules.bounce_from.search(sender)
        or rules.bounce_subject.search(str(message.get("Subject") or ""))
        # A mailing-list manager's notice about a post it refused (fml's: X-MLServer, from the
        # list's -admin address).
        or (message.get("X-MLServer") is not None and "-admin@" in sender.lower())
    )


def _looks_like_bounce(message: Message) -> bool:
    return _says_bounce(message) or str(message.get("Return-Path") or "").strip() == "<>"


def _flufl_failures(message: Message) -> tuple[set[str], set[str]]:
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # noqa: BLE001 - a detector's bug must not stop the stage
        return set(), set()

    def text(addresses: frozenset[bytes]) -> set[str]:
        # Heuristic detectors sometimes return a fragment of text (a JSON notice's): not one.
        found = (a.decode("utf-8", "replace").strip("<>") for a in addresses)
        return {a for a in found if re.fullmatch(_ADDRESS, a)}

    return text(temporary), text(permanent)
