"""Ingest stage: read a dropped file in record batches onto a contract, never losing a row.

Formats: CSV and pipe-delimited text (either gzip-compressed, told by its content), parquet,
and FHIR ExplanationOfBenefit resources (NDJSON or Bundle JSON, see pipeline.intake.fhir), read
within the insurer's limits (pipeline.intake.limits). An insurer's own column names map onto
the contract through its profile (pipeline.intake.profiles).

Every row either comes out typed or leaves a quarantine reason (file, row, field, rule,
message). Row numbers are what a person finds in the file: for text, the record number with
the header as row 1; for parquet and FHIR, the record's position from 1. A file that cannot be
read at all raises FileRejected; its partial output is removed, so nothing of it is processed.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import FileRejected
from pipeline.intake.limits import DEFAULT_LIMITS, ReadLimits, is_gzip, open_input
from pipeline.records.atrest import Keyring
from pipeline.records.atrest_parquet import open_writer
from pipeline.records.contracts import Contract, ContractField, load_contract

ROW = "_row"
BATCH_ROWS = 250_000
# The streaming CSV reader holds several blocks at once: 4 MB keeps that near 150 MB. A record
# longer than a block is refused (arrow: "straddling object"), so no line is held whole.
_BLOCK_BYTES = 4 << 20
# The header is read on its own: a file without line breaks is not read into memory.
_MAX_HEADER_CHARS = 1 << 20
_PATTERNS = {
    "date": r"^\d{4}-\d{2}-\d{2}$",
    "decimal": r"^-?\d{1,10}(\.\d{1,2})?$",
    "int32": r"^\d{1,9}$",
    "bool": r"^(?i:true|false|yes|no|y|n|1|0)$",
}
_TYPE_MESSAGES = {
    "date": "not a date in YYYY-MM-DD form",
    "decimal": "not an amount with at most two decimals",
    "int32": "not a whole number",
    "bool": "not true/false, yes/no, y/n or 1/0",
}
_TRUE = pa.array(["true", "yes", "y", "1"])
DELIMITERS = {"csv": ",", "pipe": "|"}


@dataclass(frozen=True)
class IngestResult:
    # Every record of the file except a text header.
    rows_in: int
    # Rows that typed cleanly, written to the parsed output.
    rows_typed: int


def detect_format(path: Path) -> str:
    """csv, pipe, parquet or fhir, from the file name (a .gz suffix is looked through)."""
    name = path.name.lower().removesuffix(".gz")
    for suffixes, fmt in (
        ((".csv",), "csv"),
        ((".psv", ".pipe", ".txt"), "pipe"),
        ((".parquet",), "parquet"),
        ((".ndjson", ".jsonl", ".json"), "fhir"),
    ):
        if name.endswith(suffixes):
            return fmt
    raise FileRejected(
        path.name, "unsupported file type (expected csv, psv, txt, parquet, ndjson, jsonl, json)"
    )


def ingest_file(
    path: Path,
    *,
    parsed_out: Path,
    quarantine_out: Path,
    fmt: str,
    columns: Mapping[str, str],
    contract: Contract,
    keyring: Keyring,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> IngestResult:
    """Type every record of `path` onto `contract`, streaming; write typed rows and reasons,
    both encrypted at rest under `keyring` (pipeline.records.atrest_parquet).

    `columns` maps the file's own column names to contract field names (identity otherwise);
    `limits` bound what reading may cost (pipeline.intake.limits).
    """
    typed_schema = contract.staging_schema.append(pa.field(ROW, pa.int64(), nullable=False))
    parsed_tmp, quarantine_tmp = _tmp(parsed_out), _tmp(quarantine_out)
    rows_in = rows_typed = 0
    try:
        with (
            open_writer(parsed_tmp, typed_schema, keyring) as parsed,
            open_writer(quarantine_tmp, quarantine_schema(), keyring) as quarantine,
        ):
            for text, reasons in read_text_batches(
                path, fmt=fmt, columns=columns, contract=contract, limits=limits
            ):
                typed, type_reasons = type_batch(text, contract, path.name)
                rows_in += text.num_rows + len({r["row_number"] for r in reasons})
                rows_typed += typed.num_rows
                parsed.write_batch(typed)
                quarantine.write_table(_reasons_table(reasons + type_reasons))
    except BaseException:
        parsed_tmp.unlink(missing_ok=True)
        quarantine_tmp.unlink(missing_ok=True)
        raise
    parsed_tmp.replace(parsed_out)
    quarantine_tmp.replace(quarantine_out)
    return IngestResult(rows_in, rows_typed)


def read_text_batches(
    path: Path,
    *,
    fmt: str,
    columns: Mapping[str, str],
    contract: Contract,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Iterator[tuple[pa.RecordBatch, list[dict[str, object]]]]:
    """(text batch with contract columns and _row, reasons for records that could not be read)."""
    try:
        if fmt in DELIMITERS:
            yield from _text_batches(path, DELIMITERS[fmt], columns, contract, limits)
        elif fmt == "parquet":
            yield from _parquet_batches(path, columns, contract)
        elif fmt == "fhir":
            yield from _fhir_batches(path, contract, limits)
        else:
            raise FileRejected(path.name, f"unknown format {fmt!r}")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, EOFError, zlib.error) as err:
        # Arrow's message can quote the offending bytes (PHI); only its kind is kept.
        raise FileRejected(path.name, f"unreadable as {fmt}: {_kind(err)}") from err


def type_batch(
    text: pa.RecordBatch, contract: Contract, file_name: str
) -> tuple[pa.RecordBatch, list[dict[str, object]]]:
    """Cast text columns to the contract's types; rows with an untypeable value are held back."""
    reasons: list[dict[str, object]] = []
    ok = pa.array([True] * text.num_rows, pa.bool_())
    typed = []
    for field in contract.fields:
        value = pc.utf8_trim_whitespace(text.column(field.name))
        value = pc.if_else(pc.equal(value, ""), pa.scalar(None, pa.string()), value)
        if field.type == "string":
            typed.append(value)
            continue
        cast = _cast(value, field)
        failed = pc.and_(pc.is_valid(value), pc.is_null(cast))
        if pc.any(failed).as_py():
            reasons += quarantine_rows(
                text, failed, file_name, field.name, f"type_{field.type}",
                _TYPE_MESSAGES[field.type],
            )  # fmt: skip
            ok = pc.and_(ok, pc.invert(failed))
        typed.append(cast)
    batch = pa.RecordBatch.from_arrays(
        [*typed, text.column(ROW)],
        schema=contract.staging_schema.append(pa.field(ROW, pa.int64(), nullable=False)),
    )
    return batch.filter(ok), reasons


