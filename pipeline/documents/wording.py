"""The document's words and brand: wording from templates/eob_document.<language>.toml (the
member's language when it exists, else English), logo, colours and contact details from
templates/branding.toml, and money and dates as the document writes them. Each file is read
and checked once per process, so a broken template fails before the batch.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, fields
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from reportlab.lib import colors

from pipeline.documents.templates import check_language, document_language, read_toml
from pipeline.documents.textlayout import parse_markup
from pipeline.errors import ConfigError
from pipeline.resources import TEMPLATES_DIR


@dataclass(frozen=True)
class Wording:
    """Every piece of text on the document, in one language (see the TOML for each key)."""

    language_tag: str
    date_format: str
    title: str
    not_a_bill: str
    member_name: str
    address_last_line: str
    statement_id: str
    period: str
    summary: str
    summary_note: str
    claims_heading: str
    column_service_date: str
    column_provider: str
    column_service: str
    column_billed: str
    column_allowed: str
    column_plan_paid: str
    column_you_may_owe: str
    service_line: str
    generic_service: str
    totals_label: str
    status_adjusted: str
    status_denied: str
    status_reversed: str
    status_voided: str
    share_deductible: str
    share_copay: str
    share_coinsurance: str
    share_not_covered: str
    share_discount: str
    line_codes: str
    accumulators_heading: str
    accumulator_deductible: str
    accumulator_out_of_pocket: str
    codes_heading: str
    code_explanation: str
    appeal_heading: str
    appeal_rights: str
    contact_heading: str
    contact: str
    appeal_address: str
    nondiscrimination_heading: str
    nondiscrimination: str
    taglines_heading: str
    taglines: str
    continued_header: str
    footer: str


# Placeholders each key may use; keys not listed take none. Checked at load time so that a
# typo in a translation fails once, before the batch, not as a KeyError on every statement.
_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "member_name": frozenset({"first_name", "last_name"}),
    "address_last_line": frozenset({"city", "state", "postal_code"}),
    "statement_id": frozenset({"statement_id"}),
    "period": frozenset({"start", "end"}),
    "summary": frozenset({"amount"}),
    "service_line": frozenset({"code", "description"}),
    "contact": frozenset({"plan_name", "phone", "website"}),
    "appeal_address": frozenset({"appeals_address"}),
    "nondiscrimination": frozenset({"plan_name", "phone"}),
    "taglines": frozenset({"phone"}),
    "share_deductible": frozenset({"amount"}),
    "share_copay": frozenset({"amount"}),
    "share_coinsurance": frozenset({"amount"}),
    "share_not_covered": frozenset({"amount"}),
    "share_discount": frozenset({"amount"}),
    "line_codes": frozenset({"codes"}),
    "accumulator_deductible": frozenset({"met", "limit", "remaining"}),
    "accumulator_out_of_pocket": frozenset({"met", "limit", "remaining"}),
    "code_explanation": frozenset({"code", "explanation"}),
    "continued_header": frozenset({"plan_name", "title"}),
    "footer": frozenset({"page", "pages"}),
}
_WORDING_KEYS = frozenset(f.name for f in fields(Wording))
# Keys drawn as they are; every other key may use the markup of textlayout.py (<b>, <i>).
_PLAIN_KEYS = frozenset({
    "language_tag", "date_format", "title", "member_name", "address_last_line", "statement_id",
    "period", "continued_header", "footer",
})  # fmt: skip


@functools.cache
def load_wording(language: str = "en") -> Wording:
    """The wording of templates/eob_document.<language>.toml, read and checked once per process."""
    check_language(language)
    path = TEMPLATES_DIR / f"eob_document.{language}.toml"
    data = read_toml(path)
    missing = sorted(_WORDING_KEYS - data.keys())
    unknown = sorted(data.keys() - _WORDING_KEYS)
    if missing or unknown:
        raise ConfigError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: key {key}: expected a string")
        allowed = _PLACEHOLDERS.get(key, frozenset())
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as err:
            raise ConfigError(f"{path}: key {key}: {err}") from err
        if not used <= allowed:
            raise ConfigError(f"{path}: key {key}: unknown placeholders {sorted(used - allowed)}")
        if key not in _PLAIN_KEYS:
            try:
                parse_markup(value)
            except ValueError as err:
                raise ConfigError(f"{path}: key {key}: {err}") from err
    return Wording(**data)


def wording_for(preference: str | None) -> Wording:
    """The wording in the member's preferred language, English when there is none in it."""
    return load_wording(document_language(preference))


@dataclass(frozen=True)
class Branding:
    logo: Path
    primary_color: str
    pale_color: str
    member_services_phone: str
    website: str
    appeals_address: str


@functools.cache
def load_branding() -> Branding:
    path = TEMPLATES_DIR / "branding.toml"
    raw = read_toml(path)
    try:
        branding = Branding(**{**raw, "logo": TEMPLATES_DIR / raw["logo"]})
    except (TypeError, KeyError) as err:
        raise ConfigError(f"{path}: expected keys {[f.name for f in fields(Branding)]}") from err
    for key in ("primary_color", "pale_color"):
        try:
            colors.HexColor(getattr(branding, key))
        except ValueError as err:
            raise ConfigError(f"{path}: key {key}: not a #RRGGBB colour") from err
    if not branding.logo.is_file():
        raise ConfigError(f"{path}: key logo: no file {branding.logo.name} in {TEMPLATES_DIR}")
    return branding


def format_money(amount: Decimal) -> str:
    """$1,234.56; a negative amount (a reversal) as -$1,234.56."""
    cents = amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents):,.2f}"


def format_date(value: date, wording: Wording) -> str:
    return value.strftime(wording.date_format)


__all__ = [
    "Branding",
    "Wording",
    "format_date",
    "format_money",
    "load_branding",
    "load_wording",
    "wording_for",
]
