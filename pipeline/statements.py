"""Statements stage: group accepted claim lines into one statement per member and file.

The statement id is a stable hash of the file's sha256 and the member id, so rebuilding the
statements of a file gives the same ids (idempotent) and the id itself reveals nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import pyarrow as pa


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


@dataclass(frozen=True)
class Statement:
    statement_id: str
    member: Member
    period_start: date
    period_end: date
    # Ordered by service date, claim, line.
    lines: tuple[StatementLine, ...]

    @property
    def total_billed(self) -> Decimal:
        return sum((line.billed_amount for line in self.lines), Decimal("0.00"))

    @property
    def total_plan_paid(self) -> Decimal:
        return sum((line.plan_paid for line in self.lines), Decimal("0.00"))

    @property
    def total_member_responsibility(self) -> Decimal:
        return sum((line.member_responsibility for line in self.lines), Decimal("0.00"))


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
_LINE_FIELDS = list(StatementLine.__dataclass_fields__)


def build_statements(claims: pa.Table, *, file_sha256: str) -> Iterator[Statement]:
    """One statement per member of an accepted claim-line table, in member id order."""
    ordered = claims.sort_by(
        [
            ("member_id", "ascending"),
            ("service_date", "ascending"),
            ("claim_id", "ascending"),
            ("line_number", "ascending"),
        ]
    )
    rows = ordered.select(_MEMBER_FIELDS + [f for f in _LINE_FIELDS if f not in _MEMBER_FIELDS])
    current: list[dict[str, object]] = []
    for row in rows.to_pylist():
        if current and row["member_id"] != current[0]["member_id"]:
            yield _statement(current, file_sha256)
            current = []
        current.append(row)
    if current:
        yield _statement(current, file_sha256)


def _statement(rows: list[dict[str, object]], file_sha256: str) -> Statement:
    first = rows[0]
    # The member's contact columns repeat on every line; the first line's are used.
    member = Member(**{name: first[name] for name in _MEMBER_FIELDS})  # type: ignore[arg-type]
    lines = tuple(StatementLine(**{name: r[name] for name in _LINE_FIELDS}) for r in rows)  # type: ignore[arg-type]
    return Statement(
        statement_id=statement_id(file_sha256, member.member_id),
        member=member,
        period_start=min(line.service_date for line in lines),
        period_end=max(line.service_date for line in lines),
        lines=lines,
    )
