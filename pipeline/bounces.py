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
import html
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email import message_from_bytes, policy
from email.message import Message
from email.utils import getaddresses
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

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


class SmtpStage(StrEnum):
    """The SMTP command the receiving server was answering when it refused, as the report says."""

    CONNECT = "connect"
    """The greeting, HELO/EHLO or STARTTLS: the server refused the connection itself."""
    MAIL = "mail"
    """MAIL FROM: the server refused the sender."""
    RCPT = "rcpt"
    """RCPT TO: the server refused the recipient address."""
    DATA = "data"
    """DATA or its end: the server had read the content and refused it (a filter)."""


class Finality(StrEnum):
    """What became of the message for one recipient (RFC 3464 Action), not why."""

    FAILED = "failed"
    """Not delivered, and the reporting MTA has given up."""
    DELAYED = "delayed"
    """Not delivered yet; the reporting MTA is still retrying (a warning)."""
    DELIVERED = "delivered"
    """Delivered, relayed or expanded (a positive report)."""


class ReportKind(StrEnum):
    DSN = "dsn"
    ARF = "arf"
    AUTO_REPLY = "auto_reply"
    NON_STANDARD = "non_standard"
    SMTP = "smtp"
    NOT_BOUNCE = "not_bounce"


# In the rules file, the stage of a report that names none.
STAGE_UNSTATED = "unstated"


@dataclass(frozen=True)
class Rule:
    bounce_class: BounceClass
    status: re.Pattern[str] | None
    text: re.Pattern[str] | None
    # The SMTP stages (SmtpStage values, or STAGE_UNSTATED) the rule applies to; None: any.
    stages: frozenset[str] | None = None
    # The mail hosts the rule applies to (a pattern over the report's host names); None: any.
    hosts: re.Pattern[str] | None = None

    def matches(self, status: str | None, text: str, stage: SmtpStage | None, hosts: str) -> bool:
        # A rule needs every pattern it has, and at least one status or text pattern.
        if self.status is None and self.text is None:
            return False
        status_ok = self.status is None or bool(status and self.status.search(status))
        text_ok = self.text is None or bool(self.text.search(text))
        stage_ok = self.stages is None or (stage or STAGE_UNSTATED) in self.stages
        hosts_ok = self.hosts is None or bool(self.hosts.search(hosts))
        return status_ok and text_ok and stage_ok and hosts_ok


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    # Header patterns that make a message a non-standard bounce or an automatic reply.
    bounce_from: re.Pattern[str]
    bounce_subject: re.Pattern[str]
    auto_reply_subject: re.Pattern[str]
    # Where a bounce's own words end and the returned message begins.
    original_marker: re.Pattern[str]
    # A report that says the MTA is still retrying (a delay warning), not that it gave up.
    still_retrying: re.Pattern[str]
    # How MTAs name the SMTP command a refusal answered, per stage.
    stage_patterns: tuple[tuple[SmtpStage, re.Pattern[str]], ...]
    # Amazon SES's own bounce sub-types that decide the class.
    ses_bounce_subtypes: dict[str, BounceClass]


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
                _stages(item["stage"]) if "stage" in item else None,
                pattern(item["host"]) if "host" in item else None,
            )
            for item in raw["rule"]
        ),
        bounce_from=pattern(detect["bounce_from"]),
        bounce_subject=pattern(detect["bounce_subject"]),
        auto_reply_subject=pattern(detect["auto_reply_subject"]),
        original_marker=pattern(detect["original_marker"]),
        still_retrying=pattern(detect["still_retrying"]),
        stage_patterns=tuple(
            (SmtpStage(name), pattern(value)) for name, value in raw["stage"].items()
        ),
        ses_bounce_subtypes={
            name: BounceClass(value) for name, value in raw["ses_bounce_subtype"].items()
        },
    )


def _stages(names: list[str]) -> frozenset[str]:
    known = {str(s) for s in SmtpStage} | {STAGE_UNSTATED}
    if unknown := set(names) - known:
        raise ValueError(f"bounce rules: unknown stage {sorted(unknown)}")
    return frozenset(names)


