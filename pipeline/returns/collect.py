"""Collect what reaches the return path: a maildir or mbox locally, IMAP in production.

Each raw message is identified by its sha256, kept encrypted (the at-rest keyring,
pipeline.records.atrest) under the data directory for audit, and marked processed at its source only
after the ledger commit, so a crash re-reads it and the hash makes the second read a no-op.
"""

from __future__ import annotations

import hashlib
import imaplib
import mailbox
import os
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken

from pipeline.errors import ConfigError, ReturnPathError
from pipeline.records.atrest import (
    MAGIC,
    DecryptionError,
    Keyring,
    reencrypt,
    write_encrypted,
)

# Reports kept before they moved onto the at-rest keyring are Fernet tokens under this key (or
# <data_dir>/archive.key); only `eob rekey` still reads it, to convert them.
LEGACY_ARCHIVE_KEY_ENV = "EOB_ARCHIVE_KEY"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Collected:
    ref: str
    raw: bytes

    @cached_property  # asked several times per report: the ledger check, the archive, each row
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


class Source(Protocol):
    def messages(self) -> Iterator[Collected]: ...

    def mark_processed(self, ref: str) -> None: ...


@dataclass(frozen=True)
class MaildirSource:
    path: Path

    def messages(self) -> Iterator[Collected]:
        box = mailbox.Maildir(self.path, create=True)
        for key in sorted(box.keys()):
            yield Collected(key, box.get_bytes(key))

    def mark_processed(self, ref: str) -> None:
        """Remove the report: its encrypted copy under returnpath-archive/ is the record, and a
        processed report must not rest in plaintext in the data directory."""
        mailbox.Maildir(self.path, create=False).discard(ref)


@dataclass
class MboxSource:
    path: Path
    # Refs marked during a pass of messages(), flagged read in one rewrite of the file when
    # the pass ends (mbox has no in-place update: each flush rewrites the whole file).
    _marked: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def messages(self) -> Iterator[Collected]:
        box = mailbox.mbox(self.path, create=False)
        try:
            unread = [k for k in box.keys() if "R" not in box.get_message(k).get_flags()]
            found = [Collected(str(key), box.get_bytes(key)) for key in unread]
        finally:
            box.close()
        self._marked = []
        try:
            yield from found
        finally:
            # Also when the pass stops early: what was marked had been committed.
            marked, self._marked = self._marked, None
            if marked:
                self._flag_read(marked)

    def mark_processed(self, ref: str) -> None:
        if self._marked is not None:
            self._marked.append(ref)
        else:
            self._flag_read([ref])

    def _flag_read(self, refs: list[str]) -> None:
        box = mailbox.mbox(self.path, create=False)
        box.lock()
        try:
            for ref in refs:
                # mbox keys are ints at run time; the stubs say str.
                key: Any = int(ref)
                report = box[key]
                report.add_flag("R")
                box[key] = report
            box.flush()
        finally:
            box.unlock()
            box.close()


@dataclass
class ImapSource:
    """Unseen messages of one IMAP folder over TLS; marked \\Seen once processed.

    The server's certificate and name are verified against the system trust store
    (SSL_CERT_FILE names another): the password and the reports must not go to an impostor.
    Every reply's status is checked and every read waits at most `timeout` seconds: a server
    that refuses or stops answering fails the pass with a ReturnPathError naming it, and what
    was not marked is read again next pass.
    """

    host: str
    user: str
    password: str
    folder: str = "INBOX"
    port: int = 993
    # Seconds to wait for the connection, the TLS handshake and each reply.
    timeout: float = 60.0
    # The session messages() holds open while it yields: reports are marked over it rather
    # than with a login each.
    _client: imaplib.IMAP4_SSL | None = field(default=None, init=False, repr=False, compare=False)

    def _connect(self) -> imaplib.IMAP4_SSL:
        context = ssl.create_default_context()
        client = self._call(
            "connect",
            lambda: imaplib.IMAP4_SSL(
                self.host, self.port, ssl_context=context, timeout=self.timeout
            ),
        )
        try:
            self._call("LOGIN", lambda: client.login(self.user, self.password))
            self._call(f"SELECT {self.folder}", lambda: client.select(self.folder))
        except BaseException:
            client.shutdown()
            raise
        return client

    def _call(self, what: str, command: Callable[[], _T]) -> _T:
        """Run one IMAP command; a NO, a BAD, a dropped connection or silence past the
        timeout is a ReturnPathError naming the server and the command (never a reply's text:
        it may quote a report)."""
        where = f"IMAP server {self.host}:{self.port}"
        try:
            reply = command()
        except TimeoutError as err:
            raise ReturnPathError(f"{where}: {what}: no answer within {self.timeout} s") from err
        except (imaplib.IMAP4.error, OSError) as err:
            raise ReturnPathError(f"{where}: {what}: {type(err).__name__}") from err
        status = reply[0] if isinstance(reply, tuple) else "OK"
        if status != "OK":
            raise ReturnPathError(f"{where}: {what}: {status}")
        return reply

    def messages(self) -> Iterator[Collected]:
        self._client = client = self._connect()
        try:
            _, data = self._call("SEARCH UNSEEN", lambda: client.uid("SEARCH", "UNSEEN"))
            for uid in (data[0] or b"").split():
                # BODY.PEEK leaves \Seen unset until mark_processed.
                fetch = partial(client.uid, "FETCH", uid.decode(), "(BODY.PEEK[])")
                _, fetched = self._call(f"FETCH {uid.decode()}", fetch)
                part = fetched[0]
                if isinstance(part, tuple):
                    yield Collected(uid.decode(), part[1])
        finally:
            self._client = None
            _logout(client)

    def mark_processed(self, ref: str) -> None:
        client = self._client or self._connect()
        try:
            self._call(f"STORE {ref}", lambda: client.uid("STORE", ref, "+FLAGS", "(\\Seen)"))
        finally:
            if client is not self._client:
                _logout(client)


