"""Insurer profiles: how each insurer's files are recognised and read, kept as data in
config/insurers/<insurer>.toml (documented in config/insurers/README.md)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.intake.limits import DEFAULT_LIMITS, ReadLimits
from pipeline.records.contracts import load_contract
from pipeline.resources import CONFIG_DIR

PROFILES_DIR = CONFIG_DIR / "insurers"
FORMATS = ("auto", "csv", "pipe", "parquet", "fhir")
COMPLETIONS = ("rename", "marker")
# Read-limit settings in MiB (pipeline.intake.limits.ReadLimits).
_SIZE_LIMITS = ("max_inflated_mib", "max_json_mib")


@dataclass(frozen=True)
class FileKindProfile:
    # csv, pipe, parquet, fhir, or auto (by suffix).
    format: str = "auto"
    # The insurer's column name -> the contract's field name.
    columns: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InsurerProfile:
    insurer: str
    # "rename" (temporary name, then rename) or "marker" (<name>.ready once complete).
    completion: str = "rename"
    # Above this share of bad rows the whole file is rejected.
    max_bad_row_share: float = 0.10
    # Files matching it are rosters; all others are claims.
    roster_pattern: str = "roster*"
    claims: FileKindProfile = FileKindProfile()
    roster: FileKindProfile = FileKindProfile()
    # What reading one of its files may cost (gzip inflation, JSON size).
    limits: ReadLimits = DEFAULT_LIMITS

    def kind_of(self, path: Path) -> str:
        return "roster" if path.match(self.roster_pattern) else "claims"

    def for_kind(self, kind: str) -> FileKindProfile:
        return self.roster if kind == "roster" else self.claims


def load_profile(insurer: str, directory: Path = PROFILES_DIR) -> InsurerProfile:
    path = directory / f"{insurer}.toml"
    if not path.exists():
        return InsurerProfile(insurer)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"reading {path}: {err}") from err
    where = f"{path.name}:"
    unknown = set(raw) - {
        "completion",
        "max_bad_row_share",
        "roster_pattern",
        "claims",
        "roster",
        "max_gzip_ratio",
        *_SIZE_LIMITS,
    }
    if unknown:
        raise ConfigError(f"{where} unknown setting {sorted(unknown)[0]!r}")
    completion = raw.get("completion", "rename")
    if completion not in COMPLETIONS:
        raise ConfigError(f"{where} completion must be one of {', '.join(COMPLETIONS)}")
    share = raw.get("max_bad_row_share", 0.10)
    if not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ConfigError(f"{where} max_bad_row_share must be a number from 0 to 1")
    return InsurerProfile(
        insurer=insurer,
        completion=completion,
        max_bad_row_share=float(share),
        roster_pattern=str(raw.get("roster_pattern", "roster*")),
        claims=_kind(raw.get("claims", {}), "claims", "claim_line", where),
        roster=_kind(raw.get("roster", {}), "roster", "roster", where),
        limits=_limits(raw, where),
    )


def _limits(raw: dict[str, Any], where: str) -> ReadLimits:
    ratio = raw.get("max_gzip_ratio", DEFAULT_LIMITS.max_gzip_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 1:
        raise ConfigError(f"{where} max_gzip_ratio must be a number of at least 1")
    sizes: dict[str, int] = {}
    for key in _SIZE_LIMITS:
        value = raw.get(key, getattr(DEFAULT_LIMITS, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where} {key} must be a whole number of MiB, at least 1")
        sizes[key] = value
    return ReadLimits(max_gzip_ratio=float(ratio), **sizes)


def _kind(raw: Any, key: str, contract_name: str, where: str) -> FileKindProfile:
    if not isinstance(raw, dict) or set(raw) - {"format", "columns"}:
        raise ConfigError(f"{where} [{key}] takes only format and columns")
    fmt = raw.get("format", "auto")
    if fmt not in FORMATS:
        raise ConfigError(f"{where} {key}.format must be one of {', '.join(FORMATS)}")
    columns = raw.get("columns", {})
    fields = set(load_contract(contract_name).column_names)
    for theirs, ours in columns.items():
        if ours not in fields:
            raise ConfigError(
                f"{where} {key}.columns.{theirs}: {ours!r} is not a {contract_name} field"
            )
    return FileKindProfile(fmt, dict(columns))
