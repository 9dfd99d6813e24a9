"""Statements stage: claim lines grouped per member, optional extract columns read when present."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from pipeline.documents.statements import Accumulator, LineStatus, build_statements
from pipeline.errors import InputError
from pipeline.records.contracts import MONEY, load_contract


def row(member: str, claim: str | None, line: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "member_id": member, "first_name": "Ana", "last_name": "Pérez",
        "date_of_birth": date(1980, 3, 4), "address_line": "1 Main St", "city": "Austin",
        "state": "TX", "postal_code": "78701", "email": None, "claim_id": claim,
        "line_number": line, "service_date": date(2026, 10, line),
        "adjudication_date": date(2026, 11, 1), "provider_name": "Valley Clinic",
        "provider_npi": "1234567893", "procedure_code": "99213", "service_description": None,
        "billed_amount": Decimal("100.00"), "allowed_amount": Decimal("80.00"),
        "plan_paid": Decimal("60.00"), "member_responsibility": Decimal("20.00"),
    }  # fmt: skip
    base.update(extra)
    return base


def table(
    rows: list[dict[str, Any]], extra_types: dict[str, pa.DataType] | None = None
) -> pa.Table:
    schema = load_contract("claim_line").schema
    for name, kind in (extra_types or {}).items():
        if schema.get_field_index(name) < 0:  # the roster's columns join the contract's
            schema = schema.append(pa.field(name, kind))
    # A roster-only member has no claim: the extract leaves the claim columns empty.
    schema = schema.set(schema.get_field_index("claim_id"), pa.field("claim_id", pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)


def test_an_extract_without_the_optional_columns_still_makes_statements() -> None:
    statements = list(build_statements(table([row("M2", "C1", 1), row("M1", "C2", 2)]),
                                       file_sha256="f"))  # fmt: skip

    assert [s.member.member_id for s in statements] == ["M1", "M2"]
    first = statements[0]
    assert first.member.language == "en"
    assert first.lines[0].status == LineStatus.PAID
    assert first.lines[0].adjustment_codes == () and first.lines[0].deductible is None
    assert first.deductible is None and first.out_of_pocket is None


def test_member_without_claims_in_the_period_gets_no_statement() -> None:
    claims = table([row("M1", None, 1), row("M2", "C1", 1)])
    assert [s.member.member_id for s in build_statements(claims, file_sha256="f")] == ["M2"]
    assert list(build_statements(table([]), file_sha256="f")) == []


OPTIONAL_TYPES = {
    "language": pa.string(), "claim_status": pa.string(), "adjustment_codes": pa.string(),
    "deductible_amount": MONEY, "copay_amount": MONEY, "coinsurance_amount": MONEY,
    "noncovered_amount": MONEY, "deductible_limit": MONEY, "deductible_met": MONEY,
    "out_of_pocket_limit": MONEY, "out_of_pocket_met": MONEY,
}  # fmt: skip


def test_optional_columns_fill_status_shares_codes_language_and_accumulators() -> None:
    rows = [
        row("M1", "C1", 1, language="ES", claim_status="Denied",
            adjustment_codes=" co-197; N130 ;", noncovered_amount=Decimal("20.00"),
            deductible_limit=Decimal("1500.00"), out_of_pocket_limit=Decimal("6000.00"),
            out_of_pocket_met=Decimal("900.00")),
        row("M1", "C2", 2, claim_status="reversed", deductible_amount=Decimal("20.00"),
            adjustment_codes="CR-129;CO-197"),
    ]  # fmt: skip

    (statement,) = build_statements(table(rows, OPTIONAL_TYPES), file_sha256="f")

    assert statement.member.language == "es"
    assert [line.status for line in statement.lines] == [LineStatus.DENIED, LineStatus.REVERSED]
    assert statement.lines[0].adjustment_codes == ("CO-197", "N130")
    assert statement.adjustment_codes == ("CO-197", "N130", "CR-129")
    assert statement.lines[0].not_covered == Decimal("20.00")
    # Deductible met is not in the extract: computed from the lines (20.00 applied).
    assert statement.deductible == Accumulator(Decimal("1500.00"), Decimal("20.00"))
    assert statement.out_of_pocket == Accumulator(Decimal("6000.00"), Decimal("900.00"))
    assert statement.out_of_pocket.remaining == Decimal("5100.00")
    assert Accumulator(Decimal("100"), Decimal("250")).remaining == Decimal("0.00")


def test_unknown_claim_status_is_an_error_naming_the_field_not_the_value() -> None:
    rows = [row("M1", "C1", 3, claim_status="Pérez-secret")]
    with pytest.raises(InputError, match="claim_status of claim line 3") as caught:
        list(build_statements(table(rows, {"claim_status": pa.string()}), file_sha256="f"))
    assert "Pérez" not in str(caught.value)
