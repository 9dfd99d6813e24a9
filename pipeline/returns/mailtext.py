"""Reading a returned message's parts and words: bodies as text, addresses, excerpts about one
recipient. Pure helpers of the report parsers; no class decisions."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from email.message import Message

from pipeline.records.bounce_classes import (
    load_rules,
)


def bracketed(value: object) -> str | None:
    """What a header value holds between angle brackets: a Message-ID's "id@host"."""
    found = re.search(r"<([^>\s]+)>", str(value or ""))
    return found.group(1) if found else None


def part(message: Message, content_type: str) -> Message | None:
    for found in message.walk():
        if found.get_content_type() == content_type:
            return found
    return None


def human_text(message: Message) -> str:
    """The report's own words: text parts before the returned original, one line each.

    Lines are kept because many MTAs put a recipient's reason on its line ("reason: address").
    """
    own = load_rules().original_marker.split(body_text(message), maxsplit=1)[0]
    lines = (" ".join(line.split()) for line in own.splitlines())
    return "\n".join(line for line in lines if line)


def body_text(message: Message) -> str:
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
                texts.append(html_words(text) if is_html else text)
    return "\n".join(texts)


_HTML_HIDDEN = re.compile(r"<(style|script|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BLOCK = re.compile(r"<(br|p|div|tr|li|h\d)\b[^>]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")


def html_words(text: str) -> str:
    """An HTML-only report's visible words, a line per block (Gmail's and AOL's reports)."""
    text = _HTML_BLOCK.sub("\n", _HTML_HIDDEN.sub(" ", text))
    return html.unescape(_HTML_TAG.sub(" ", text))


def about(text: str, recipient: str, recipients: Sequence[str] = (), span: int = 400) -> str:
    """The words a report says about one recipient, else all of them.

    From the start of the line that names it (some MTAs write "reason: address") to where the
    report names another recipient or a Sendmail transcript turns to another host ("While
    talking to ..."), at most `span` characters on.
    """
    lowered = text.lower()
    at = lowered.find(recipient.lower())
    if at < 0:
        return flat(text)
    line_start = text.rfind("\n", 0, at) + 1
    end = at + span
    if (next_host := lowered.find("\nwhile talking to ", at)) >= 0:
        end = min(end, next_host)
    for other in recipients:
        next_at = lowered.find(other.lower(), at + len(recipient))
        if other.lower() == recipient.lower() or not 0 <= next_at < end:
            continue
        # A line that begins with another recipient (after a reply code: Sendmail's "550
        # <other>...") ends ours; "(generated from <other>)" not.
        other_line = text.rfind("\n", 0, next_at) + 1
        if other_line > at and not text[other_line:next_at].strip(" <\"'0123456789"):
            end = other_line
    return flat(text[line_start:end])


def flat(text: str) -> str:
    return " ".join(text.split())


def excerpt(text: str, limit: int = 500) -> str | None:
    return flat(text)[:limit] or None


def address(field: str | None) -> str | None:
    """The address of a DSN recipient field: "rfc822; a@example.org", or (McAfee) "<a@...>"."""
    if not field:
        return None
    kind, semicolon, address = str(field).partition(";")
    return bare(address if semicolon else kind)


def rfc822_address(field: str | None) -> str | None:
    found = address(field)
    return found if found and "@" in found and "/" not in found else None


def bare(address: str) -> str | None:
    found = re.search(r"<([^<>\s]+@[^<>\s]+)>", address)
    value = found.group(1) if found else address.strip().strip("<>")
    return value or None


def unfold(value: str | None) -> str | None:
    return " ".join(str(value).split()) if value else None
