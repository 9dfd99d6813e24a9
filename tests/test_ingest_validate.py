"""Ingest and validate: every row accepted or quarantined with file, row, field and rule."""

from __future__ import annotations

import csv
import gzip
import io
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline.intake.ingest
from pipeline.errors import FileRejected
from pipeline.intake.ingest import ingest_file
from pipeline.intake.validate import FileVerdict, validate_file
from pipeline.records.atrest_parquet import read_table
from pipeline.records.contracts import load_contract
from tests.conftest import REPO, TEST_KEYRING

SAMPLE = REPO / "data_samples" / "landing" / "acme" / "claims_2026-10.csv"
HEADER = SAMPLE.read_text(encoding="utf-8").splitlines()[0].split(",")
GOOD = dict(zip(HEADER, next(csv.reader(io.StringIO(
    "A1,Ana,Pérez,1980-01-02,1 Main St,Fresno,CA,93720,ana@example.com,C1,1,2026-10-01,"
    "2026-10-09,Dr X,1234567893,99213,Office visit,120.00,80.00,60.00,20.00"
))), strict=True))  # fmt: skip
RUN_DATE = date(2026, 11, 22)
PAIRS = {
    "billed_at_least_allowed": "billed_amount,allowed_amount",
    "adjudicated_after_service": "service_date,adjudication_date",
    "allowed_is_paid_plus_member": "allowed_amount,plan_paid,member_responsibility",
}


def write(folder: Path, rows: list[dict[str, str]], name: str = "claims.csv") -> Path:
    fields = list(dict.fromkeys(k for row in [GOOD, *rows] for k in row))
    path = folder / name
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def check(
    path: Path, *, fmt: str = "csv", columns: dict[str, str] | None = None,
    roster: pa.Table | None = None, share: float = 1.0, kind: str = "claims",
) -> tuple[FileVerdict, list[dict[str, object]]]:  # fmt: skip
    """Ingest then validate `path` as the runner does; return the verdict and its reasons."""
    out = path.parent / f"{path.name}.out"
    result = ingest_file(
        path, parsed_out=out / "parsed.parquet", quarantine_out=out / "pq.parquet", fmt=fmt,
        columns=columns or {}, keyring=TEST_KEYRING,
        contract=load_contract("roster" if kind == "roster" else "claim_line"),
    )  # fmt: skip
    verdict = validate_file(
        kind=kind, file_name=path.name, parsed=out / "parsed.parquet",
        parse_quarantine=out / "pq.parquet", accepted_out=out / "accepted.parquet",
        quarantine_out=out / "quarantine.parquet", rows_in=result.rows_in, run_date=RUN_DATE,
        roster=roster, max_bad_row_share=share, keyring=TEST_KEYRING,
    )  # fmt: skip
    assert verdict.rows_in == result.rows_in
    return verdict, read_table(out / "quarantine.parquet", TEST_KEYRING).to_pylist()


def accepted_rows(path: Path) -> list[dict[str, object]]:
    accepted = path.parent / f"{path.name}.out" / "accepted.parquet"
    return read_table(accepted, TEST_KEYRING).to_pylist()


def test_sample_drop_accounts_for_every_row(tmp_path):
    verdict, reasons = check(sample_copy(tmp_path))
    assert (verdict.rows_in, verdict.accepted, verdict.quarantined) == (53, 47, 6)
    assert {(r["field"], r["rule"]) for r in reasons} == {
        ("billed_amount", "amount_non_negative"),
        ("billed_amount,allowed_amount", "billed_at_least_allowed"),
        ("allowed_amount,plan_paid,member_responsibility", "allowed_is_paid_plus_member"),
        ("provider_npi", "npi_format"),
        ("service_date", "type_date"),
        ("plan_paid", "type_decimal"),
        ("*", "column_count"),
    }


