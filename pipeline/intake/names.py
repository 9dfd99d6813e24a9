"""An insurer's file name is untrusted input: it can hold control characters (a newline forges a
log line), bytes that are not UTF-8, or 250 characters (too long once prefixed in the archive).

Three forms, each for one use:
* `as_data`: the name as the ledger keeps it (undecodable bytes as backslash escapes, so every
  database can store it);
* `shown`: for log lines and reports: one printable line of bounded length;
* `stored`: for a file the pipeline writes (archive, outbox): the name itself when it is plain,
  else a cleaned, shortened form prefixed with a hash of the original so two names never meet.
"""

from __future__ import annotations

import hashlib
import os
import re

# Names made only of these are used as they are; the length leaves room for prefixes and the
# temporary suffixes of atomic writes within the 255 bytes a file name may have.
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+=@,()-]{0,119}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@,()-]")
_SHOWN_HEAD, _SHOWN_TAIL = 80, 30
_STORED_HEAD, _STORED_TAIL = 70, 30


def as_data(name: str) -> str:
    """The name with bytes that are not UTF-8 (surrogate escapes) written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def shown(name: str) -> str:
    """One printable line: control and other non-printable characters escaped (\\n, \\x1b),
    long names shortened in the middle."""
    if len(name) > _SHOWN_HEAD + _SHOWN_TAIL:
        return f"{_escaped(name[:_SHOWN_HEAD])}…{_escaped(name[-_SHOWN_TAIL:])}"
    return _escaped(name)


def stored(name: str) -> str:
    if _PLAIN.match(name):
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    cleaned = _UNSAFE.sub("_", name)
    if len(cleaned) > _STORED_HEAD + _STORED_TAIL:
        cleaned = cleaned[:_STORED_HEAD] + "_" + cleaned[-_STORED_TAIL:]
    return f"{digest}-{cleaned}"


def _escaped(text: str) -> str:
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)