def quarantine_schema() -> pa.Schema:
    return load_contract("quarantine").schema


def quarantine_reason(
    file_name: str, row: int, field: str, rule: str, message: str
) -> dict[str, object]:
    """One row of the quarantine contract (schemas/quarantine.json)."""
    return {
        "file_name": file_name,
        "row_number": row,
        "field": field,
        "rule": rule,
        "message": message,
    }


def quarantine_rows(
    batch: pa.RecordBatch, mask: pa.Array, file_name: str, field: str, rule: str, message: str
) -> list[dict[str, object]]:
    """A quarantine reason for each row of `batch` (numbered in its ROW column) `mask` selects."""
    return [
        quarantine_reason(file_name, n, field, rule, message)
        for n in pc.filter(batch.column(ROW), mask).to_pylist()
    ]


def _reasons_table(reasons: list[dict[str, object]]) -> pa.Table:
    return pa.Table.from_pylist(reasons, schema=quarantine_schema())


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def _kind(err: BaseException) -> str:
    text = str(err)
    if "UTF8" in text or "utf-8" in text.lower() or isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    return type(err).__name__


def _sources(contract: Contract, columns: Mapping[str, str]) -> dict[str, str]:
    """Contract field -> the column name the file uses for it."""
    by_field = {field: theirs for theirs, field in columns.items()}
    return {f.name: by_field.get(f.name, f.name) for f in contract.fields}