def sample_copy(tmp_path: Path) -> Path:
    copy = tmp_path / SAMPLE.name
    copy.write_bytes(SAMPLE.read_bytes())
    return copy


@pytest.mark.parametrize(
    ("changes", "field", "rule"),
    [
        ({"billed_amount": "-1.00"}, "billed_amount", "amount_non_negative"),
        ({"billed_amount": "1.005"}, "billed_amount", "type_decimal"),
        ({"allowed_amount": "999.00"}, "billed_amount,allowed_amount", "billed_at_least_allowed"),
        ({"plan_paid": "10.00"}, PAIRS["allowed_is_paid_plus_member"],
         "allowed_is_paid_plus_member"),
        ({"deductible_amount": "5.00", "noncovered_amount": "5.00"}, "member_responsibility",
         "member_share_parts"),
        ({"service_date": "2026-02-30"}, "service_date", "type_date"),
        ({"adjudication_date": "2026-09-01"}, PAIRS["adjudicated_after_service"],
         "adjudicated_after_service"),
        ({"adjudication_date": "2027-01-05"}, "adjudication_date", "adjudication_date_range"),
        ({"service_date": "1999-12-31"}, "service_date", "service_date_range"),
        ({"date_of_birth": "1890-01-01"}, "date_of_birth", "date_of_birth_range"),
        ({"provider_npi": "123456789"}, "provider_npi", "npi_format"),
        ({"provider_npi": "1234567890"}, "provider_npi", "npi_check_digit"),
        ({"procedure_code": "ABC"}, "procedure_code", "procedure_code_format"),
        ({"diagnosis_code": "I1"}, "diagnosis_code", "diagnosis_code_format"),
        ({"claim_status": "lost"}, "claim_status", "claim_status"),
        ({"adjustment_codes": "CO-45;XYZ"}, "adjustment_codes", "adjustment_code_syntax"),
        ({"adjustment_codes": "ZZ-45"}, "adjustment_codes", "adjustment_code_syntax"),
        ({"postal_code": "9372"}, "postal_code", "postal_code_format"),
        ({"email": "not-an-address"}, "email", "email_syntax"),
        ({"email": "two@@example.com"}, "email", "email_syntax"),
        ({"email": "a@b.test"}, "email", "email_syntax"),  # a special-use domain
        # Internationalised: valid, but sending does not use SMTPUTF8.
        ({"email": "zoë.lambert@exämple.de"}, "email", "email_smtputf8"),
        ({"line_number": "one"}, "line_number", "type_int32"),
        ({"member_id": ""}, "member_id", "required"),
        ({"last_name": ""}, "member_id", "member_name"),
        ({"email": "", "city": ""}, "member_id", "member_contact"),
    ],
)  # fmt: skip
def test_each_rule_quarantines_its_row_without_the_value(tmp_path, changes, field, rule):
    path = write(tmp_path, [GOOD, {**GOOD, **changes, "claim_id": "C2"}])
    verdict, reasons = check(path)
    assert verdict.accepted == 1
    assert ("claims.csv", 3, field, rule) in [
        (r["file_name"], r["row_number"], r["field"], r["rule"]) for r in reasons
    ]
    assert {r["row_number"] for r in reasons} == {3}
    for value in changes.values():
        if len(value) > 2:
            assert all(value not in str(r["message"]) for r in reasons)


@pytest.mark.parametrize(
    "changes",
    [
        # A reversal repeats the original line with its amounts negated.
        {"claim_status": "reversed", "billed_amount": "-120.00", "allowed_amount": "-80.00",
         "plan_paid": "-60.00", "member_responsibility": "-20.00"},
        # A denied line allows nothing; the member may owe the billed amount.
        {"claim_status": "denied", "allowed_amount": "0.00", "plan_paid": "0.00",
         "member_responsibility": "120.00", "noncovered_amount": "120.00",
         "adjustment_codes": "CO-50;N130;96"},
        {"deductible_amount": "10.00", "copay_amount": "10.00", "coinsurance_amount": "0.00"},
        {"email": ""},  # a postal address alone is enough contact
    ],
)  # fmt: skip
def test_legitimate_lines_are_accepted(tmp_path, changes):
    verdict, reasons = check(write(tmp_path, [GOOD, {**GOOD, **changes, "claim_id": "C2"}]))
    assert reasons == [] and verdict.accepted == 2


