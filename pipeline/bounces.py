"""Bounces stage: parse what reaches the return path, classify it, find the message it is about.

What arrives is one of: an RFC 3464 DSN (per recipient: Action, Status, Diagnostic-Code), an
ARF complaint (RFC 5965), an automatic reply (RFC 3834), a non-standard bounce in an MTA's own
words, or an ordinary message. Recipients of non-standard bounces come from flufl.bounce
(Mailman's detectors for ~30 MTAs). The class comes from `config/bounce_rules.toml`: ordered
rules of enhanced-status and reply-text patterns; this module holds no class decisions of its
own beyond the report's kind (a complaint is a complaint, a positive DSN is delivered).

Parsing does no I/O beyond loading the rules file; reading mailboxes lives in `collect.py`.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from enum import StrEnum
from functools import cache
from pathlib import Path

from flufl.bounce import all_failures

from pipeline.plan import token_from_verp

RULES_FILE = Path(__file__).resolve().parent.parent / "config" / "bounce_rules.toml"


class BounceClass(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    """The address is bad."""
    SOFT_BOUNCE = "soft_bounce"
    """A temporary problem at the recipient."""
    POLICY_BLOCK = "policy_block"
    """A sender-side problem; the address is not in doubt."""
    COMPLAINT = "complaint"
    """The recipient reported the message."""
    AUTO_REPLY = "auto_reply"
    """An automatic reply, not a bounce."""
    DELIVERED = "delivered"
    """A positive delivery notification."""
    NOT_BOUNCE = "not_bounce"
    """An ordinary message that reached the return path."""
    UNKNOWN = "unknown"
    """A failure no rule explains."""


class ReportKind(StrEnum):
    DSN = "dsn"
    ARF = "arf"
    AUTO_REPLY = "auto_reply"
    NON_STANDARD = "non_standard"
    SMTP = "smtp"
    NOT_BOUNCE = "not_bounce"


@dataclass(frozen=True)
class Rule:
    bounce_class: BounceClass
    status: re.Pattern[str] | None
    text: re.Pattern[str] | None

    def matches(self, status: str | None, text: str) -> bool:
        # A rule with both patterns needs both; a rule with one needs that one.
        if self.status is None and self.text is None:
            return False
        status_ok = self.status is None or bool(status and self.status.search(status))
        text_ok = self.text is None or bool(self.text.search(text))
        return status_ok and text_ok


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    # Header patterns that make a message a non-standard bounce or an automatic reply.
    bounce_from: re.Pattern[str]
    bounce_subject: re.Pattern[str]
    auto_reply_subject: re.Pattern[str]
    # Where a bounce's own words end and the returned message begins.
    original_marker: re.Pattern[str]


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


@cache
def load_rules(path: Path = RULES_FILE) -> Rules:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    detect = raw["detect"]

    def pattern(value: str) -> re.Pattern[str]:
        return re.compile(value, re.IGNORECASE | re.MULTILINE)

    return Rules(
        rules=tuple(
            Rule(
                BounceClass(item["class"]),
                re.compile(item["status"]) if "status" in item else None,
                pattern(item["text"]) if "text" in item else None,
            )
            for item in raw["rule"]
        ),
        bounce_from=pattern(detect["bounce_from"]),
        bounce_subject=pattern(detect["bounce_subject"]),
        auto_reply_subject=pattern(detect["auto_reply_subject"]),
        original_marker=pattern(detect["original_marker"]),
    )


def classify(status: str | None, text: str | None) -> BounceClass:
    """The first rule matching the enhanced status code and the reply text; else unknown."""
    flat = " ".join((text or "").split())
    for rule in load_rules().rules:
        if rule.matches(status, flat):
            return rule.bounce_class
    return BounceClass.UNKNOWN


def parse_report(raw: bytes, *, return_path_domain: str) -> list[BounceReport]:
    """One BounceReport per recipient the report names (at least one)."""
    message = message_from_bytes(raw, policy=policy.compat32)
    digest = hashlib.sha256(raw).hexdigest()
    token = _verp_token(message, return_path_domain)
    original_id = _original_message_id(message)

    def report(
        index: int,
        kind: ReportKind,
        recipient: str | None,
        status: str | None,
        diagnostic: str | None,
        bounce_class: BounceClass,
    ) -> BounceReport:
        # A report may name the same recipient in several blocks: each block counts once.
        key = hashlib.sha256(f"{digest}:{index}:{recipient}".encode()).hexdigest()
        return BounceReport(
            key, kind, token, original_id, recipient, status, diagnostic, bounce_class
        )

    if (feedback := _part(message, "message/feedback-report")) is not None:
        recipients = _feedback_recipients(feedback, message)
        return [
            report(i, ReportKind.ARF, r, None, None, BounceClass.COMPLAINT)
            for i, r in enumerate(recipients)
        ]
    human = _human_text(message)
    if (status_part := _part(message, "message/delivery-status")) is not None:
        blocks = _recipient_blocks(status_part)
        if blocks:
            return [
                report(i, ReportKind.DSN, *_dsn_block(block, human))
                for i, block in enumerate(blocks)
            ]
    temporary, permanent = _flufl_failures(message)
    # RFC 3834 headers are set on bounces too: they decide only when no failure was found.
    if not (temporary or permanent) and _is_auto_reply(message):
        return [report(0, ReportKind.AUTO_REPLY, None, None, None, BounceClass.AUTO_REPLY)]
    if not (temporary or permanent or _looks_like_bounce(message)):
        # Kept (ledger only) so reconcile can tell a "this is not me" reply.
        return [
            report(0, ReportKind.NOT_BOUNCE, None, None, _excerpt(human), BounceClass.NOT_BOUNCE)
        ]
    found = [(r, True) for r in sorted(permanent)] + [(r, False) for r in sorted(temporary)]
    if not found:
        status = enhanced_status(human)
        diagnostic = _excerpt(human)
        return [
            report(0, ReportKind.NON_STANDARD, None, status, diagnostic, classify(status, human))
        ]
    reports = []
    for i, (recipient, is_permanent) in enumerate(found):
        text = _about(human, recipient)
        status = enhanced_status(text)
        bounce_class = classify(status, text)
        if bounce_class == BounceClass.UNKNOWN:
            # Mailman's detectors know a warning from a failure even when no rule matched.
            bounce_class = BounceClass.HARD_BOUNCE if is_permanent else BounceClass.SOFT_BOUNCE
        reports.append(
            report(i, ReportKind.NON_STANDARD, recipient, status, _excerpt(text), bounce_class)
        )
    return reports


def smtp_rejection(code: int, reply: str) -> tuple[str | None, BounceClass]:
    """Status and class of a synchronous SMTP rejection: the same rules as a DSN's."""
    status = enhanced_status(reply)
    if status is None and 400 <= code < 600:
        status = f"{code // 100}.0.0"
    return status, classify(status, reply)