def _check_required(
    file_name: str, present: set[str], sources: dict[str, str], contract: Contract
) -> None:
    missing = [
        sources[f.name]
        for f in contract.fields
        if not f.nullable and sources[f.name] not in present
    ]
    if missing:
        raise FileRejected(file_name, f"missing required columns: {', '.join(missing)}")


def _text_batches(
    path: Path, delimiter: str, columns: Mapping[str, str], contract: Contract, limits: ReadLimits
) -> Iterator[tuple[pa.RecordBatch, list[dict[str, object]]]]:
    header = _read_header(path, delimiter, limits)
    sources = _sources(contract, columns)
    _check_required(path.name, set(header), sources, contract)
    # Arrow reads plain text itself (faster than through a Python stream); gzip data goes
    # through the bounded inflater.
    if is_gzip(path):
        source = pa.PythonFile(open_input(path, limits), mode="r")
    else:
        source = pa.input_stream(str(path), compression=None)
    with source:
        yield from _numbered_batches(path, source, header, sources, delimiter)


def _numbered_batches(
    path: Path, source: pa.NativeFile, header: list[str], sources: dict[str, str], delimiter: str
) -> Iterator[tuple[pa.RecordBatch, list[dict[str, object]]]]:
    bad_records: list[tuple[int, int]] = []

    def set_aside(row: pacsv.InvalidRow) -> str:
        # The row's text is PHI: only its number and field count are kept.
        bad_records.append((row.number, row.actual_columns))
        return "skip"

    reader = pacsv.open_csv(
        source,
        # Single-threaded so that set-aside rows carry their record number.
        read_options=pacsv.ReadOptions(use_threads=False, block_size=_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, newlines_in_values=True, invalid_row_handler=set_aside
        ),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(sources.values(), pa.string()),
            include_columns=list(sources.values()),
            # Optional columns the file does not have are read as empty.
            include_missing_columns=True,
            strings_can_be_null=False,
        ),
    )
    next_record = 2  # the header is record 1
    # Numbers of set-aside records not yet passed. The reader parses ahead of the batch it
    # yields, so a number may belong to a later batch: valid rows are numbered by skipping them.
    ahead: set[int] = set()
    for batch in reader:
        ahead.update(number for number, _ in bad_records)
        numbers: list[int] = []
        while len(numbers) < batch.num_rows:
            if next_record not in ahead:
                numbers.append(next_record)
            next_record += 1
        ahead = {n for n in ahead if n >= next_record}
        yield (
            _as_contract(batch, sources, numbers),
            _column_count_reasons(path, header, bad_records),
        )
    if bad_records:  # malformed records after the last good one
        yield _as_contract(None, sources, []), _column_count_reasons(path, header, bad_records)


def _column_count_reasons(
    path: Path, header: list[str], bad_records: list[tuple[int, int]]
) -> list[dict[str, object]]:
    """Reasons for the records set aside so far; the list is emptied."""
    reasons = [
        quarantine_reason(
            path.name,
            n,
            "*",
            "column_count",
            f"row has {count} fields; the header has {len(header)}",
        )
        for n, count in bad_records
    ]
    bad_records.clear()
    return reasons


def _parquet_batches(
    path: Path, columns: Mapping[str, str], contract: Contract
) -> Iterator[tuple[pa.RecordBatch, list[dict[str, object]]]]:
    source = pq.ParquetFile(path)
    sources = _sources(contract, columns)
    present = set(source.schema_arrow.names)
    _check_required(path.name, present, sources, contract)
    wanted = [name for name in sources.values() if name in present]
    first = 1
    for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
        text = pa.RecordBatch.from_arrays(
            [pc.cast(column, pa.string()) for column in batch.columns], names=batch.schema.names
        )
        yield _as_contract(text, sources, list(range(first, first + batch.num_rows))), []
        first += batch.num_rows


