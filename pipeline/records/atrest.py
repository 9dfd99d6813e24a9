"""Encryption at rest: AES-256-GCM for the PHI files the pipeline writes (PDFs, print batches,
raw bounce reports; the insurers' archived drops in a streaming format; the parquet
intermediates use this keyring through pipeline.records.atrest_parquet).

Keys come from the environment, never from the repository:

    EOB_AT_REST_KEYS="k2026b:<base64 of 32 bytes>,k2026a:<base64 of 32 bytes>"

The first key encrypts; every listed key decrypts, so a key is rotated by putting a new one
first, re-encrypting with `reencrypt` (or letting the files age out), then dropping the old one.
Without the variable a development keyring is used: `<data_dir>/keys/at_rest.keys` (one
`id:key` per line, same order rule), created with mode 0600 on first use. It lets the demo and
the tests run with no setup, it never leaves the data directory (which already holds the PHI it
protects), and a warning says it is in use; production sets the variable.

File format: MAGIC, one byte key-id length, the key id (ASCII), a 12-byte random nonce, then the
GCM ciphertext and tag. The header and a caller-given context (for a PDF, its statement id) are
authenticated data: a file moved under another statement's name, or a header edited to name
another key, fails to decrypt instead of decrypting to the wrong member's document.

Streaming format, for files too large to hold in memory (an insurer's drop can be gigabytes):
STREAM_MAGIC, the same key-id header, the plaintext chunk size (4 bytes, big-endian) and a
32-byte random salt, then the plaintext's fixed-size chunks, each sealed on its own with
AES-256-GCM (tag appended) under the file's own key, HKDF-SHA256 of the keyring key and the
salt, and the nonce chunk counter (11 bytes) || last-chunk flag (1 byte): the STREAM
construction with a per-file key, as age and Tink's streaming AEAD do. The per-file key keeps
nonces from ever repeating under one key however many files a key seals (the first format,
STREAM_MAGIC_V1, drew a 7-byte random nonce prefix per file under the keyring key itself: a
collision, which leaks plaintext and the authentication key, passed 2^-32 at about 6,000 files
per key; it is still read, and `rekey_stream` rewrites it in the current format). The header
and the context are every chunk's authenticated data. A chunk altered, moved, dropped or
reordered fails its tag; a file cut at a chunk boundary fails too, because its new last chunk
was not sealed as last. Readers get the plaintext chunk by chunk, each authenticated before it
is handed out; a truncation shows only at the end, so a consumer must not act on what it read
before the iterator finished.

The whole-file format draws a random 96-bit nonce per file under the keyring key, which stays
within NIST SP 800-38D's bound for random nonces (collision probability below 2^-32) up to
2^32 files per key: rotate a key long before then (millions of PDFs a year are about 2^23).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pipeline.errors import ConfigError, EobError

log = logging.getLogger(__name__)

MAGIC = b"EOBE\x01"
STREAM_MAGIC = b"EOBS\x02"
# The first streaming format (read for rekey_stream to convert, never written).
STREAM_MAGIC_V1 = b"EOBS\x01"
# Plaintext bytes per sealed chunk of a stream: memory per reader or writer is about two chunks.
STREAM_CHUNK = 1 << 20
ENV_VAR = "EOB_AT_REST_KEYS"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_STREAM_SALT_BYTES = 32
_STREAM_KEY_INFO = b"eob-delivery archive stream"
_STREAM_V1_PREFIX_BYTES = 7
# A reader refuses larger chunk sizes: a forged header must not make it allocate gigabytes.
_MAX_STREAM_CHUNK = 1 << 24
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class DecryptionError(EobError):
    """A file is not ours, was altered, or its key is not in the keyring (names the file)."""


@dataclass(frozen=True)
class Keyring:
    # Key id -> 32-byte key. Plain bytes so the keyring pickles to render worker processes.
    keys: Mapping[str, bytes]
    active_id: str

    def encrypt(self, data: bytes, context: str) -> bytes:
        header = _header(self.active_id)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(self.keys[self.active_id]).encrypt(nonce, data, header + context.encode())
        return header + nonce + sealed

    def decrypt(self, blob: bytes, context: str, *, source: str = "data") -> bytes:
        key_id, body_at = self._parse_header(blob, source)
        if len(blob) < body_at + _NONCE_BYTES + _TAG_BYTES:
            raise DecryptionError(f"{source}: truncated")
        header, body = blob[:body_at], blob[body_at:]
        try:
            return AESGCM(self.keys[key_id]).decrypt(
                body[:_NONCE_BYTES], body[_NONCE_BYTES:], header + context.encode()
            )
        except InvalidTag as err:
            raise DecryptionError(f"{source}: authentication failed (altered or moved)") from err

    def key_id_of(self, blob: bytes, *, source: str = "data") -> str:
        return self._parse_header(blob, source)[0]

    def _parse_header(self, blob: bytes, source: str, magic: bytes = MAGIC) -> tuple[str, int]:
        """The key id a header names (the keyring must hold it) and where the header ends."""
        if not blob.startswith(magic) or len(blob) < len(magic) + 1:
            raise DecryptionError(f"{source}: not an encrypted eob-delivery file")
        length = blob[len(magic)]
        start = len(magic) + 1
        key_id = blob[start : start + length].decode("ascii", errors="replace")
        if key_id not in self.keys:
            raise DecryptionError(f"{source}: encrypted with key {key_id!r}, not in the keyring")
        return key_id, start + length


def _header(key_id: str, magic: bytes = MAGIC) -> bytes:
    raw = key_id.encode("ascii")
    return magic + bytes([len(raw)]) + raw


def parse_keys(text: str, *, source: str) -> Keyring:
    """`id:base64key` entries separated by commas or newlines; the first is the active key."""
    keys: dict[str, bytes] = {}
    entries = [e.strip() for e in re.split(r"[,\n]", text) if e.strip() and not e.startswith("#")]
    for number, entry in enumerate(entries, start=1):
        key_id, _, encoded = entry.partition(":")
        where = f"{source}: key {number}"
        if not _KEY_ID.fullmatch(key_id):
            raise ConfigError(f"{where}: id must be 1-64 of A-Z a-z 0-9 . _ -")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error as err:
            raise ConfigError(f"{where} ({key_id}): not base64") from err
        if len(key) != 32:
            raise ConfigError(f"{where} ({key_id}): must be 32 bytes (AES-256)")
        if key_id in keys:
            raise ConfigError(f"{where}: id {key_id} listed twice")
        keys[key_id] = key
    if not keys:
        raise ConfigError(f"{source}: no keys")
    return Keyring(keys, next(iter(keys)))


def dev_keyring_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "at_rest.keys"


_warned_dev_keyrings: set[Path] = set()


def load_keyring(data_dir: Path, environ: Mapping[str, str] | None = None) -> Keyring:
    """The keyring from EOB_AT_REST_KEYS, else the data directory's development keyring."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR, "").strip():
        return parse_keys(environ[ENV_VAR], source=f"environment variable {ENV_VAR}")
    path = dev_keyring_path(data_dir)
    if not path.exists():
        add_dev_key(data_dir)
    if path not in _warned_dev_keyrings:  # once per process: every stage loads the keyring
        _warned_dev_keyrings.add(path)
        log.warning("at-rest encryption uses the development keyring in the data directory")
    return parse_keys(path.read_text(encoding="ascii"), source=str(path))


