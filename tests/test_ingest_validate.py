"""Ingest and validate: every row accepted or quarantined with file, row, field and rule."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import FileRejected
from pipeline.ingest import find_drop_files, parse_claim_lines
from pipeline.validate import validate_claim_lines
from tests.conftest import REPO

SAMPLE = REPO / "data_samples" / "landing" / "acme" / "claims_2026-10.csv"
HEADER = SAMPLE.read_text(encoding="utf-8").splitlines()[0].split(",")
GOOD = dict(zip(HEADER, next(csv.reader(io.StringIO(
    "A1,Ana,Pérez,1980-01-02,1 Main St,Fresno,CA,93720,ana@example.com,C1,1,2026-10-01,"
    "2026-10-09,Dr X,1234567893,99213,Office visit,120.00,80.00,60.00,20.00"
))), strict=True))  # fmt: skip


PAIRS = {
    "billed_at_least_allowed": "billed_amount,allowed_amount",
    "adjudicated_after_service": "adjudication_date,service_date",
}


def write(tmp_path: Path, rows: list[dict[str, str]], name: str = "claims.csv") -> Path:
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


def check(path: Path) -> tuple[int, list[dict[str, object]]]:
    parsed = parse_claim_lines(path)
    validated = validate_claim_lines(parsed.rows, file_name=path.name)
    reasons = parsed.quarantine.to_pylist() + validated.quarantine.to_pylist()
    assert parsed.rows_in == validated.accepted.num_rows + len({r["row_number"] for r in reasons})
    return validated.accepted.num_rows, reasons


def test_sample_drop_accounts_for_every_row():
    accepted, reasons = check(SAMPLE)
    assert accepted == 47
    assert {(r["field"], r["rule"]) for r in reasons} == {
        ("billed_amount", "amount_non_negative"),
        ("billed_amount,allowed_amount", "billed_at_least_allowed"),
        ("provider_npi", "npi_format"),
        ("service_date", "type_date"),
        ("plan_paid", "type_decimal"),
        ("*", "column_count"),
    }


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("billed_amount", "-1.00", "amount_non_negative"),
        ("billed_amount", "1.005", "type_decimal"),
        ("allowed_amount", "999.00", "billed_at_least_allowed"),
        ("service_date", "2026-02-30", "type_date"),
        ("adjudication_date", "2026-09-01", "adjudicated_after_service"),
        ("provider_npi", "123456789", "npi_format"),
        ("procedure_code", "ABC", "procedure_code_format"),
        ("postal_code", "9372", "postal_code_format"),
        ("email", "not-an-address", "email_syntax"),
        ("line_number", "one", "type_int32"),
        ("member_id", "", "required"),
    ],
)
def test_each_rule_quarantines_its_row_without_the_value(tmp_path, field, value, rule):
    path = write(tmp_path, [GOOD, {**GOOD, field: value, "claim_id": "C2"}])
    reported_field = PAIRS.get(rule, field)
    accepted, reasons = check(path)
    assert accepted == 1
    found = [(r["file_name"], r["row_number"], r["field"], r["rule"]) for r in reasons]
    assert ("claims.csv", 3, reported_field, rule) in found
    assert {r["row_number"] for r in reasons} == {3}
    if value:
        assert all(value not in str(r["message"]) for r in reasons)


def test_missing_column_rejects_the_file_naming_it(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("member_id,first_name\nA1,Ana\n", encoding="utf-8")
    with pytest.raises(
        FileRejected, match=r"short\.csv: rejected: missing required columns: claim_id, line_number"
    ):
        parse_claim_lines(path)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(FileRejected, match="empty.csv"):
        parse_claim_lines(path)


def test_drop_files_are_found_per_insurer_with_their_hash(tmp_path):
    (tmp_path / "acme").mkdir()
    write(tmp_path / "acme", [GOOD])
    (tmp_path / "acme" / ".claims.csv.part").write_text("partial")
    found = find_drop_files(tmp_path)
    assert [(f.insurer, f.path.name, len(f.sha256)) for f in found] == [("acme", "claims.csv", 64)]


def unbalance_quote(lines: list[bytes], i: int) -> list[bytes]:
    return lines[:i] + [b'"' + lines[i]] + lines[i + 1 :]


def mutations() -> st.SearchStrategy[bytes]:
    base = SAMPLE.read_bytes()
    lines = base.split(b"\n")
    return st.one_of(
        st.integers(0, len(base)).map(lambda n: base[:n]),  # truncated anywhere
        st.binary(max_size=400).map(lambda junk: base[:2000] + junk + base[2000:]),  # garbage
        st.just(b"\xef\xbb\xbf" + base),  # BOM
        st.just(base.replace(b"\n", b"\r\n")),  # CRLF
        st.just(base.decode().encode("utf-16")),  # wrong encoding
        st.integers(1, len(lines) - 1).map(lambda i: b"\n".join(unbalance_quote(lines, i))),
        st.just(b"\n".join(line + b",extra" for line in lines)),  # extra column
        st.just(lines[0] + b"\n" + b"x" * 200_000 + b"\n"),  # huge field
    )  # fmt: skip


@given(content=mutations())
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_mutated_files_are_rejected_cleanly_or_fully_accounted_for(tmp_path, content):
    path = tmp_path / "mutated.csv"
    path.write_bytes(content)
    try:
        accepted, reasons = check(path)
    except FileRejected as err:
        assert err.file_name == "mutated.csv" and err.reason
        return
    assert accepted >= 0
    assert all(r["file_name"] == "mutated.csv" and r["rule"] for r in reasons)


def test_quarantined_rows_keep_their_file_row_numbers(tmp_path):
    rows = [GOOD, {**GOOD, "billed_amount": "x"}, GOOD, {**GOOD, "provider_npi": "1"}]
    parsed = parse_claim_lines(write(tmp_path, rows))
    assert pc.max(parsed.rows["_row"]).as_py() == 5
    assert parsed.quarantine.column("row_number").to_pylist() == [3]


@pytest.mark.parametrize(
    "transform",
    [lambda b: b"\xef\xbb\xbf" + b, lambda b: b.replace(b"\n", b"\r\n")],
    ids=["bom", "crlf"],
)
def test_bom_and_crlf_files_read_like_the_original(tmp_path, transform):
    path = tmp_path / "variant.csv"
    path.write_bytes(transform(SAMPLE.read_bytes()))
    accepted, reasons = check(path)
    assert accepted == 47 and len({r["row_number"] for r in reasons}) == 6