def _fhir_batches(
    path: Path, contract: Contract, limits: ReadLimits
) -> Iterator[tuple[pa.RecordBatch, list[dict[str, object]]]]:
    from pipeline.intake.fhir import read_fhir_claim_lines

    names = contract.column_names
    schema = pa.schema([(name, pa.string()) for name in names])
    rows: list[dict[str, str | None]] = []
    first = 1
    for row in read_fhir_claim_lines(path, limits):
        rows.append(row)
        if len(rows) == BATCH_ROWS:
            yield _fhir_batch(rows, schema, first), []
            first, rows = first + len(rows), []
    if rows:
        yield _fhir_batch(rows, schema, first), []


def _fhir_batch(rows: list[dict[str, str | None]], schema: pa.Schema, first: int) -> pa.RecordBatch:
    batch = pa.RecordBatch.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema)
    numbers = pa.array(range(first, first + len(rows)), pa.int64())
    return batch.append_column(ROW, numbers)


def _as_contract(
    batch: pa.RecordBatch | None, sources: dict[str, str], numbers: list[int]
) -> pa.RecordBatch:
    """Rename the file's columns to the contract's and attach row numbers."""
    names = list(sources)
    if batch is None:
        arrays = [pa.array([], pa.string()) for _ in names]
    else:
        arrays = [_text(batch, sources[name]) for name in names]
    return pa.RecordBatch.from_arrays([*arrays, pa.array(numbers, pa.int64())], names=[*names, ROW])


def _text(batch: pa.RecordBatch, name: str) -> pa.Array:
    index = batch.schema.get_field_index(name)
    if index < 0:
        return pa.nulls(batch.num_rows, pa.string())
    return batch.column(index)


def _read_header(path: Path, delimiter: str, limits: ReadLimits) -> list[str]:
    try:
        with (
            open_input(path, limits) as raw,
            io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as stream,
        ):
            first = stream.readline(_MAX_HEADER_CHARS + 1)
    except UnicodeDecodeError as err:
        raise FileRejected(path.name, f"header is not UTF-8 text (byte {err.start})") from err
    except (OSError, EOFError, zlib.error) as err:
        raise FileRejected(path.name, f"unreadable: {type(err).__name__}") from err
    if len(first) > _MAX_HEADER_CHARS:
        raise FileRejected(path.name, f"header row longer than {_MAX_HEADER_CHARS} characters")
    if not first.strip():
        raise FileRejected(path.name, "empty file or no header row")
    names = pacsv.read_csv(
        pa.BufferReader(first.encode()),
        read_options=pacsv.ReadOptions(autogenerate_column_names=True),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
    ).to_pylist()[0]
    return [str(v).strip() for v in names.values()]


def _cast(text: pa.Array, field: ContractField) -> pa.Array:
    well_formed = pc.match_substring_regex(text, _PATTERNS[field.type])
    text = pc.if_else(well_formed, text, pa.scalar(None, pa.string()))
    if field.type == "date":
        parsed = pc.strptime(text, format="%Y-%m-%d", unit="s", error_is_null=True)
        # strptime rolls impossible dates over (2026-02-30 -> 03-02): the day must survive.
        day = pc.cast(pc.utf8_slice_codeunits(text, 8, 10), pa.int64())
        kept = pc.equal(pc.day(parsed), day)
        return pc.cast(pc.if_else(kept, parsed, pa.scalar(None, parsed.type)), field.arrow_type)
    if field.type == "bool":
        return pc.if_else(
            pc.is_null(text),
            pa.scalar(None, pa.bool_()),
            pc.is_in(pc.utf8_lower(text), value_set=_TRUE),
        )
    return pc.cast(text, field.arrow_type)
