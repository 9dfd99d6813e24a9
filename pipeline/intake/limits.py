"""Bounds on what reading a dropped file may cost, so a hostile or broken file is refused early
instead of exhausting memory: a 1 MB gzip file can inflate to 1 GiB, a JSON document is parsed
whole into Python objects (several times its size).

`open_input` gives a file's bytes, gunzipped when they start with the gzip magic number, and
refuses the file (FileRejected) once the inflated bytes pass the profile's limit; every reader
of dropped files goes through it.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import FileRejected

MIB = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
# Below this a file may inflate by any ratio: a small, repetitive extract compresses well.
RATIO_FLOOR_BYTES = 8 * MIB


@dataclass(frozen=True)
class ReadLimits:
    # A gzip file may inflate to this many times its own size (at least RATIO_FLOOR_BYTES) ...
    max_gzip_ratio: float = 20.0
    # ... and never to more than this.
    max_inflated_mib: int = 16 * 1024
    # The largest JSON text parsed whole: a Bundle or single resource, or one NDJSON line.
    max_json_mib: int = 64

    def inflated_limit(self, compressed_bytes: int) -> int:
        by_ratio = max(int(self.max_gzip_ratio * compressed_bytes), RATIO_FLOOR_BYTES)
        return min(by_ratio, self.max_inflated_mib * MIB)


DEFAULT_LIMITS = ReadLimits()


def is_gzip(path: Path) -> bool:
    with path.open("rb") as stream:
        return stream.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC


def open_input(path: Path, limits: ReadLimits) -> BinaryIO:
    """The file's bytes, gunzipped when it is gzip data, within `limits`."""
    if not is_gzip(path):
        return path.open("rb")
    limit = limits.inflated_limit(path.stat().st_size)
    return io.BufferedReader(_Inflated(gzip.open(path, "rb"), limit, path.name))


class _Inflated(io.RawIOBase):
    """Gunzipped bytes, counted: past `limit` the file is refused."""

    def __init__(self, inner: gzip.GzipFile, limit: int, file_name: str) -> None:
        super().__init__()
        self._inner, self._limit, self._file_name = inner, limit, file_name
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self._inner.readinto(buffer)
        self._count += count
        if self._count > self._limit:
            raise FileRejected(
                self._file_name,
                f"gzip data inflates to more than {self._limit // MIB} MiB (the limit:"
                " max_gzip_ratio times the file's size, at most max_inflated_mib)",
            )
        return count

    def close(self) -> None:
        self._inner.close()
        super().close()