def _dsn_block(
    block: Message, human: str
) -> tuple[str | None, str | None, str | None, BounceClass]:
    recipient = _address(block.get("Final-Recipient") or block.get("Original-Recipient"))
    action = str(block.get("Action") or "").strip().lower()
    # Some MTAs add a comment after the code: "4.4.1 (no answer from host)".
    status = enhanced_status(block.get("Status"))
    diagnostic = _unfold(block.get("Diagnostic-Code"))
    if action in {"delivered", "relayed", "expanded"}:
        return recipient, status, diagnostic, BounceClass.DELIVERED
    # The diagnostic first (with the SMTP command it answered, when the report names it); the
    # MTA's own explanation when the diagnostic explains nothing.
    command = _SMTP_COMMAND.search(_about(human, recipient) if recipient else human)
    bounce_class = classify(status, f"{diagnostic or ''} {command.group(0) if command else ''}")
    if bounce_class == BounceClass.UNKNOWN or not diagnostic:
        bounce_class = classify(status, _about(human, recipient) if recipient else human)
    if action == "delayed" and bounce_class in {BounceClass.HARD_BOUNCE, BounceClass.UNKNOWN}:
        bounce_class = BounceClass.SOFT_BOUNCE
    return recipient, status, diagnostic, bounce_class


def _verp_token(message: Message, domain: str) -> str | None:
    for header in ("Delivered-To", "X-Original-To", "To", "Return-Path"):
        for value in message.get_all(header) or []:
            if token := token_from_verp(str(value), domain):
                return token
    return None


# "in reply to end of DATA command" (Postfix), ">>> DATA" (Sendmail): where the refusal came.
_SMTP_COMMAND = re.compile(r"in reply to (end of )?\w+( command)?|>>> ?[A-Z]+", re.IGNORECASE)
_MESSAGE_ID = re.compile(r"^Message-ID:\s*<([^>\s]+)>", re.IGNORECASE | re.MULTILINE)


