"""Bounces stage: read the return-path maildir, parse RFC 3464 DSNs, classify, match by VERP.

Parsing and classification do no I/O beyond loading the rules file; reading the maildir is
`read_maildir`. Each report yields one BounceReport per recipient it names.
"""

from __future__ import annotations

import hashlib
import mailbox
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message
from enum import StrEnum
from functools import cache
from pathlib import Path

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


@dataclass(frozen=True)
class Rule:
    bounce_class: BounceClass
    status: re.Pattern[str] | None
    text: re.Pattern[str] | None

    def matches(self, status: str | None, diagnostic: str | None) -> bool:
        return bool(
            (self.status and status and self.status.search(status))
            or (self.text and diagnostic and self.text.search(diagnostic))
        )


@dataclass(frozen=True)
class BounceReport:
    # sha256 of the raw report and the recipient: the same report is processed once.
    dedupe_key: str
    # Our message token from the VERP return path, when the report came back to one.
    message_token: str | None
    recipient: str | None
    status: str | None
    diagnostic: str | None
    bounce_class: BounceClass


@cache
def load_rules(path: Path = RULES_FILE) -> tuple[Rule, ...]:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return tuple(
        Rule(
            BounceClass(item["class"]),
            re.compile(item["status"]) if "status" in item else None,
            re.compile(item["text"], re.IGNORECASE) if "text" in item else None,
        )
        for item in raw["rule"]
    )


def classify(status: str | None, diagnostic: str | None) -> BounceClass:
    for rule in load_rules():
        if rule.matches(status, diagnostic):
            return rule.bounce_class
    return BounceClass.UNKNOWN


def parse_report(raw: bytes, *, return_path_domain: str) -> list[BounceReport]:
    """One BounceReport per recipient of a DSN; a non-DSN gives one not_bounce report."""
    message = message_from_bytes(raw, policy=policy.compat32)
    digest = hashlib.sha256(raw).hexdigest()
    token = _verp_token(message, return_path_domain)
    status_part = _delivery_status_part(message)
    if status_part is None:
        return [BounceReport(digest, token, None, None, None, BounceClass.NOT_BOUNCE)]
    reports = []
    for index, block in enumerate(_recipient_blocks(status_part)):
        recipient = _address(block.get("Final-Recipient") or block.get("Original-Recipient"))
        # Some MTAs add a comment after the code: "4.4.1 (no answer from host)".
        status = enhanced_status(block.get("Status"))
        diagnostic = _unfold(block.get("Diagnostic-Code"))
        # A report may name the same recipient in several blocks: each block counts once.
        key = hashlib.sha256(f"{digest}:{index}:{recipient}".encode()).hexdigest()
        reports.append(
            BounceReport(key, token, recipient, status, diagnostic, classify(status, diagnostic))
        )
    return reports


def read_maildir(path: Path) -> Iterator[tuple[str, bytes]]:
    """(key, raw bytes) of every message in the maildir, oldest first."""
    box = mailbox.Maildir(path, create=True)
    for key in sorted(box.keys()):
        yield key, box.get_bytes(key)


def mark_processed(path: Path, key: str) -> None:
    """Move a processed report to cur/ with the Seen flag, as a mail client would."""
    box = mailbox.Maildir(path, create=False)
    report = box[key]
    report.set_subdir("cur")
    report.add_flag("S")
    box[key] = report


def _verp_token(message: Message, domain: str) -> str | None:
    for header in ("Delivered-To", "X-Original-To", "To", "Return-Path"):
        value = message.get(header)
        if value and (token := token_from_verp(str(value), domain)):
            return token
    return None


def _delivery_status_part(message: Message) -> Message | None:
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            return part
    return None


def _recipient_blocks(status_part: Message) -> list[Message]:
    # The first block describes the message; each further block one recipient.
    payload = status_part.get_payload()
    blocks = payload if isinstance(payload, list) else []
    return [b for b in blocks[1:] if isinstance(b, Message)]


def _address(field: str | None) -> str | None:
    if not field:
        return None
    _, _, address = field.partition(";")
    return address.strip().strip("<>") or None


def _unfold(value: str | None) -> str | None:
    return " ".join(value.split()) if value else None


_ENHANCED_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced_status(reply: str | None) -> str | None:
    """The RFC 3463 enhanced status code quoted in an SMTP reply, if any."""
    found = _ENHANCED_STATUS.search(reply or "")
    return found.group(1) if found else None
