"""Encryption at rest: AES-256-GCM for the PHI files the pipeline writes (PDFs, print batches;
the parquet intermediates use this keyring through pipeline.atrest_parquet).

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
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import ConfigError, EobError

log = logging.getLogger(__name__)

MAGIC = b"EOBE\x01"
ENV_VAR = "EOB_AT_REST_KEYS"
_NONCE_BYTES = 12
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
        header, body = blob[:body_at], blob[body_at:]
        try:
            return AESGCM(self.keys[key_id]).decrypt(
                body[:_NONCE_BYTES], body[_NONCE_BYTES:], header + context.encode()
            )
        except InvalidTag as err:
            raise DecryptionError(f"{source}: authentication failed (altered or moved)") from err

    def key_id_of(self, blob: bytes, *, source: str = "data") -> str:
        return self._parse_header(blob, source)[0]

    def _parse_header(self, blob: bytes, source: str) -> tuple[str, int]:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
            raise DecryptionError(f"{source}: not an encrypted eob-delivery file")
        length = blob[len(MAGIC)]
        start = len(MAGIC) + 1
        key_id = blob[start : start + length].decode("ascii", errors="replace")
        if key_id not in self.keys:
            raise DecryptionError(f"{source}: encrypted with key {key_id!r}, not in the keyring")
        if len(blob) < start + length + _NONCE_BYTES + 16:
            raise DecryptionError(f"{source}: truncated")
        return key_id, start + length


def _header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return MAGIC + bytes([len(raw)]) + raw


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


def load_keyring(data_dir: Path, environ: Mapping[str, str] | None = None) -> Keyring:
    """The keyring from EOB_AT_REST_KEYS, else the data directory's development keyring."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR, "").strip():
        return parse_keys(environ[ENV_VAR], source=f"environment variable {ENV_VAR}")
    path = dev_keyring_path(data_dir)
    if not path.exists():
        add_dev_key(data_dir)
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
    """Replace path with data: a crash mid-write never leaves a truncated file for a reader."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


__all__ = [
    "DecryptionError",
    "Keyring",
    "add_dev_key",
    "load_keyring",
    "parse_keys",
    "read_decrypted",
    "reencrypt",
    "write_atomically",
    "write_encrypted",
]
