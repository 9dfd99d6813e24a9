"""Bounce classes and the rules that assign them: the vocabulary both the send loop (a 5xx
at SMTP time) and the returns loop (a report that came back later) classify with.

The class comes from `config/bounce_rules.toml`: ordered rules of enhanced-status, reply-text,
SMTP-stage and mail-host patterns. Nothing here reads mail or the ledger.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from pipeline.resources import CONFIG_DIR

RULES_FILE = CONFIG_DIR / "bounce_rules.toml"


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


# What operations may say an `unknown` report was, after reading it.
RECLASSIFY_TO = (
    BounceClass.HARD_BOUNCE,
    BounceClass.SOFT_BOUNCE,
    BounceClass.POLICY_BLOCK,
    BounceClass.AUTO_REPLY,
    BounceClass.NOT_BOUNCE,
)


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


@dataclass
class RuleUse:
    """Which rules may decide, and which did: how the agreement benchmark measures a rule's
    worth on files it was not written for (rules disabled while a group of files is held out)."""

    # Indices into Rules.rules that classify() skips.
    disabled: frozenset[int] = frozenset()
    # Indices of the rules that decided a classify() call.
    decided: set[int] = field(default_factory=set)


_RULE_USE: ContextVar[RuleUse | None] = ContextVar("bounce_rule_use", default=None)


@contextmanager
def rule_use(disabled: frozenset[int] = frozenset()) -> Iterator[RuleUse]:
    """Classify with `disabled` rules skipped, recording the rules that decide."""
    use = RuleUse(disabled)
    token = _RULE_USE.set(use)
    try:
        yield use
    finally:
        _RULE_USE.reset(token)


def classify(
    status: str | None, text: str | None, stage: SmtpStage | None = None, hosts: str = ""
) -> BounceClass:
    """The first rule matching the enhanced status code, the reply text, the SMTP stage and the
    mail hosts the report names (see `mail_hosts`)."""
    flat = " ".join((text or "").split())
    use = _RULE_USE.get()
    for index, rule in enumerate(load_rules().rules):
        if use is not None and index in use.disabled:
            continue
        if rule.matches(status, flat, stage, hosts):
            if use is not None:
                use.decided.add(index)
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


def smtp_rejection(
    code: int, reply: str, stage: SmtpStage | None = None
) -> tuple[str | None, BounceClass]:
    """Status and class of a synchronous SMTP rejection: the same rules as a DSN's. `stage` is
    the command the sender knows was refused; else the reply's own wording may name it."""
    status = enhanced_status(reply)
    if status is None and 400 <= code < 600:
        status = f"{code // 100}.0.0"
    return status, classify(status, reply, stage or smtp_stage(reply))


_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")

_FAILURE_STATUS = re.compile(r"(?<![\d.])([45]\.\d{1,3}\.\d{1,3})(?![\d.])")


def enhanced_status(reply: str | None, *, failures_only: bool = False) -> str | None:
    """The RFC 3463 enhanced status code quoted in an SMTP reply (4.x.x or 5.x.x only), if any."""
    found = (_FAILURE_STATUS if failures_only else _ENHANCED_STATUS).search(reply or "")
    return found.group(1) if found else None