def _logout(client: imaplib.IMAP4_SSL) -> None:
    # A failed session's logout may fail too; what failed first is what the operator reads.
    try:
        client.logout()
    except (imaplib.IMAP4.error, OSError):
        client.shutdown()


IMAP_PASSWORD_ENV = "EOB_IMAP_PASSWORD"


def source_from(spec: str, default_maildir: Path) -> Source:
    """The return-path source a `return_path_source` setting names."""
    if not spec:
        return MaildirSource(default_maildir)
    kind, _, rest = spec.partition(":")
    if kind == "maildir" and rest:
        return MaildirSource(Path(rest))
    if kind == "mbox" and rest:
        return MboxSource(Path(rest))
    if kind == "imaps":
        url = urlsplit(spec)
        if url.hostname and url.username:
            return ImapSource(
                url.hostname,
                url.username,
                os.environ.get(IMAP_PASSWORD_ENV, ""),
                url.path.strip("/") or "INBOX",
                url.port or 993,
            )
    raise ConfigError(
        "setting return_path_source: expected maildir:PATH, mbox:PATH or imaps://USER@HOST/FOLDER"
    )


class Archive:
    """Raw reports, encrypted, one file per sha256; its presence means already processed.

    Each file is bound to its hash (the authenticated context): a report renamed to another
    hash does not decrypt."""

    def __init__(self, directory: Path, keyring: Keyring) -> None:
        self.directory = directory
        self._keyring = keyring
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def in_data_dir(cls, data_dir: Path, keyring: Keyring) -> Archive:
        return cls(data_dir / "returnpath-archive", keyring)

    def _path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.eml.enc"

    def keep(self, item: Collected) -> None:
        write_encrypted(self._path(item.sha256), item.raw, self._keyring, _context(item.sha256))

    def read(self, sha256: str) -> bytes:
        return self.read_file(self._path(sha256))

    def read_file(self, path: Path) -> bytes:
        """A kept report decrypted in memory (path names it: `eob decrypt` passes a path)."""
        blob = path.read_bytes()
        if not blob.startswith(MAGIC):
            raise DecryptionError(f"{path.name}: {_FERNET_REFUSED}")
        return self._keyring.decrypt(blob, _context(_sha256_of(path)), source=path.name)

    def rekey(self, legacy_key: bytes | None) -> dict[str, int]:
        """Re-encrypt every kept report under the active key; reports still sealed with the
        retired Fernet archive key (`legacy_fernet_key`) are converted."""
        counts = {"reencrypted": 0, "already_current": 0}
        for path in sorted(self.directory.glob("*.eml.enc")):
            blob = path.read_bytes()
            context = _context(_sha256_of(path))
            if blob.startswith(MAGIC):
                changed = reencrypt(path, self._keyring, context)
            else:
                raw = _fernet_open(path, blob, legacy_key)
                write_encrypted(path, raw, self._keyring, context)
                changed = True
            counts["reencrypted" if changed else "already_current"] += 1
        return counts


_FERNET_REFUSED = (
    f"sealed with the retired Fernet archive key: run `eob rekey` (with {LEGACY_ARCHIVE_KEY_ENV} "
    "set, or <data_dir>/archive.key in place) to move it onto the at-rest keyring"
)


def _context(sha256: str) -> str:
    return f"returnpath:{sha256}"


def _sha256_of(path: Path) -> str:
    return path.name.removesuffix(".eml.enc")


def legacy_fernet_key(data_dir: Path, environ: Mapping[str, str]) -> bytes | None:
    """The retired Fernet archive key, if still configured (only to convert old reports)."""
    if environ.get(LEGACY_ARCHIVE_KEY_ENV, "").strip():
        return environ[LEGACY_ARCHIVE_KEY_ENV].strip().encode()
    key_file = data_dir / "archive.key"
    return key_file.read_bytes().strip() if key_file.exists() else None


def _fernet_open(path: Path, blob: bytes, key: bytes | None) -> bytes:
    if key is None:
        raise DecryptionError(f"{path.name}: {_FERNET_REFUSED}")
    try:
        return Fernet(key).decrypt(blob)
    except (InvalidToken, ValueError) as err:
        # ValueError: the key itself is malformed; neither error's text quotes the key or data.
        raise DecryptionError(
            f"{path.name}: not readable with the Fernet archive key ({LEGACY_ARCHIVE_KEY_ENV} "
            "or <data_dir>/archive.key)"
        ) from err