def smtp_stage(text: str | None) -> SmtpStage | None:
    """The SMTP command a refusal answered, from the first place the text names one."""
    found = [
        (m.start(), stage)
        for stage, regex in load_rules().stage_patterns
        if (m := regex.search(text or ""))
    ]
    return min(found)[1] if found else None


def classify(
    status: str | None, text: str | None, stage: SmtpStage | None = None, hosts: str = ""
) -> BounceClass:
    """The first rule matching the enhanced status code, the reply text, the SMTP stage and the
    mail hosts the report names (see `mail_hosts`)."""
    flat = " ".join((text or "").split())
    for rule in load_rules().rules:
        if rule.matches(status, flat, stage, hosts):
            return rule.bounce_class
    return BounceClass.UNKNOWN


def mail_hosts(recipient: str | None, *mtas: str | None) -> str:
    """The host names a report gives, one a line, lower case: the recipient's domain and the
    MTAs' names (Remote-MTA, Reporting-MTA: "dns; mx.example.org"), for rules that hold only
    for one provider's servers."""
    names = [recipient.rpartition("@")[2]] if recipient and "@" in recipient else []
    for mta in mtas:
        if mta and (name := str(mta).partition(";")[2].split()):
            names.append(name[0])
    return "\n".join(n.strip(".").lower() for n in names)


def parse_report(raw: bytes, *, return_path_domain: str) -> list[BounceReport]:
    """One BounceReport per recipient the report names (at least one)."""
    message = message_from_bytes(raw, policy=policy.compat32)
    digest = hashlib.sha256(raw).hexdigest()
    token = _verp_token(message, return_path_domain)
    original_id = _original_message_id(message)

    def report(index: int, kind: ReportKind, found: _Finding) -> BounceReport:
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

    if (feedback := _part(message, "message/feedback-report")) is not None:
        recipients = _feedback_recipients(feedback, message)
        return [
            report(i, ReportKind.ARF, _Finding(r, bounce_class=BounceClass.COMPLAINT))
            for i, r in enumerate(recipients)
        ]
    if str(message.get("X-Apple-Unsubscribe") or "").strip().lower() == "true":
        # Apple Mail's unsubscribe request, sent from the recipient's own address (and marked
        # auto-replied): the recipient asks for no more mail, an opt-out feedback.
        opt_out = _Finding(
            _bare(str(message.get("From") or "")), bounce_class=BounceClass.COMPLAINT
        )
        return [report(0, ReportKind.ARF, opt_out)]
    status_part, explained = _status_part(message)
    human = _human_text(explained)
    if status_part is not None:
        blocks = _recipient_blocks(status_part)
        reporting_mta = _reporting_mta(status_part)
        if blocks:
            return [
                report(i, ReportKind.DSN, _dsn_block(block, human, reporting_mta))
                for i, block in enumerate(blocks)
            ]
    if (notice := _ses_notice(message)) is not None and (ses := _ses_findings(notice)):
        # SES sends from its own return path, so no VERP token: the original's Message-ID,
        # which the notification records, is what matches it (report() reads it at call time).
        original_id = _ses_original_message_id(notice) or original_id
        return [report(i, kind, found) for i, (kind, found) in enumerate(ses)]
    temporary, permanent = _flufl_failures(message)
    failure_found = bool(temporary or permanent)
    # RFC 3834 headers are set on bounces too: they decide only when neither a detector nor
    # the sender and subject say bounce (a null return path does not: replies use one too).
    if not (failure_found or _says_bounce(message)) and _is_auto_reply(message):
        # RFC 3834: the reply comes from the recipient's own address.
        replier = _bare(str(message.get("From") or ""))
        auto_reply = _Finding(replier, bounce_class=BounceClass.AUTO_REPLY)
        return [report(0, ReportKind.AUTO_REPLY, auto_reply)]
    if not (failure_found or _looks_like_bounce(message)):
        # Kept (ledger only) so reconcile can tell a "this is not me" reply.
        excerpt = _excerpt(human)
        return [report(0, ReportKind.NOT_BOUNCE, _Finding(diagnostic=excerpt))]
    # Mailman's detectors tell a delay warning (temporary) from a final failure (permanent);
    # when none of them knows the format, the original's recipients the report names.
    found: list[tuple[str | None, Finality | None]] = (
        [
            *((r, Finality.FAILED) for r in sorted(permanent)),
            *((r, Finality.DELAYED) for r in sorted(temporary)),
        ]
        or [(r, None) for r in _named_recipients(message, human)]
        or [(None, None)]
    )
    others = [r for r, _ in found if r]
    return [
        report(
            i,
            ReportKind.NON_STANDARD,
            _non_standard(recipient, human, finality, others, str(message.get("Subject") or "")),
        )
        for i, (recipient, finality) in enumerate(found)
    ]