def new_key_line(key_id: str) -> str:
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def add_dev_key(data_dir: Path) -> str:
    """Put a fresh key first in the development keyring (creating it): rotation for the demo."""
    path = dev_keyring_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_id = "dev-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    old = path.read_text(encoding="ascii") if path.exists() else ""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(new_key_line(key_id) + "\n" + old)
    return key_id


def write_encrypted(path: Path, data: bytes, keyring: Keyring, context: str) -> None:
    write_atomically(path, keyring.encrypt(data, context))


def write_atomically(path: Path, data: bytes) -> None:
    with atomic_writer(path) as file:
        file.write(data)


@contextmanager
def atomic_writer(path: Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A file that replaces path when the block ends: a crash mid-write never leaves a truncated
    file for a reader. Durable: the file and then its directory entry are on disk (fsync)
    before the block's end returns, for a copy whose original is deleted next."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_decrypted(path: Path, keyring: Keyring, context: str) -> bytes:
    """The plaintext of an encrypted file, in memory only."""
    return keyring.decrypt(path.read_bytes(), context, source=path.name)


def reencrypt(path: Path, keyring: Keyring, context: str) -> bool:
    """Re-encrypt a file under the active key if another key sealed it; True if it did."""
    blob = path.read_bytes()
    if keyring.key_id_of(blob, source=path.name) == keyring.active_id:
        return False
    write_encrypted(path, keyring.decrypt(blob, context, source=path.name), keyring, context)
    return True


# Streams -------------------------------------------------------------------------------------


def encrypt_stream(
    plaintext: Iterable[bytes],
    target: BinaryIO,
    keyring: Keyring,
    context: str,
    *,
    chunk_size: int = STREAM_CHUNK,
) -> None:
    """Write plaintext (pieces of any size) to target in the streaming format, active key."""
    salt = secrets.token_bytes(_STREAM_SALT_BYTES)
    header = _header(keyring.active_id, STREAM_MAGIC) + chunk_size.to_bytes(4, "big") + salt
    stream = _Stream(
        keyring.active_id,
        chunk_size,
        True,
        header,
        _file_key(keyring.keys[keyring.active_id], salt),
    )
    authenticated = header + context.encode()
    target.write(header)
    chunks = _fixed_size(plaintext, chunk_size)
    chunk, counter = next(chunks, b""), 0
    while True:
        following = next(chunks, None)
        last = following is None
        target.write(stream.aead.encrypt(stream.nonce(counter, last), chunk, authenticated))
        if following is None:
            return
        chunk, counter = following, counter + 1


def decrypt_stream(
    source: BinaryIO, keyring: Keyring, context: str, *, name: str
) -> Iterator[bytes]:
    """The plaintext of a stream-format file (either format), chunk by chunk (see the module
    docstring)."""
    stream = _read_stream_header(source, keyring, name)
    authenticated = stream.header + context.encode()
    sealed_size = stream.chunk_size + _TAG_BYTES
    chunk, counter = source.read(sealed_size), 0
    while True:
        following = source.read(sealed_size)
        last = not following
        try:
            yield stream.aead.decrypt(stream.nonce(counter, last), chunk, authenticated)
        except InvalidTag as err:
            raise DecryptionError(
                f"{name}: authentication failed (altered, truncated or moved)"
            ) from err
        if last:
            return
        chunk, counter = following, counter + 1


def is_stream_encrypted(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(len(STREAM_MAGIC)) in (STREAM_MAGIC, STREAM_MAGIC_V1)


def encrypt_file(source: Path, target: Path, keyring: Keyring, context: str) -> None:
    """Encrypt source into target (replaced atomically) in bounded memory. When this returns,
    target and its directory entry are on disk (fsync): the caller may delete source."""
    with source.open("rb") as plain, atomic_writer(target, durable=True) as sealed:
        encrypt_stream(iter(lambda: plain.read(STREAM_CHUNK), b""), sealed, keyring, context)


def read_decrypted_stream(path: Path, keyring: Keyring, context: str) -> Iterator[bytes]:
    with path.open("rb") as source:
        yield from decrypt_stream(source, keyring, context, name=path.name)


def rekey_stream(path: Path, keyring: Keyring, context: str) -> bool:
    """Re-encrypt a stream-format file under the active key if another key sealed it or it is
    in the first format, or encrypt it if it is a plaintext file from before encryption at
    rest; True if it did."""
    if not is_stream_encrypted(path):
        encrypt_file(path, path, keyring, context)
        return True
    with path.open("rb") as source:
        stream = _read_stream_header(source, keyring, path.name)
        if stream.current and stream.key_id == keyring.active_id:
            return False
        source.seek(0)
        with atomic_writer(path, durable=True) as target:
            plaintext = decrypt_stream(source, keyring, context, name=path.name)
            encrypt_stream(plaintext, target, keyring, context)
    return True


@dataclass(frozen=True)
class _Stream:
    """What a stream's header says, and the cipher and nonces its chunks are sealed with."""

    key_id: str
    chunk_size: int
    # The current format (per-file key); else the first one, to be read and converted only.
    current: bool
    # The header's bytes: authenticated with every chunk.
    header: bytes
    aead: AESGCM
    # The first format's random nonce prefix; the current format has none.
    nonce_prefix: bytes = b""

    def nonce(self, counter: int, last: bool) -> bytes:
        # to_bytes raises past the counter's range (2**32 chunks in the first format, 4 PiB at
        # the default size) instead of reusing a nonce.
        counter_bytes = 11 if self.current else 4
        flag = b"\x01" if last else b"\x00"
        return self.nonce_prefix + counter.to_bytes(counter_bytes, "big") + flag


def _file_key(keyring_key: bytes, salt: bytes) -> AESGCM:
    """The cipher under one file's own key, derived from the keyring's key and its salt."""
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, _STREAM_KEY_INFO).derive(keyring_key))