def _original_message_id(message: Message) -> str | None:
    """The Message-ID of the returned original (attached or quoted), not the report's own."""
    for part in message.walk():
        if part.get_content_type() in {"message/rfc822", "message/rfc822-headers"}:
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                value = inner[0].get("Message-ID")
                if value and (found := re.search(r"<([^>\s]+)>", str(value))):
                    return found.group(1)
    own = str(message.get("Message-ID") or "")
    for found in _MESSAGE_ID.finditer(_body_text(message)):
        if found.group(1) not in own:
            return found.group(1)
    # A person's reply names what it answers.
    replied = re.search(r"<([^>\s]+)>", str(message.get("In-Reply-To") or ""))
    return replied.group(1) if replied else None


def _part(message: Message, content_type: str) -> Message | None:
    for part in message.walk():
        if part.get_content_type() == content_type:
            return part
    return None


def _recipient_blocks(status_part: Message) -> list[Message]:
    # The first block describes the message; each further block one recipient.
    payload = status_part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload[1:] if isinstance(b, Message)]
    # Some MTAs send the report as an unparsed string: read its blocks by hand.
    text = payload if isinstance(payload, str) else ""
    blocks = [message_from_bytes(b.strip().encode()) for b in re.split(r"\n\s*\n", text)]
    return [b for b in blocks[1:] if b.get("Final-Recipient") or b.get("Original-Recipient")]


def _feedback_recipients(feedback: Message, message: Message) -> list[str | None]:
    fields = feedback.get_payload()
    block = fields[0] if isinstance(fields, list) and isinstance(fields[0], Message) else feedback
    found = [_address(str(v)) for v in block.get_all("Original-Rcpt-To") or []]
    if not found:
        original = _part(message, "message/rfc822") or _part(message, "text/rfc822-headers")
        inner = original.get_payload() if original is not None else None
        headers = inner[0] if isinstance(inner, list) and inner else None
        if isinstance(headers, Message) and headers.get("To"):
            found = [_bare(str(headers.get("To")))]
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


def _looks_like_bounce(message: Message) -> bool:
    rules = load_rules()
    sender = str(message.get("From") or "")
    return bool(
        rules.bounce_from.search(sender)
        or rules.bounce_subject.search(str(message.get("Subject") or ""))
        or str(message.get("Return-Path") or "").strip() == "<>"
    )


def _flufl_failures(message: Message) -> tuple[set[str], set[str]]:
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # noqa: BLE001 - a detector's bug must not stop the stage
        return set(), set()

    def text(addresses: frozenset[bytes]) -> set[str]:
        return {a.decode("utf-8", "replace").strip("<>") for a in addresses if b"@" in a}

    return text(temporary), text(permanent)


def _human_text(message: Message) -> str:
    """The report's own words: text parts before the returned original, flattened."""
    return " ".join(load_rules().original_marker.split(_body_text(message), maxsplit=1)[0].split())


def _body_text(message: Message) -> str:
    texts = []
    for part in message.walk():
        if part.get_content_type() in {"message/rfc822", "text/rfc822-headers"}:
            break
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    texts.append(payload.decode(charset, "replace"))
                except LookupError:
                    texts.append(payload.decode("utf-8", "replace"))
    return "\n".join(texts)


def _about(text: str, recipient: str, span: int = 400) -> str:
    """The words a multi-recipient report says about one recipient, else all of them."""
    at = text.lower().find(recipient.lower())
    return text[at : at + span] if at >= 0 else text


def _excerpt(text: str, limit: int = 500) -> str | None:
    return text[:limit] or None


def _address(field: str | None) -> str | None:
    if not field:
        return None
    _, _, address = str(field).partition(";")
    return _bare(address)


def _bare(address: str) -> str | None:
    found = re.search(r"<([^<>\s]+@[^<>\s]+)>", address)
    value = found.group(1) if found else address.strip().strip("<>")
    return value or None


def _unfold(value: str | None) -> str | None:
    return " ".join(str(value).split()) if value else None


_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")


def enhanced_status(reply: str | None) -> str | None:
    """The RFC 3463 enhanced status code quoted in an SMTP reply, if any."""
    found = _ENHANCED_STATUS.search(reply or "")
    return found.group(1) if found else None