@dataclass(frozen=True)
class _Finding:
    """What a report says about one recipient, before it gets its key and match fields."""

    recipient: str | None = None
    status: str | None = None
    diagnostic: str | None = None
    bounce_class: BounceClass = BounceClass.NOT_BOUNCE
    finality: Finality | None = None
    smtp_stage: SmtpStage | None = None


def smtp_rejection(
    code: int, reply: str, stage: SmtpStage | None = None
) -> tuple[str | None, BounceClass]:
    """Status and class of a synchronous SMTP rejection: the same rules as a DSN's. `stage` is
    the command the sender knows was refused; else the reply's own wording may name it."""
    status = enhanced_status(reply)
    if status is None and 400 <= code < 600:
        status = f"{code // 100}.0.0"
    return status, classify(status, reply, stage or smtp_stage(reply))


def _dsn_block(block: Message, human: str, reporting_mta: str | None) -> _Finding:
    # Original-Recipient is the address we sent to; Final-Recipient may be after aliasing, or
    # in another address type (X.400).
    recipient = _rfc822_address(block.get("Original-Recipient")) or _address(
        block.get("Final-Recipient")
    )
    diagnostic = _unfold(block.get("Diagnostic-Code"))
    # Some MTAs add a comment after the code: "4.4.1 (no answer from host)"; some give none
    # but quote the server's own in the diagnostic.
    status = enhanced_status(block.get("Status")) or enhanced_status(diagnostic, failures_only=True)
    explanation = _about(human, recipient) if recipient else human
    finality = _dsn_finality(str(block.get("Action") or ""), status, explanation)
    if finality == Finality.DELIVERED:
        return _Finding(recipient, status, diagnostic, BounceClass.DELIVERED, finality)
    # The stage: the diagnostic's, else the MTA's own explanation's (where Postfix gives it).
    stage = smtp_stage(diagnostic) or smtp_stage(explanation)
    hosts = mail_hosts(recipient, block.get("Remote-MTA"), reporting_mta)
    # The diagnostic first; the MTA's own explanation when the diagnostic explains nothing.
    bounce_class = classify(status, diagnostic, stage, hosts)
    if bounce_class == BounceClass.UNKNOWN or not diagnostic:
        bounce_class = classify(status, explanation, stage, hosts)
    if finality == Finality.DELAYED and bounce_class in {
        BounceClass.HARD_BOUNCE,
        BounceClass.UNKNOWN,
    }:
        bounce_class = BounceClass.SOFT_BOUNCE
    return _Finding(recipient, status, diagnostic, bounce_class, finality, stage)


def _ses_notice(message: Message) -> dict[str, Any] | None:
    """An Amazon SES notification sent by email (AWS SES "notification contents"): JSON, bare or
    inside an SNS envelope whose "Message" is the notification as a JSON string."""
    body = _body_text(message)
    if "notificationType" not in body and "eventType" not in body:
        return None
    # Mail wraps long lines: a line break with a continuation blank is not the JSON's own.
    text = re.sub(r"\r?\n[ \t]", "", body)
    decoder = json.JSONDecoder(strict=False)
    try:
        notice, _ = decoder.raw_decode(text, max(text.find("{"), 0))
        if isinstance(notice, dict) and isinstance(notice.get("Message"), str):
            notice = decoder.decode(notice["Message"])
    except ValueError:
        return None
    # Email notifications name the type "notificationType", event publishing "eventType".
    if isinstance(notice, dict) and (notice.get("notificationType") or notice.get("eventType")):
        return notice
    return None


