"""Statements stage: group accepted claim lines into one statement per member and file.

The statement id is a stable hash of the file's sha256 and the member id, so rebuilding the
statements of a file gives the same ids (idempotent) and the id itself reveals nothing.

The builder reads the columns of schemas/claim_line.json and tolerates the absence of the
optional ones (cost-sharing breakdown, status, adjustment codes, language, plan-year
accumulators): an older extract still makes a statement, just a less detailed one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from enum import StrEnum

import pyarrow as pa

from pipeline.errors import InputError

ZERO = Decimal("0.00")


class LineStatus(StrEnum):
    PAID = "paid"
    ADJUSTED = "adjusted"
    DENIED = "denied"
    # A reversal or void takes back an earlier line; its amounts are usually negative.
    REVERSED = "reversed"
    VOIDED = "voided"


@dataclass(frozen=True)
class Member:
    member_id: str
    first_name: str
    last_name: str
    address_line: str
    city: str
    state: str
    postal_code: str
    # None routes the statement to print.
    email: str | None
    date_of_birth: date | None = None
    # Preferred language (ISO 639-1); the render stage falls back to English when it has no
    # wording in that language.
    language: str = "en"
    # E-delivery consent from the roster join; None when the roster has no row for the member.
    # Only an explicit False routes the statement to print.
    edelivery_consent: bool | None = None


@dataclass(frozen=True)
class StatementLine:
    claim_id: str
    line_number: int
    service_date: date
    provider_name: str
    procedure_code: str
    service_description: str | None
    billed_amount: Decimal
    allowed_amount: Decimal
    plan_paid: Decimal
    member_responsibility: Decimal
    status: LineStatus = LineStatus.PAID
    # The parts of member_responsibility, when the extract breaks it down.
    deductible: Decimal | None = None
    copay: Decimal | None = None
    coinsurance: Decimal | None = None
    not_covered: Decimal | None = None
    # CARC with group code ("CO-45", "PR-1") or RARC ("N130"), in extract order.
    adjustment_codes: tuple[str, ...] = ()

    @property
    def discount(self) -> Decimal:
        """What the provider's contract takes off the bill: billed minus allowed."""
        return self.billed_amount - self.allowed_amount


@dataclass(frozen=True)
class Accumulator:
    """A plan-year limit (deductible or out-of-pocket maximum) and how much of it is met."""

    limit: Decimal
    met: Decimal

    @property
    def remaining(self) -> Decimal:
        return max(self.limit - self.met, ZERO)


@dataclass(frozen=True)
class Statement:
    statement_id: str
    member: Member
    period_start: date
    period_end: date
    # Ordered by service date, claim, line.
    lines: tuple[StatementLine, ...]
    deductible: Accumulator | None = None
    out_of_pocket: Accumulator | None = None

    @property
    def total_billed(self) -> Decimal:
        return sum((line.billed_amount for line in self.lines), ZERO)

    @property
    def total_allowed(self) -> Decimal:
        return sum((line.allowed_amount for line in self.lines), ZERO)

    @property
    def total_plan_paid(self) -> Decimal:
        return sum((line.plan_paid for line in self.lines), ZERO)

    @property
    def total_member_responsibility(self) -> Decimal:
        return sum((line.member_responsibility for line in self.lines), ZERO)

    @property
    def adjustment_codes(self) -> tuple[str, ...]:
        """Every code on the statement once, in order of first appearance."""
        return tuple(dict.fromkeys(code for line in self.lines for code in line.adjustment_codes))


def statement_id(file_sha256: str, member_id: str) -> str:
    return "s" + hashlib.sha256(f"{file_sha256}:{member_id}".encode()).hexdigest()[:24]


