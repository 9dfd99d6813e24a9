"""The drop protocol: which files in landing/<insurer>/ are complete, and their archive.

A file is complete when its insurer's profile says so: under "rename" every file that does
not carry a temporary name; under "marker" only files with a `<name>.ready` beside them.
Processed files (and their markers) move to archive/<insurer>/<date>/: never deleted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pipeline.profiles import InsurerProfile, load_profile

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


def archive(dropped: DroppedFile, archive_dir: Path, day: date) -> Path:
    """Move the file (and its marker) to archive/<insurer>/<day>/<sha12>-<name>."""
    target_dir = archive_dir / dropped.insurer / day.isoformat()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{dropped.sha256[:12]}-{dropped.path.name}"
    dropped.path.replace(target)
    marker = dropped.path.with_name(dropped.path.name + MARKER)
    if marker.exists():
        marker.replace(target.with_name(target.name + MARKER))
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