def test_a_repeated_line_is_quarantined_and_the_first_kept(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "claim_id": "C2"}, GOOD])
    verdict, reasons = check(path)
    assert verdict.accepted == 2
    assert [(r["row_number"], r["rule"]) for r in reasons] == [(4, "duplicate_line")]
    assert sorted(r["_row"] for r in accepted_rows(path)) == [2, 3]


def test_too_many_bad_rows_reject_the_whole_file(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "claim_id": "C2", "provider_npi": "1"}])
    verdict, reasons = check(path, share=0.25)
    assert verdict.rejection == "1 of 2 rows (50.0%) failed validation; the limit is 25%"
    assert verdict.accepted == 0 and len(reasons) == 1
    assert not (tmp_path / "claims.csv.out" / "accepted.parquet").exists()


def test_missing_column_rejects_the_file_naming_it(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("member_id,first_name\nA1,Ana\n", encoding="utf-8")
    with pytest.raises(
        FileRejected, match=r"short\.csv: rejected: missing required columns: claim_id"
    ):
        check(path)
    assert not list((tmp_path / "short.csv.out").glob("*.parquet"))


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe\x00garbage"])
def test_empty_or_unreadable_files_are_rejected(tmp_path, content):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(FileRejected, match="bad.csv"):
        check(path)


def test_invalid_utf8_midway_rejects_the_file_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.intake.ingest, "_BLOCK_BYTES", 4096)
    rows = [{**GOOD, "claim_id": f"C{i}"} for i in range(200)]
    path = write(tmp_path, rows)
    # A Latin-1 "é" in a name near the end: an encoding slip in one of many blocks.
    latin1_row = ",".join({**GOOD, "first_name": "José", "claim_id": "C999"}.values())
    path.write_bytes(path.read_bytes() + (latin1_row + "\n").encode("latin-1"))
    with pytest.raises(FileRejected, match="not UTF-8"):
        check(path)
    assert not list((tmp_path / "claims.csv.out").glob("*.parquet"))


def test_row_numbers_hold_across_blocks(tmp_path, monkeypatch):
    """Bad records anywhere in a large file keep their true record numbers."""
    monkeypatch.setattr(pipeline.intake.ingest, "_BLOCK_BYTES", 4096)
    rows = [{**GOOD, "claim_id": f"C{i}"} for i in range(400)]
    text_rows = io.StringIO()
    writer = csv.DictWriter(text_rows, fieldnames=HEADER, lineterminator="\n")
    writer.writeheader()
    bad_records = {5, 77, 78, 250, 401}
    for number, row in enumerate(rows, start=2):
        if number in bad_records:
            text_rows.write("A1,short,row\n")
        elif number % 50 == 0:
            writer.writerow({**row, "billed_amount": "-5.00"})
        else:
            writer.writerow(row)
    path = tmp_path / "claims.csv"
    path.write_text(text_rows.getvalue(), encoding="utf-8")
    verdict, reasons = check(path)
    by_rule = {}
    for r in reasons:
        by_rule.setdefault(r["rule"], set()).add(r["row_number"])
    assert by_rule["column_count"] == bad_records
    assert by_rule["amount_non_negative"] == {n for n in range(50, 402, 50) if n not in bad_records}
    assert verdict.rows_in == 400