_MEMBER_FIELDS = [
    "member_id",
    "first_name",
    "last_name",
    "address_line",
    "city",
    "state",
    "postal_code",
    "email",
]
_LINE_FIELDS = [
    "claim_id",
    "line_number",
    "service_date",
    "provider_name",
    "procedure_code",
    "service_description",
    "billed_amount",
    "allowed_amount",
    "plan_paid",
    "member_responsibility",
]
# Optional extract column -> StatementLine field.
_OPTIONAL_AMOUNTS = {
    "deductible_amount": "deductible",
    "copay_amount": "copay",
    "coinsurance_amount": "coinsurance",
    "noncovered_amount": "not_covered",
}
# Plan-year accumulators as of the extract (per member; the first non-empty value is used).
_ACCUMULATOR_COLUMNS = (
    "deductible_limit",
    "deductible_met",
    "out_of_pocket_limit",
    "out_of_pocket_met",
)
_OPTIONAL = [
    "date_of_birth",
    "language",
    "edelivery_consent",
    "claim_status",
    "adjustment_codes",
    *_OPTIONAL_AMOUNTS,
    *_ACCUMULATOR_COLUMNS,
]


def build_statements(claims: pa.Table, *, file_sha256: str) -> Iterator[Statement]:
    """One statement per member with claim lines, in member id order.

    A row without a claim id (a roster-only member with no claims in the period) makes no
    statement: there is nothing to explain.
    """
    present = set(claims.column_names)
    ordered = claims.sort_by(
        [
            ("member_id", "ascending"),
            ("service_date", "ascending"),
            ("claim_id", "ascending"),
            ("line_number", "ascending"),
        ]
    )
    rows = ordered.select(_MEMBER_FIELDS + _LINE_FIELDS + [c for c in _OPTIONAL if c in present])
    current: list[dict[str, object]] = []
    for row in rows.to_pylist():
        if row["claim_id"] is None:
            continue
        if current and row["member_id"] != current[0]["member_id"]:
            yield _statement(current, file_sha256)
            current = []
        current.append(row)
    if current:
        yield _statement(current, file_sha256)


def _statement(rows: list[dict[str, object]], file_sha256: str) -> Statement:
    first = rows[0]
    # The member's contact columns repeat on every line; the first line's are used.
    member = Member(
        **{name: first[name] for name in _MEMBER_FIELDS},  # type: ignore[arg-type]
        date_of_birth=first.get("date_of_birth"),  # type: ignore[arg-type]
        language=str(first.get("language") or "en").strip().lower()[:2] or "en",
        edelivery_consent=first.get("edelivery_consent"),  # type: ignore[arg-type]
    )
    lines = tuple(_line(row) for row in rows)
    return Statement(
        statement_id=statement_id(file_sha256, member.member_id),
        member=member,
        period_start=min(line.service_date for line in lines),
        period_end=max(line.service_date for line in lines),
        lines=lines,
        # Met amounts missing from the extract are computed from this statement's lines: a
        # lower bound when earlier claims of the plan year were on earlier statements.
        deductible=_accumulator(
            rows, "deductible", sum((line.deductible or ZERO for line in lines), ZERO)
        ),
        out_of_pocket=_accumulator(
            rows,
            "out_of_pocket",
            sum((line.member_responsibility - (line.not_covered or ZERO) for line in lines), ZERO),
        ),
    )


def _line(row: dict[str, object]) -> StatementLine:
    try:
        status = LineStatus(str(row.get("claim_status") or "paid").strip().lower())
    except ValueError:
        # The message names the field and row, never the value (which could be anything).
        raise InputError(
            f"claim_status of claim line {row['line_number']}: not one of "
            f"{', '.join(s.value for s in LineStatus)}"
        ) from None
    codes = str(row.get("adjustment_codes") or "")
    return StatementLine(
        **{name: row[name] for name in _LINE_FIELDS},  # type: ignore[arg-type]
        status=status,
        **{field: row.get(column) for column, field in _OPTIONAL_AMOUNTS.items()},  # type: ignore[arg-type]
        adjustment_codes=tuple(c.strip().upper() for c in codes.split(";") if c.strip()),
    )


def _accumulator(rows: list[dict[str, object]], name: str, computed: Decimal) -> Accumulator | None:
    limit = next((r[f"{name}_limit"] for r in rows if r.get(f"{name}_limit") is not None), None)
    if limit is None:
        return None
    met = next((r[f"{name}_met"] for r in rows if r.get(f"{name}_met") is not None), computed)
    assert isinstance(limit, Decimal) and isinstance(met, Decimal)
    return Accumulator(limit=limit, met=met)