def _ses_findings(notice: dict[str, Any]) -> list[tuple[ReportKind, _Finding]]:
    """One finding per recipient an SES notification names: a bounce is read as the DSN block
    it stands for; SES's own bounce sub-types (the rules file's) decide the class."""
    notice_type = notice.get("notificationType") or notice.get("eventType")
    if notice_type == "Complaint":
        complained = _ses_list(notice, "complaint", "complainedRecipients")
        return [
            (
                ReportKind.ARF,
                _Finding(str(r.get("emailAddress")), bounce_class=BounceClass.COMPLAINT),
            )
            for r in complained
            if isinstance(r, dict) and r.get("emailAddress")
        ]
    if notice_type == "Delivery":
        response = str(_ses_section(notice, "delivery").get("smtpResponse") or "") or None
        delivered = _Finding(
            status=enhanced_status(response),
            diagnostic=response,
            bounce_class=BounceClass.DELIVERED,
            finality=Finality.DELIVERED,
        )
        return [
            (ReportKind.DSN, replace(delivered, recipient=str(r)))
            for r in _ses_list(notice, "delivery", "recipients")
        ]
    if notice_type != "Bounce":
        return []
    bounce = _ses_section(notice, "bounce")
    subtype_class = load_rules().ses_bounce_subtypes.get(str(bounce.get("bounceSubType")))
    findings = []
    for bounced in _ses_list(notice, "bounce", "bouncedRecipients"):
        if not isinstance(bounced, dict) or not bounced.get("emailAddress"):
            continue
        block = Message()
        # SES notifies a bounce once it has given up on the recipient.
        block["Action"] = "failed"
        block["Final-Recipient"] = f"rfc822; {bounced['emailAddress']}"
        for field, key in (("Status", "status"), ("Diagnostic-Code", "diagnosticCode")):
            if bounced.get(key):
                block[field] = " ".join(str(bounced[key]).split())
        found = _dsn_block(block, "", str(bounce.get("reportingMTA") or "") or None)
        if subtype_class is not None:
            found = replace(found, bounce_class=subtype_class)
        elif bounce.get("bounceType") == "Transient" and found.bounce_class in {
            BounceClass.HARD_BOUNCE,
            BounceClass.UNKNOWN,
        }:
            # SES: "you may be able to send to this recipient in the future".
            found = replace(found, bounce_class=BounceClass.SOFT_BOUNCE)
        findings.append((ReportKind.DSN, found))
    return findings


def _ses_original_message_id(notice: dict[str, Any]) -> str | None:
    """The sent message's Message-ID from the notification's "mail" object: commonHeaders,
    else the original headers SES includes when configured to."""
    mail = _ses_section(notice, "mail")
    common = mail.get("commonHeaders")
    value = common.get("messageId") if isinstance(common, dict) else None
    headers = mail.get("headers")
    for header in headers if isinstance(headers, list) and not value else []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
            value = header.get("value")
    return _bracketed(value)


def _ses_section(notice: dict[str, Any], name: str) -> dict[str, Any]:
    section = notice.get(name)
    return section if isinstance(section, dict) else {}


def _ses_list(notice: dict[str, Any], name: str, key: str) -> list[Any]:
    items = _ses_section(notice, name).get(key)
    return items if isinstance(items, list) else []


def _dsn_finality(action: str, status: str | None, explanation: str) -> Finality:
    action = action.strip().lower()
    if action.startswith(("delivered", "relayed", "expanded")):
        return Finality.DELIVERED
    if action.startswith("delayed"):
        return Finality.DELAYED
    # "failed", and opensmtpd's non-standard "error" and others' "failure".
    if action.startswith(("fail", "error")):
        return Finality.FAILED
    # No usable Action: the status class, else the report's own words.
    if status and status.startswith("2."):
        return Finality.DELIVERED
    return _text_finality(explanation)


def _text_finality(text: str) -> Finality:
    return Finality.DELAYED if load_rules().still_retrying.search(text) else Finality.FAILED


