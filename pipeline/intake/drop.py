"""The drop protocol: which entries of landing/<insurer>/ are complete files, and their archive.

A file is complete when its insurer's profile says so: under "rename" every file that does
not carry a temporary name; under "marker" only files with a `<name>.ready` beside them.
Only regular files are read: a symbolic link (it could point anywhere, /etc/passwd included),
a directory, a fifo or a device is refused without being opened, and so is a file that cannot
be read; refused entries are set aside into landing/<insurer>/.refused/, which intake ignores.

Processed files (and their markers) go to archive/<insurer>/<date>/<sha12>-<name>: never
deleted. The archived copy is encrypted at rest in the streaming format (pipeline.records.atrest;
a drop can be gigabytes), bound to its place in the archive; the empty markers carry nothing and
stay as they are. Archiving is two steps around the ledger commit that records the copy
(`archive_copy`, then `remove_from_landing`): a crash in between leaves the file in landing,
to be processed again or, once committed, only removed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from pipeline.intake.names import stored
from pipeline.intake.profiles import InsurerProfile, load_profile
from pipeline.records.atrest import Keyring, encrypt_file

MARKER = ".ready"
REFUSED_DIR = ".refused"
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
    # (device, inode, size, mtime) when it was hashed: the file removed from landing after
    # its commit must still be this one, not a newer upload under the same name.
    identity: tuple[int, int, int, int]


@dataclass(frozen=True)
class RefusedEntry:
    """An entry of a landing folder that is not read: why, in words safe for a report."""

    path: Path
    insurer: str
    reason: str


@dataclass(frozen=True)
class Landing:
    files: list[DroppedFile]
    refused: list[RefusedEntry]


def scan_landing(drop: Path) -> Landing:
    """Complete files and refused entries of every insurer folder under `drop`, in insurer then
    name order."""
    files, refused = [], []
    for folder in sorted(p for p in drop.iterdir() if p.is_dir() and not p.name.startswith(".")):
        profile = load_profile(folder.name)
        for path in sorted(folder.iterdir()):
            if not is_complete(path, profile):
                continue
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                refused.append(RefusedEntry(path, folder.name, _kind_of_entry(mode)))
                continue
            try:
                identity = _identity(path)
                sha256 = file_sha256(path)
            except OSError as err:
                reason = f"unreadable ({type(err).__name__})"
                refused.append(RefusedEntry(path, folder.name, reason))
                continue
            if _identity(path) != identity:
                continue  # still being written: the next run takes it
            kind = profile.kind_of(path)
            files.append(DroppedFile(path, folder.name, kind, sha256, identity[2], identity))
    return Landing(files, refused)


def _kind_of_entry(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link, not a regular file: links are not followed"
    if stat.S_ISDIR(mode):
        return "a directory, not a regular file"
    return "a special file (fifo, socket or device), not a regular file"


def is_complete(path: Path, profile: InsurerProfile) -> bool:
    name = path.name.lower()
    if name.startswith((".", "~")) or name.endswith(_TEMPORARY_SUFFIXES):
        return False
    return profile.completion == "rename" or _marker(path) is not None


def _marker(path: Path) -> Path | None:
    marker = path.with_name(path.name + MARKER)
    try:
        return marker if marker.exists() else None
    except OSError:  # a name too long to carry the suffix has no marker
        return None


def set_aside(entry: RefusedEntry) -> Path:
    """Move a refused entry (a link moves as a link) into the folder's .refused/, under a
    time-stamped safe name."""
    target_dir = entry.path.parent / REFUSED_DIR
    target_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    target = target_dir / f"{stamp}-{stored(entry.path.name)}"
    entry.path.rename(target)
    return target


def archive_name(dropped: DroppedFile) -> str:
    return f"{dropped.sha256[:12]}-{stored(dropped.path.name)}"


def archive_copy(dropped: DroppedFile, archive_dir: Path, day: date, keyring: Keyring) -> Path:
    """Write the file, encrypted, to archive/<insurer>/<day>/<sha12>-<name>; the landing file
    stays until `remove_from_landing`, called once the ledger has recorded the copy."""
    target_dir = archive_dir / dropped.insurer / day.isoformat()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / archive_name(dropped)
    # The name stays the original's when it is plain (like an encrypted PDF's): `eob rekey`
    # encrypts archives from before this in place without touching the ledger.
    encrypt_file(dropped.path, target, keyring, archive_context(target, archive_dir))
    return target


def remove_from_landing(dropped: DroppedFile, archived: Path) -> None:
    """Finish the move into the archive: the landing file goes, its marker goes beside the copy.
    A file replaced since it was hashed (a new upload under the same name) stays for the next
    run."""
    try:
        if _identity(dropped.path) != dropped.identity:
            return
    except FileNotFoundError:
        pass
    dropped.path.unlink(missing_ok=True)
    marker = _marker(dropped.path)
    if marker is not None:
        marker.replace(archived.with_name(archived.name + MARKER))


def archive_context(path: Path, archive_dir: Path) -> str:
    """The authenticated context of an archived drop: its place under the archive, so a copy
    moved to another insurer or day does not decrypt there."""
    return "archive/" + path.relative_to(archive_dir).as_posix()


def archived_drops(archive_dir: Path) -> list[Path]:
    """Every archived drop (markers left out)."""
    return sorted(p for p in archive_dir.glob("*/*/*") if p.is_file() and p.suffix != MARKER)


def _identity(path: Path) -> tuple[int, int, int, int]:
    found = path.lstat()
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    # O_NOFOLLOW: a regular file swapped for a link after the check is not followed.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
