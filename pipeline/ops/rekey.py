"""Key rotation over every PHI file at rest, and `eob decrypt`'s reader."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import Settings
from pipeline.documents.steps import encrypted_context
from pipeline.intake.drop import (
    archive_context,
    archived_drops,
)
from pipeline.records import atrest_parquet
from pipeline.records.atrest import (
    load_keyring,
    read_decrypted,
    read_decrypted_stream,
    reencrypt,
    rekey_stream,
)
from pipeline.returns import collect


def rekey(settings: Settings) -> dict[str, int]:
    """Re-encrypt every PHI file at rest under the active key (key rotation): every run's PDFs,
    print files and parquet intermediates, the rosters, the archived drops and the kept bounce
    reports. The old key can be retired once this reports nothing left under it. Files from
    before their class was encrypted (plaintext intermediates and drops, Fernet-sealed
    reports) are encrypted on the way."""
    keyring = load_keyring(settings.data_dir)
    counts = {"reencrypted": 0, "already_current": 0}
    for path in sorted(settings.runs_dir.glob("*/pdf/*.pdf")) + sorted(
        settings.runs_dir.glob("*/print/*")
    ):
        changed = reencrypt(path, keyring, encrypted_context(path))
        counts["reencrypted" if changed else "already_current"] += 1
    for path in sorted(settings.runs_dir.glob("*/files/*/*.parquet")) + sorted(
        settings.rosters_dir.glob("*.parquet")
    ):
        changed = atrest_parquet.rekey(path, keyring)
        counts["reencrypted" if changed else "already_current"] += 1
    for path in archived_drops(settings.archive_dir):
        changed = rekey_stream(path, keyring, archive_context(path, settings.archive_dir))
        counts["reencrypted" if changed else "already_current"] += 1
    reports = collect.Archive.in_data_dir(settings.data_dir, keyring)
    legacy_key = collect.legacy_fernet_key(settings.data_dir, os.environ)
    for name, count in reports.rekey(legacy_key).items():
        counts[name] += count
    return counts


def decrypted_file(settings: Settings, path: Path) -> Iterator[bytes]:
    """An encrypted file of the data directory decrypted, in pieces (for `eob decrypt` to a
    viewer's pipe): a run's PDF or print file, an archived drop or a kept bounce report."""
    keyring = load_keyring(settings.data_dir)
    archive_dir = settings.archive_dir.resolve()
    reports = collect.Archive.in_data_dir(settings.data_dir, keyring)
    if path.is_relative_to(archive_dir):
        yield from read_decrypted_stream(path, keyring, archive_context(path, archive_dir))
    elif path.parent == reports.directory.resolve():
        yield reports.read_file(path)
    else:
        yield read_decrypted(path, keyring, encrypted_context(path))
