"""Ingest stage: find the files of a drop, register each once by sha256, parse to the contract.

Parsing never loses a row: a row that cannot be read or typed becomes a quarantine reason
(file, row, field, rule, message) and every other row is returned typed. Row numbers are
record numbers with the header as row 1, as a spreadsheet shows them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.contracts import Contract, load_contract
from pipeline.errors import FileRejected

ROW = "_row"
_ACCEPTED_SUFFIXES = (".csv",)
_PATTERNS = {
    "date": r"^\d{4}-\d{2}-\d{2}$",
    "decimal": r"^-?\d{1,10}(\.\d{1,2})?$",
    "int32": r"^\d{1,9}$",
}
_TYPE_MESSAGES = {
    "date": "not a date in YYYY-MM-DD form",
    "decimal": "not an amount with at most two decimals",
    "int32": "not a whole number",
}


@dataclass(frozen=True)
class DroppedFile:
    path: Path
    # The folder under the drop root the file was found in.
    insurer: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ParsedFile:
    # Rows that parsed and typed, in contract order, plus the _row column.
    rows: pa.Table
    # Quarantine reasons (schemas/quarantine.json) for rows that did not.
    quarantine: pa.Table
    # Every record of the file except the header.
    rows_in: int


def find_drop_files(drop: Path) -> list[DroppedFile]:
    """Files of a drop: `<drop>/<insurer>/<name>.csv`, in name order; partial files are ignored."""
    found = []
    for path in sorted(drop.glob("*/*")):
        if (
            path.is_file()
            and path.suffix.lower() in _ACCEPTED_SUFFIXES
            and not path.name.startswith(".")
        ):
            found.append(
                DroppedFile(path, path.parent.name, file_sha256(path), path.stat().st_size)
            )
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def quarantine_schema() -> pa.Schema:
    return load_contract("quarantine").schema


def parse_claim_lines(path: Path, *, contract: Contract | None = None) -> ParsedFile:
    contract = contract or load_contract("claim_line")
    raw, header, bad_records = _read_csv_as_text(path, contract)
    total = raw.num_rows + len(bad_records)
    bad_numbers = {number for number, _ in bad_records}
    row_numbers = [n for n in range(2, total + 2) if n not in bad_numbers]
    raw = raw.append_column(ROW, pa.array(row_numbers, pa.int64()))

    reasons: list[dict[str, object]] = [
        {
            "file_name": path.name,
            "row_number": n,
            "field": "*",
            "rule": "column_count",
            "message": f"row has {count} fields; the header has {len(header)}",
        }
        for n, count in bad_records
    ]
    typed_columns = []
    ok = pa.array([True] * raw.num_rows, pa.bool_())
    for field in contract.fields:
        text = pc.utf8_trim_whitespace(raw[field.name])
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        if field.type == "string":
            typed_columns.append(text)
            continue
        well_formed = pc.match_substring_regex(text, _PATTERNS[field.type])
        typed = _cast(pc.if_else(well_formed, text, pa.scalar(None, pa.string())), field.arrow_type)
        failed = pc.and_(pc.is_valid(text), pc.is_null(typed))
        for n in pc.filter(raw[ROW], failed).to_pylist():
            reasons.append(
                {
                    "file_name": path.name,
                    "row_number": n,
                    "field": field.name,
                    "rule": f"type_{field.type}",
                    "message": _TYPE_MESSAGES[field.type],
                }
            )
        ok = pc.and_(ok, pc.invert(failed))
        typed_columns.append(typed)
    typed_table = pa.Table.from_arrays(
        [*typed_columns, raw[ROW]],
        names=[*contract.column_names, ROW],
    )
    return ParsedFile(
        rows=typed_table.filter(ok),
        quarantine=pa.Table.from_pylist(reasons, schema=quarantine_schema()),
        rows_in=total,
    )


def _read_csv_as_text(
    path: Path, contract: Contract
) -> tuple[pa.Table, list[str], list[tuple[int, int]]]:
    """Contract columns as text, the header, and (number, field count) of malformed records."""
    bad_records: list[tuple[int, int]] = []

    def set_aside(row: pacsv.InvalidRow) -> str:
        # The row's text is PHI: only its number and field count are kept.
        bad_records.append((row.number, row.actual_columns))
        return "skip"

    try:
        header = _read_header(path)
        missing = [f.name for f in contract.fields if not f.nullable and f.name not in header]
        if missing:
            raise FileRejected(path.name, f"missing required columns: {', '.join(missing)}")
        table = pacsv.read_csv(
            path,
            # Single-threaded so that set-aside rows carry their record number.
            read_options=pacsv.ReadOptions(use_threads=False, encoding="utf8"),
            parse_options=pacsv.ParseOptions(
                newlines_in_values=True, invalid_row_handler=set_aside
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(contract.column_names, pa.string()),
                include_columns=contract.column_names,
                # Optional columns the file does not have are read as empty.
                include_missing_columns=True,
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as err:
        raise FileRejected(path.name, f"unreadable as CSV: {type(err).__name__}") from err
    return table, header, bad_records


def _read_header(path: Path) -> list[str]:
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as stream:
            first = stream.readline()
    except UnicodeDecodeError as err:
        raise FileRejected(path.name, f"header is not UTF-8 text (byte {err.start})") from err
    if not first.strip():
        raise FileRejected(path.name, "empty file or no header row")
    names = next(
        iter(
            pacsv.read_csv(
                pa.BufferReader(first.encode()),
                read_options=pacsv.ReadOptions(autogenerate_column_names=True),
            ).to_pylist()
        )
    )
    return [str(v) for v in names.values()]


def _cast(text: pa.ChunkedArray, arrow_type: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_date(arrow_type):
        parsed = pc.strptime(text, format="%Y-%m-%d", unit="s", error_is_null=True)
        # strptime rolls impossible dates over (2026-02-30 -> 03-02): keep only round trips.
        round_trips = pc.equal(pc.strftime(parsed, format="%Y-%m-%d"), text)
        return pc.cast(pc.if_else(round_trips, parsed, pa.scalar(None, parsed.type)), arrow_type)
    return pc.cast(text, arrow_type)