def test_formats_and_column_mapping_read_like_the_csv(tmp_path):
    reference, _ = check(sample_copy(tmp_path))
    table = pacsv.read_csv(SAMPLE, convert_options=pacsv.ConvertOptions(
        column_types=dict.fromkeys(HEADER, pa.string())),
        parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"))  # fmt: skip
    pipe = tmp_path / "pipe" / "claims.psv.gz"
    pipe.parent.mkdir()
    with gzip.open(pipe, "wb") as stream:
        pacsv.write_csv(table, stream, pacsv.WriteOptions(delimiter="|", quoting_style="none"))
    parquet = tmp_path / "pq" / "claims.parquet"
    parquet.parent.mkdir()
    pq.write_table(table.rename_columns(["MBR_" + n if n == "member_id" else n for n in HEADER]),
                   parquet)  # fmt: skip
    for path, fmt, columns in (
        (pipe, "pipe", {}),
        (parquet, "parquet", {"MBR_member_id": "member_id"}),
    ):
        verdict, _ = check(path, fmt=fmt, columns=columns)
        # The truncated record is not in these copies: one row fewer in, the same accepted.
        assert (verdict.rows_in, verdict.accepted) == (reference.rows_in - 1, reference.accepted)


def test_roster_fills_contact_and_sets_consent(tmp_path):
    roster = pa.table({
        "member_id": ["A1"], "first_name": ["Ana"], "last_name": ["Pérez"],
        "date_of_birth": pa.array([date(1980, 1, 2)]), "address_line": ["1 Main St"],
        "city": ["Fresno"], "state": ["CA"], "postal_code": ["93720"], "email": ["ana@example.com"],
        "edelivery_consent": [False], "language": ["es"],
    })  # fmt: skip
    bare = {k: ("" if k in {"first_name", "last_name", "address_line", "city", "state",
                            "postal_code", "email", "date_of_birth"} else v)
            for k, v in GOOD.items()}  # fmt: skip
    path = write(tmp_path, [bare, {**bare, "member_id": "UNKNOWN", "claim_id": "C2"}])
    verdict, reasons = check(path, roster=roster)
    assert verdict.accepted == 1
    assert {(r["row_number"], r["rule"]) for r in reasons} == {
        (3, "member_name"),
        (3, "member_contact"),
    }
    [row] = accepted_rows(path)
    assert (row["first_name"], row["email"], row["edelivery_consent"], row["language"]) == (
        "Ana", "ana@example.com", False, "es")  # fmt: skip


def test_roster_files_validate_on_their_contract(tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text(
        "member_id,first_name,last_name,email,edelivery_consent,language\n"
        "A1,Ana,Pérez,ana@example.com,Y,es\nA2,Bo,Li,bad@,maybe,xx\nA1,Ana,Pérez,new@example.com,yes,en\n",
        encoding="utf-8",
    )
    verdict, reasons = check(path, kind="roster")
    assert (verdict.rows_in, verdict.accepted) == (3, 1)
    assert {(r["row_number"], r["rule"]) for r in reasons} == {
        (3, "type_bool"), (2, "duplicate_member"),
    }  # fmt: skip
    [kept] = accepted_rows(path)
    assert (kept["email"], kept["edelivery_consent"]) == ("new@example.com", True)


def mutations() -> st.SearchStrategy[bytes]:
    base = SAMPLE.read_bytes()
    lines = base.split(b"\n")

    def unbalance_quote(i: int) -> bytes:
        return b"\n".join(lines[:i] + [b'"' + lines[i]] + lines[i + 1 :])

    return st.one_of(
        st.integers(0, len(base)).map(lambda n: base[:n]),  # truncated anywhere
        st.tuples(st.integers(0, len(base)), st.binary(max_size=400)).map(
            lambda p: base[: p[0]] + p[1] + base[p[0] :]),  # garbage bytes anywhere
        st.just(b"\xef\xbb\xbf" + base),  # BOM
        st.just(base.replace(b"\n", b"\r\n")),  # CRLF
        st.just(base.decode().encode("utf-16")),  # wrong encoding
        st.integers(1, len(lines) - 1).map(unbalance_quote),  # broken quoting
        st.just(b"\n".join(line + b",extra" for line in lines)),  # extra column
        st.integers(1, len(lines) - 1).map(lambda i: b"\n".join(lines[:i] + lines[i + 1 :])),
        st.just(b"\n".join(line.rsplit(b",", 1)[0] for line in lines)),  # missing column
        st.just(lines[0] + b"\n" + b"x" * 200_000 + b"\n"),  # huge field
        st.just(lines[0] + b"\n"),  # header only
    )  # fmt: skip


def _accounted_or_rejected(tmp_path: Path, content: bytes, *, validate: bool) -> None:
    path = tmp_path / "mutated.csv"
    path.write_bytes(content)
    out = tmp_path / "out"
    try:
        if validate:
            verdict, reasons = check(path)
            assert verdict.rows_in == verdict.accepted + len({r["row_number"] for r in reasons})
        else:
            result = ingest_file(
                path,
                parsed_out=out / "p.parquet",
                quarantine_out=out / "q.parquet",
                fmt="csv",
                columns={},
                contract=load_contract("claim_line"),
                keyring=TEST_KEYRING,
            )
            reasons = read_table(out / "q.parquet", TEST_KEYRING).to_pylist()
            held_back = {r["row_number"] for r in reasons}
            assert result.rows_in == result.rows_typed + len(held_back)
    except FileRejected as err:
        assert err.file_name == "mutated.csv" and err.reason


@given(content=mutations())
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
def test_1000_mutated_files_are_rejected_cleanly_or_accounted_for_at_ingest(tmp_path, content):
    _accounted_or_rejected(tmp_path, content, validate=False)


@given(content=mutations())
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_mutated_files_are_rejected_cleanly_or_accounted_for_after_validation(tmp_path, content):
    _accounted_or_rejected(tmp_path, content, validate=True)


@pytest.mark.parametrize(
    "transform",
    [lambda b: b"\xef\xbb\xbf" + b, lambda b: b.replace(b"\n", b"\r\n")],
    ids=["bom", "crlf"],
)
def test_bom_and_crlf_files_read_like_the_original(tmp_path, transform):
    path = tmp_path / "variant.csv"
    path.write_bytes(transform(SAMPLE.read_bytes()))
    verdict, _ = check(path)
    assert (verdict.accepted, verdict.quarantined) == (47, 6)


@given(keys=st.lists(st.tuples(st.sampled_from("ABC"), st.integers(1, 3)), min_size=1, max_size=40))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_duplicates_are_exactly_the_repeats_after_the_first(tmp_path, keys):
    rows = [{**GOOD, "claim_id": claim, "line_number": str(line)} for claim, line in keys]
    path = write(tmp_path, rows)
    _, reasons = check(path)
    seen: set[tuple[str, int]] = set()
    expected = set()
    for number, key in enumerate(keys, start=2):
        if key in seen:
            expected.add(number)
        seen.add(key)
    assert {r["row_number"] for r in reasons if r["rule"] == "duplicate_line"} == expected


def test_the_synthetic_extract_fits_the_contract_with_its_share_of_defects(tmp_path):
    from pipeline.ops.synthetic import generate_extract

    path = tmp_path / "synthetic.csv"
    generate_extract(path, 4_000, bad_share=0.05, chunk=1_500)
    verdict, reasons = check(path)
    assert verdict.rows_in == 4_000
    # Each defective row carries one defect; nothing else fails.
    assert 0.03 < verdict.quarantined / verdict.rows_in < 0.07
    assert {r["rule"] for r in reasons} <= {
        "amount_non_negative", "billed_at_least_allowed", "allowed_is_paid_plus_member",
        "npi_format", "type_date", "type_decimal", "procedure_code_format", "email_syntax",
        "required", "member_share_parts",
    }  # fmt: skip