def _non_standard(
    recipient: str | None,
    human: str,
    finality: Finality | None,
    recipients: list[str],
    subject: str,
) -> _Finding:
    text = _about(human, recipient, recipients) if recipient else _flat(human)
    # A transcript quotes the server's 2xx replies too: the failure's code is the one wanted.
    status = enhanced_status(text, failures_only=True)
    stage = smtp_stage(text)
    hosts = mail_hosts(recipient)
    finality = finality or _text_finality(text)
    bounce_class = classify(status, text, stage, hosts)
    if bounce_class == BounceClass.UNKNOWN and recipient and len(recipients) <= 1:
        # A one-recipient report may give the reason before naming the address.
        bounce_class = classify(status, human, stage, hosts)
    if bounce_class == BounceClass.UNKNOWN:
        # Some notices give the reason in their subject alone (fml's "Loop Alert: ...").
        bounce_class = classify(status, subject, stage, hosts)
    if bounce_class == BounceClass.UNKNOWN and finality == Finality.DELAYED:
        # A delay warning whose words no rule explains is still a temporary problem.
        bounce_class = BounceClass.SOFT_BOUNCE
    return _Finding(recipient, status, _excerpt(text), bounce_class, finality, stage)


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
# An address that begins a line of a report, or follows "RCPT TO:" in a transcript.
_LISTED_ADDRESS = re.compile(rf"(?:^|rcpt to:)\s*<?({_ADDRESS})>?", re.IGNORECASE | re.MULTILINE)
# Else an address in angle brackets anywhere in the report's words ("... in <list@example.org>").
_BRACKETED_ADDRESS = re.compile(rf"<({_ADDRESS})>")


def _returned_headers(message: Message) -> Message | None:
    """The returned original's headers when the report attaches them: the whole message
    (message/rfc822) or its headers only (text/rfc822-headers, as with DSN RET=HDRS)."""
    original = _part(message, "message/rfc822") or _part(message, "text/rfc822-headers")
    inner = original.get_payload() if original is not None else None
    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
        return inner[0]
    if isinstance(inner, str):
        return message_from_bytes(inner.encode("utf-8", "replace"))
    return None


def _bracketed(value: object) -> str | None:
    """What a header value holds between angle brackets: a Message-ID's "id@host"."""
    found = re.search(r"<([^>\s]+)>", str(value or ""))
    return found.group(1) if found else None


def _original_recipients(message: Message) -> list[str]:
    """Whom the returned original was addressed to: attached, or quoted after the report."""
    headers = _returned_headers(message) or _quoted_message(message)
    if headers is None:
        return []
    fields = [str(v) for name in ("To", "Cc") for v in headers.get_all(name) or []]
    return [a for _, a in getaddresses(fields) if "@" in a]


def _quoted_message(message: Message) -> Message | None:
    """The message a report quotes in its text after its own words, if any."""
    if quoted := load_rules().original_marker.search(body := _body_text(message)):
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
    if headers is not None and (attached := _bracketed(headers.get("Message-ID"))):
        return attached
    own = str(message.get("Message-ID") or "")
    for found in _MESSAGE_ID.finditer(_body_text(message)):
        if found.group(1) not in own:
            return found.group(1)
    # A person's reply names what it answers.
    return _bracketed(message.get("In-Reply-To"))


def _part(message: Message, content_type: str) -> Message | None:
    for part in message.walk():
        if part.get_content_type() == content_type:
            return part
    return None


_DELIVERY_STATUS = "message/delivery-status"
# A delivery-status part in a report's text: its header line, and the MIME boundary after it.
_UNPARSED_STATUS = re.compile(r"^content-type:\s*message/delivery-status[^\n]*\n", re.I | re.M)
_BOUNDARY_LINE = re.compile(r"^\s*--\S+\s*$", re.MULTILINE)


def _status_part(message: Message) -> tuple[Message | None, Message]:
    """The report's delivery-status part, and the message whose own words explain it.

    The report's part; else that of a DSN forwarded whole as text (a provider's helpdesk quoting
    the bounce it received); else one whose MIME structure does not parse (an indented boundary
    line), read from the text.
    """
    if (part := _part(message, _DELIVERY_STATUS)) is not None:
        return part, message
    quoted = _quoted_message(message)
    if quoted is not None and (part := _part(quoted, _DELIVERY_STATUS)) is not None:
        return part, quoted
    if found := _UNPARSED_STATUS.search(body := _body_text(message)):
        fields = _BOUNDARY_LINE.split(body[found.end() :], maxsplit=1)[0]
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
    """The Reporting-MTA field of a delivery-status part (its per-message block)."""
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
    found = [_address(str(v)) for v in block.get_all("Original-Rcpt-To") or []]
    if not found:
        headers = _returned_headers(message)
        if headers is not None and headers.get("To"):
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


