"""The drop protocol: which files in landing/<insurer>/ are complete, and their archive.

A file is complete when its insurer's profile says so: under "rename" every file that does
not carry a temporary name; under "marker" only files with a `<name>.ready` beside them.
Processed files (and their markers) move to archive/<insurer>/<date>/: never deleted. The
archived copy is encrypted at rest in the streaming format (pipeline.records.atrest; a drop can be
gigabytes), bound to its place in the archive; the empty markers carry nothing and stay as
they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pipeline.intake.profiles import InsurerProfile, load_profile
from pipeline.records.atrest import Keyring, encrypt_file

MARKER = ".ready"
# Names an uploader uses while a file is still being written.
_TEMPORARY_SUFFIXES = (".part", ".tmp", ".partial", ".filepart", ".crdownload", MARKER)


@dataclass(frozen=True)
class DroppedFile:
    path: Path
    insurer: str
    # claims or roster
    kind: str
    sha256: str
    size_bytes: int


def complete_files(drop: Path) -> list[DroppedFile]:
    """Complete files of every insurer folder under `drop`, in insurer then name order."""
    found = []
    for folder in sorted(p for p in drop.iterdir() if p.is_dir() and not p.name.startswith(".")):
        profile = load_profile(folder.name)
        for path in sorted(folder.iterdir()):
            if path.is_file() and _is_complete(path, profile):
                found.append(
                    DroppedFile(
                        path,
                        folder.name,
                        profile.kind_of(path),
                        file_sha256(path),
                        path.stat().st_size,
                    )
                )
    return found


def _is_complete(path: Path, profile: InsurerProfile) -> bool:
    name = path.name.lower()
    if name.startswith((".", "~")) or name.endswith(_TEMPORARY_SUFFIXES):
        return False
    return profile.completion == "rename" or path.with_name(path.name + MARKER).exists()


def archive(dropped: DroppedFile, archive_dir: Path, day: date, keyring: Keyring) -> Path:
    """Move the file, encrypted, (and its marker) to archive/<insurer>/<day>/<sha12>-<name>."""
    target_dir = archive_dir / dropped.insurer / day.isoformat()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{dropped.sha256[:12]}-{dropped.path.name}"
    # The name stays the original's (like an encrypted PDF's): the ledger records it, and
    # `eob rekey` encrypts archives from before this in place without touching the ledger.
    encrypt_file(dropped.path, target, keyring, archive_context(target, archive_dir))
    dropped.path.unlink()
    marker = dropped.path.with_name(dropped.path.name + MARKER)
    if marker.exists():
        marker.replace(target.with_name(target.name + MARKER))
    return target


def archive_context(path: Path, archive_dir: Path) -> str:
    """The authenticated context of an archived drop: its place under the archive, so a copy
    moved to another insurer or day does not decrypt there."""
    return "archive/" + path.relative_to(archive_dir).as_posix()


def archived_drops(archive_dir: Path) -> list[Path]:
    """Every archived drop (markers left out)."""
    return sorted(p for p in archive_dir.glob("*/*/*") if p.is_file() and p.suffix != MARKER)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
