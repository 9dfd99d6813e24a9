"""Access to untrusted FHIR JSON: every accessor tolerates a missing or mistyped element, and
values come out in the claim-line contract's textual form (dates YYYY-MM-DD, money "123.45")."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

Resource = dict[str, Any]
Code = tuple[str, str]


def as_object(value: object) -> Resource:
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def codings(concept: Resource) -> list[Resource]:
    return [as_object(c) for c in as_list(concept.get("coding"))]


def coding_keys(concept: Resource) -> list[Code]:
    return [
        (c["system"], c["code"])
        for c in codings(concept)
        if isinstance(c.get("system"), str) and isinstance(c.get("code"), str)
    ]


def type_codes(identifier: Resource) -> set[str]:
    return type_codes_of([identifier.get("type")])


def type_codes_of(concepts: list[Any]) -> set[str]:
    return {
        c["code"]
        for concept in concepts
        for c in codings(as_object(concept))
        if as_str(c.get("code"))
    }


def as_text(value: object) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | Decimal):
        return str(value)
    return as_str(value)


def as_date(value: object) -> str | None:
    text = as_str(value)
    # A dateTime keeps its date as written; partial dates go on for ingest to refuse.
    return text.split("T", 1)[0] if text else None


def as_decimal(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    return None


def as_money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    try:
        cents = value.quantize(Decimal("0.01"))
    except InvalidOperation:  # too many digits for two decimals
        return format(value, "f")
    # More than two decimals is not rounded away: ingest refuses the row.
    return f"{cents:.2f}" if cents == value else format(value, "f")
