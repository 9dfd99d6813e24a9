"""Plain-language explanations of claim adjustment codes (CARC with group code, and RARC).

The mapping is bundled in templates/adjustment_codes.<language>.toml. Every code gets an
explanation: one not in the mapping gets the generic explanation of its kind, so a code is
never dropped from a member's statement.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from pipeline.documents.templates import check_language, read_toml
from pipeline.errors import ConfigError
from pipeline.resources import TEMPLATES_DIR

# "CO-45", "PR 1", "CO45", "45": group code (optional) and CARC number (alphanumeric: "A1", "P6").
_CARC = re.compile(r"(?:(?P<group>CO|PR|OA|PI|CR)[-\s]?)?(?P<reason>[A-Z]?\d{1,3})")
# RARC: M, N or MA followed by a number ("N130", "MA130", "M15").
_RARC = re.compile(r"(?:MA|M|N)\d{1,4}")


@dataclass(frozen=True)
class CodeBook:
    groups: dict[str, str]
    carc: dict[str, str]
    rarc: dict[str, str]
    generic_carc: str
    generic_rarc: str

    def explain(self, code: str) -> str:
        code = code.strip().upper()
        if _RARC.fullmatch(code):
            return self.rarc.get(code, self.generic_rarc)
        match = _CARC.fullmatch(code)
        if match is None:
            # Not shaped like either kind: still shown, with the generic explanation.
            return self.generic_carc
        reason = self.carc.get(match["reason"].lstrip("0") or "0", self.generic_carc)
        group = self.groups.get(match["group"] or "", "")
        return f"{reason} {group}".strip()


@functools.cache
def load_code_book(language: str = "en") -> CodeBook:
    check_language(language)
    path = TEMPLATES_DIR / f"adjustment_codes.{language}.toml"
    raw = read_toml(path)
    try:
        return CodeBook(
            groups={str(k): str(v) for k, v in raw["group"].items()},
            carc={str(k): str(v) for k, v in raw["carc"].items()},
            rarc={str(k).upper(): str(v) for k, v in raw["rarc"].items()},
            generic_carc=str(raw["generic_carc"]),
            generic_rarc=str(raw["generic_rarc"]),
        )
    except (KeyError, AttributeError) as err:
        raise ConfigError(f"{path}: missing or malformed table {err}") from err


__all__ = ["CodeBook", "load_code_book"]