def _read_stream_header(source: BinaryIO, keyring: Keyring, name: str) -> _Stream:
    start = source.read(len(STREAM_MAGIC) + 1)
    magic = start[: len(STREAM_MAGIC)]
    if magic not in (STREAM_MAGIC, STREAM_MAGIC_V1) or len(start) <= len(STREAM_MAGIC):
        raise DecryptionError(f"{name}: not an encrypted eob-delivery file")
    head = start + source.read(start[-1])
    key_id, end = keyring._parse_header(head, name, magic)
    current = magic == STREAM_MAGIC
    tail_size = 4 + (_STREAM_SALT_BYTES if current else _STREAM_V1_PREFIX_BYTES)
    rest = source.read(tail_size)
    if len(rest) < tail_size:
        raise DecryptionError(f"{name}: truncated")
    chunk_size = int.from_bytes(rest[:4], "big")
    if not 0 < chunk_size <= _MAX_STREAM_CHUNK:
        raise DecryptionError(f"{name}: chunk size out of range")
    header = head[:end] + rest
    if current:
        return _Stream(key_id, chunk_size, True, header, _file_key(keyring.keys[key_id], rest[4:]))
    return _Stream(key_id, chunk_size, False, header, AESGCM(keyring.keys[key_id]), rest[4:])


def _fixed_size(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Pieces regrouped into chunks of exactly size bytes, the last one shorter (never empty)."""
    buffer = bytearray()
    for piece in pieces:
        if not buffer and len(piece) == size:
            yield piece  # a file read in chunk-sized pieces is passed through uncopied
            continue
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


__all__ = [
    "DecryptionError",
    "Keyring",
    "add_dev_key",
    "atomic_writer",
    "decrypt_stream",
    "encrypt_file",
    "encrypt_stream",
    "is_stream_encrypted",
    "load_keyring",
    "parse_keys",
    "read_decrypted",
    "read_decrypted_stream",
    "reencrypt",
    "rekey_stream",
    "write_atomically",
    "write_encrypted",
]
