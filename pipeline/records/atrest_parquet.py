"""Encryption at rest for the pipeline's parquet intermediates (parsed, accepted and quarantine
files of each input file, and each insurer's roster): Parquet Modular Encryption, so readers
keep column projection, row-group filters and batch streaming.

Every page and the footer are AES-256-GCM encrypted (AES_GCM_V1, encrypted footer: without the
key not even the schema or the row count can be read). Parquet makes a random data key per
file; the keyring's active key (atrest.py) wraps it with AES-256-GCM in the keyring's own
format, whose authenticated header names the key id. The wrapped key and the key id sit in the
file's footer key metadata (internal key material: no side files), so a file names the key it
needs. Wrapping is single (the data key directly under the master key): our "KMS" is the
in-process keyring, so the key-encryption-key layer that double wrapping adds to spare a
remote KMS round trips would only add a second key to manage.

Rotation rewrites the file under the active key (`rekey`): the key material is inside the
encrypted footer, so it cannot be re-wrapped in place. Intermediates are per-run working data,
so a streaming rewrite is cheap next to the stages that made them.

Every reader and writer of these files goes through `open_reader`/`open_writer` (or the
table helpers on top of them); nothing else holds crypto configuration.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from pipeline.records.atrest import DecryptionError, Keyring

# The data key is wrapped under this authenticated context: a PDF's sealed bytes are never
# accepted as a wrapped parquet key, nor the other way round.
_WRAP_CONTEXT = "parquet-data-key"
# The first bytes of a parquet file: "PARE" when the footer is encrypted (how we write),
# "PAR1" when it is plaintext (a file written before encryption at rest).
_ENCRYPTED_MAGIC = b"PARE"


class _KeyringKms(pe.KmsClient):  # type: ignore[misc]  # pyarrow's Cython classes are untyped
    """Wraps and unwraps parquet data keys with the keyring; records the key ids it unwraps with."""

    def __init__(self, keyring: Keyring) -> None:
        super().__init__()
        self._keyring = keyring
        self.unwrapped_with: list[str] = []

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        # The identifier is the active key's id (open_writer's footer key): the keyring
        # encrypts under its active key and writes that id into the sealed key's header.
        return base64.b64encode(self._keyring.encrypt(key_bytes, _WRAP_CONTEXT)).decode("ascii")

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        try:
            sealed = base64.b64decode(wrapped_key, validate=True)
        except binascii.Error as err:
            raise DecryptionError("data key: not base64") from err
        # The sealed key's own (authenticated) header names the key; the footer's JSON copy
        # is only a hint and is not trusted.
        key_id = self._keyring.key_id_of(sealed, source="data key")
        key = self._keyring.decrypt(sealed, _WRAP_CONTEXT, source="data key")
        self.unwrapped_with.append(key_id)
        return key


def _connection() -> pe.KmsConnectionConfig:
    return pe.KmsConnectionConfig(kms_instance_id="eob-delivery-keyring")


def _factory(kms: _KeyringKms) -> pe.CryptoFactory:
    # A factory per keyring: pyarrow caches KMS clients per factory, and a cached client of an
    # older keyring must never serve a newer one.
    return pe.CryptoFactory(lambda _config: kms)


def open_writer(path: Path, schema: pa.Schema, keyring: Keyring) -> pq.ParquetWriter:
    """A parquet writer whose file is encrypted under the keyring's active key."""
    config = pe.EncryptionConfiguration(
        footer_key=keyring.active_id,
        uniform_encryption=True,
        encryption_algorithm="AES_GCM_V1",
        plaintext_footer=False,
        double_wrapping=False,
        internal_key_material=True,
        data_key_length_bits=256,
    )
    properties = _factory(_KeyringKms(keyring)).file_encryption_properties(_connection(), config)
    return pq.ParquetWriter(path, schema, encryption_properties=properties)


def open_reader(path: Path, keyring: Keyring) -> pq.ParquetFile:
    """An encrypted parquet file opened for reading (metadata, projection, batches)."""
    return _open(path, _KeyringKms(keyring))


def write_table(table: pa.Table, path: Path, keyring: Keyring) -> None:
    with open_writer(path, table.schema, keyring) as writer:
        writer.write_table(table)


def read_table(
    path: Path,
    keyring: Keyring,
    *,
    columns: list[str] | None = None,
    filters: pc.Expression | None = None,
) -> pa.Table:
    """The file's rows (only `columns`, only rows matching `filters`), decrypted in memory."""
    kms = _KeyringKms(keyring)
    _open(path, kms)  # fails with a clear error before Arrow's dataset reader would
    return pq.read_table(
        path,
        columns=columns,
        filters=filters,
        decryption_properties=_factory(kms).file_decryption_properties(_connection()),
    )


def key_id_of(path: Path, keyring: Keyring) -> str:
    """The id of the key that sealed an encrypted parquet file (the keyring must hold it)."""
    kms = _KeyringKms(keyring)
    _open(path, kms)
    return kms.unwrapped_with[0]


def rekey(path: Path, keyring: Keyring) -> bool:
    """Rewrite the file under the active key if another key sealed it, or if it is a plaintext
    intermediate from before encryption at rest; True if it did."""
    encrypted = _is_encrypted(path)
    if encrypted and key_id_of(path, keyring) == keyring.active_id:
        return False
    source = open_reader(path, keyring) if encrypted else pq.ParquetFile(path)
    tmp = path.with_name(f".{path.name}.rekey")
    try:
        with open_writer(tmp, source.schema_arrow, keyring) as writer:
            for batch in source.iter_batches():
                writer.write_batch(batch)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _open(path: Path, kms: _KeyringKms) -> pq.ParquetFile:
    if not _is_encrypted(path):
        raise DecryptionError(
            f"{path.name}: not encrypted (written before encryption at rest? run `eob rekey`)"
        )
    properties = _factory(kms).file_decryption_properties(_connection())
    try:
        return pq.ParquetFile(path, decryption_properties=properties)
    except DecryptionError as err:
        raise DecryptionError(f"{path.name}: {err}") from err
    except (OSError, pa.ArrowException) as err:
        # Arrow's message is not repeated: the file name and a fixed reason are enough.
        raise DecryptionError(f"{path.name}: unreadable encrypted parquet (altered?)") from err


def _is_encrypted(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(len(_ENCRYPTED_MAGIC)) == _ENCRYPTED_MAGIC


__all__ = ["key_id_of", "open_reader", "open_writer", "read_table", "rekey", "write_table"]
