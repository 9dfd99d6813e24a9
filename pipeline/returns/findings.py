"""What a report says about one recipient: a DSN block read per RFC 3464, a non-standard
bounce's own words, or an Amazon SES notification (JSON, bare or in an SNS envelope), each
classified by the bounce rules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from email.message import Message
from typing import Any

from pipeline.records.bounce_classes import (
    BounceClass,
    Finality,
    ReportKind,
    SmtpStage,
    classify,
    enhanced_status,
    load_rules,
    mail_hosts,
    smtp_stage,
)
from pipeline.returns import mailtext


@dataclass(frozen=True)
class Finding:
    """What a report says about one recipient, before it gets its key and match fields."""

    recipient: str | None = None
    status: str | None = None
    diagnostic: str | None = None
    bounce_class: BounceClass = BounceClass.NOT_BOUNCE
    finality: Finality | None = None
    smtp_stage: SmtpStage | None = None


def dsn_block(block: Message, human: str, reporting_mta: str | None) -> Finding:
    # Original-Recipient is the address we sent to; Final-Recipient may be after aliasing, or
    # in another address type (X.400).
    recipient = mailtext.rfc822_address(block.get("Original-Recipient")) or mailtext.address(
        block.get("Final-Recipient")
    )
    diagnostic = mailtext.unfold(block.get("Diagnostic-Code"))
    # Some MTAs add a comment after the code: "4.4.1 (no answer from host)"; some give none
    # but quote the server's own in the diagnostic.
    status = enhanced_status(block.get("Status")) or enhanced_status(diagnostic, failures_only=True)
    explanation = mailtext.about(human, recipient) if recipient else human
    finality = dsn_finality(str(block.get("Action") or ""), status, explanation)
    if finality == Finality.DELIVERED:
        return Finding(recipient, status, diagnostic, BounceClass.DELIVERED, finality)
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
    return Finding(recipient, status, diagnostic, bounce_class, finality, stage)


def ses_notice(message: Message) -> dict[str, Any] | None:
    """An Amazon SES notification sent by email (AWS SES "notification contents"): JSON, bare or
    inside an SNS envelope whose "Message" is the notification as a JSON string."""
    body = mailtext.body_text(message)
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


def ses_findings(notice: dict[str, Any]) -> list[tuple[ReportKind, Finding]]:
    """One finding per recipient an SES notification names: a bounce is read as the DSN block
    it stands for; SES's own bounce sub-types (the rules file's) decide the class."""
    notice_type = notice.get("notificationType") or notice.get("eventType")
    if notice_type == "Complaint":
        complained = ses_list(notice, "complaint", "complainedRecipients")
        return [
            (
                ReportKind.ARF,
                Finding(str(r.get("emailAddress")), bounce_class=BounceClass.COMPLAINT),
            )
            for r in complained
            if isinstance(r, dict) and r.get("emailAddress")
        ]
    if notice_type == "Delivery":
        response = str(ses_section(notice, "delivery").get("smtpResponse") or "") or None
        delivered = Finding(
            status=enhanced_status(response),
            diagnostic=response,
            bounce_class=BounceClass.DELIVERED,
            finality=Finality.DELIVERED,
        )
        return [
            (ReportKind.DSN, replace(delivered, recipient=str(r)))
            for r in ses_list(notice, "delivery", "recipients")
        ]
    if notice_type != "Bounce":
        return []
    bounce = ses_section(notice, "bounce")
    subtype_class = load_rules().ses_bounce_subtypes.get(str(bounce.get("bounceSubType")))
    findings = []
    for bounced in ses_list(notice, "bounce", "bouncedRecipients"):
        if not isinstance(bounced, dict) or not bounced.get("emailAddress"):
            continue
        block = Message()
        # SES notifies a bounce once it has given up on the recipient.
        block["Action"] = "failed"
        block["Final-Recipient"] = f"rfc822; {bounced['emailAddress']}"
        for field, key in (("Status", "status"), ("Diagnostic-Code", "diagnosticCode")):
            if bounced.get(key):
                block[field] = " ".join(str(bounced[key]).split())
        found = dsn_block(block, "", str(bounce.get("reportingMTA") or "") or None)
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


def ses_original_message_id(notice: dict[str, Any]) -> str | None:
    """The sent message's Message-ID from the notification's "mail" object: commonHeaders,
    else the original headers SES includes when configured to."""
    mail = ses_section(notice, "mail")
    common = mail.get("commonHeaders")
    value = common.get("messageId") if isinstance(common, dict) else None
    headers = mail.get("headers")
    for header in headers if isinstance(headers, list) and not value else []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
            value = header.get("value")
    return mailtext.bracketed(value)


def ses_section(notice: dict[str, Any], name: str) -> dict[str, Any]:
    section = notice.get(name)
    return section if isinstance(section, dict) else {}


def ses_list(notice: dict[str, Any], name: str, key: str) -> list[Any]:
    items = ses_section(notice, name).get(key)
    return items if isinstance(items, list) else []


def dsn_finality(action: str, status: str | None, explanation: str) -> Finality:
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
    return text_finality(explanation)


def text_finality(text: str) -> Finality:
    return Finality.DELAYED if load_rules().still_retrying.search(text) else Finality.FAILED


def non_standard(
    recipient: str | None,
    human: str,
    finality: Finality | None,
    recipients: list[str],
    subject: str,
) -> Finding:
    text = mailtext.about(human, recipient, recipients) if recipient else mailtext.flat(human)
    # A transcript quotes the server's 2xx replies too: the failure's code is the one wanted.
    status = enhanced_status(text, failures_only=True)
    stage = smtp_stage(text)
    hosts = mail_hosts(recipient)
    finality = finality or text_finality(text)
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
    return Finding(recipient, status, mailtext.excerpt(text), bounce_class, finality, stage)