def _human_text(message: Message) -> str:
    """The report's own words: text parts before the returned original, one line each.

    Lines are kept because many MTAs put a recipient's reason on its line ("reason: address").
    """
    own = load_rules().original_marker.split(_body_text(message), maxsplit=1)[0]
    lines = (" ".join(line.split()) for line in own.splitlines())
    return "\n".join(line for line in lines if line)


def _body_text(message: Message) -> str:
    texts = []
    for part in message.walk():
        if part.get_content_type() in {"message/rfc822", "text/rfc822-headers"}:
            break
        # A multipart whose boundary does not parse stays one string: read it as text.
        unparsed = part.get_content_maintype() == "multipart" and not part.is_multipart()
        if part.get_content_maintype() == "text" or unparsed:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                charset = part.get_content_charset() or "utf-8"
                try:
                    text = payload.decode(charset, "replace")
                except LookupError:
                    text = payload.decode("utf-8", "replace")
                is_html = part.get_content_subtype() == "html"
                texts.append(_html_words(text) if is_html else text)
    return "\n".join(texts)


_HTML_HIDDEN = re.compile(r"<(style|script|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BLOCK = re.compile(r"<(br|p|div|tr|li|h\d)\b[^>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")


def _html_words(text: str) -> str:
    """An HTML-only report's visible words, a line per block (Gmail's and AOL's reports)."""
    text = _HTML_BLOCK.sub("\n", _HTML_HIDDEN.sub(" ", text))
    return html.unescape(_HTML_TAG.sub(" ", text))


def _about(text: str, recipient: str, recipients: Sequence[str] = (), span: int = 400) -> str:
    """The words a report says about one recipient, else all of them.

    From the start of the line that names it (some MTAs write "reason: address") to where the
    report names another recipient, at most `span` characters on.
    """
    lowered = text.lower()
    at = lowered.find(recipient.lower())
    if at < 0:
        return _flat(text)
    line_start = text.rfind("\n", 0, at) + 1
    end = at + span
    for other in recipients:
        next_at = lowered.find(other.lower(), at + len(recipient))
        if other.lower() == recipient.lower() or not 0 <= next_at < end:
            continue
        # A line that begins with another recipient ends ours; "(generated from <other>)" not.
        other_line = text.rfind("\n", 0, next_at) + 1
        if other_line > at and not text[other_line:next_at].strip(" <\"'"):
            end = other_line
    return _flat(text[line_start:end])


def _flat(text: str) -> str:
    return " ".join(text.split())


def _excerpt(text: str, limit: int = 500) -> str | None:
    return _flat(text)[:limit] or None


def _address(field: str | None) -> str | None:
    """The address of a DSN recipient field: "rfc822; a@example.org", or (McAfee) "<a@...>"."""
    if not field:
        return None
    kind, semicolon, address = str(field).partition(";")
    return _bare(address if semicolon else kind)


def _rfc822_address(field: str | None) -> str | None:
    address = _address(field)
    return address if address and "@" in address and "/" not in address else None


def _bare(address: str) -> str | None:
    found = re.search(r"<([^<>\s]+@[^<>\s]+)>", address)
    value = found.group(1) if found else address.strip().strip("<>")
    return value or None


def _unfold(value: str | None) -> str | None:
    return " ".join(str(value).split()) if value else None


_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_FAILURE_STATUS = re.compile(r"(?<![\d.])([45]\.\d{1,3}\.\d{1,3})(?![\d.])")


def enhanced_status(reply: str | None, *, failures_only: bool = False) -> str | None:
    """The RFC 3463 enhanced status code quoted in an SMTP reply (4.x.x or 5.x.x only), if any."""
    found = (_FAILURE_STATUS if failures_only else _ENHANCED_STATUS).search(reply or "")
    return found.group(1) if found else None
