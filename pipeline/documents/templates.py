"""Where the document's wording and branding live, and which languages they come in."""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.resources import TEMPLATES_DIR

DEFAULT_LANGUAGE = "en"
# A language is a file-name part: refuse anything that could walk out of the templates dir.
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def read_toml(path: Path) -> dict[str, Any]:
    """A template file's content; a missing or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"reading {path}: {err}") from err


def check_language(language: str) -> None:
    if not _LANGUAGE.fullmatch(language):
        raise ConfigError(f"wording language {language!r}: not a language code")


@cache
def _document_languages() -> frozenset[str]:
    """The languages the document has wording in: templates/eob_document.<language>.toml.
    Read once: it is asked for every statement, at the statements and render stages."""
    names = (
        p.name.removeprefix("eob_document.").removesuffix(".toml")
        for p in TEMPLATES_DIR.glob("eob_document.*.toml")
    )
    return frozenset(name for name in names if _LANGUAGE.fullmatch(name))


def document_language(preference: str | None) -> str:
    """The member's preferred language if the document has wording in it, else English."""
    tag = (preference or "").strip().lower()
    return tag if tag in _document_languages() else DEFAULT_LANGUAGE
