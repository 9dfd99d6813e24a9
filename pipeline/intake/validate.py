"""Validate stage: the Great Expectations suite in schemas/expectations/ (with required fields
derived from the contract) plus the row rules of pipeline.intake.rules, over a parsed file in record
batches; then duplicate lines; then the file-level verdict.

Every row of the file ends up accepted or quarantined (with file, row, field, rule and a
message that never quotes the value), and rows in = accepted + quarantined is checked here.
A file whose share of bad rows exceeds the insurer's limit is rejected whole.
Only failing row numbers are taken from GX results: the values it also returns are PHI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import AccountingError
from pipeline.intake.ingest import ROW, quarantine_reason, quarantine_rows, quarantine_schema
from pipeline.intake.rules import RowRule, claim_line_rules, roster_rules
from pipeline.records.atrest import Keyring
from pipeline.records.atrest_parquet import open_reader, open_writer, read_table, write_table
from pipeline.records.contracts import Contract, load_contract
from pipeline.resources import SCHEMAS_DIR

# GX phones home unless told not to; this pipeline makes no network traffic.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
import great_expectations as gx  # noqa: E402
from great_expectations.core.batch_definition import BatchDefinition  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

CONTACT = [
    "first_name",
    "last_name",
    "date_of_birth",
    "address_line",
    "city",
    "state",
    "postal_code",
    "email",
]
PREFERENCES = ["edelivery_consent", "language"]
_POSTAL = ["address_line", "city", "state", "postal_code"]
# Rows per validation batch: GX works on a pandas copy, so this bounds the stage's memory.
BATCH_ROWS = 125_000


@dataclass(frozen=True)
class FileVerdict:
    rows_in: int
    accepted: int
    quarantined: int
    # Set when the file is rejected whole; then nothing of it is accepted.
    rejection: str | None


@cache
def load_suite(name: str) -> gx.ExpectationSuite:
    """Required-field checks from the contract, then the suite file's rules."""
    contract = load_contract(name)
    raw = json.loads((SCHEMAS_DIR / "expectations" / f"{name}.json").read_text(encoding="utf-8"))
    # Claim-line contact columns are checked after the roster fills them (see _contact_rules).
    required = [
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": f.name},
            "meta": {"rule": "required", "message": f"{f.name} is required"},
        }
        for f in contract.fields
        if not f.nullable
    ]
    return gx.ExpectationSuite(name=name, expectations=required + raw["expectations"])


@cache
def _suite_columns(name: str) -> list[str]:
    """The columns the suite reads: only these are handed to GX."""
    kwargs = [e.configuration.kwargs for e in load_suite(name).expectations]
    return sorted(
        {k[key] for k in kwargs for key in ("column", "column_A", "column_B") if key in k}
    )


@cache
def _batch_definition() -> BatchDefinition[Any]:
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("claims").add_dataframe_asset("claim_lines")
    return asset.add_batch_definition_whole_dataframe("whole_batch")


def validate_file(
    *,
    kind: str,
    file_name: str,
    parsed: Path,
    parse_quarantine: Path,
    accepted_out: Path,
    quarantine_out: Path,
    rows_in: int,
    run_date: date,
    roster: pa.Table | None,
    max_bad_row_share: float,
    keyring: Keyring,
) -> FileVerdict:
    """Validate a parsed file (ingest's output) and write its accepted rows and reasons; every
    file read and written is encrypted at rest under `keyring` (pipeline.records.atrest_parquet)."""
    contract = load_contract("roster" if kind == "roster" else "claim_line")
    rules = roster_rules() if kind == "roster" else claim_line_rules()
    reasons: list[dict[str, object]] = read_table(parse_quarantine, keyring).to_pylist()
    accepted_tmp = accepted_out.with_name(f".{accepted_out.name}.tmp")
    writer: pq.ParquetWriter | None = None
    keys = _DUPLICATE_KEYS[kind]
    fingerprints: list[np.ndarray] = []
    try:
        for batch in _batches(open_reader(parsed, keyring), kind, roster):
            failures = _gx_failures(batch, contract, file_name) + _rule_failures(
                batch, rules, file_name, run_date
            )
            if kind == "claims":
                failures += _contact_failures(batch, file_name)
            reasons += failures
            failed = pa.array({r["row_number"] for r in failures}, pa.int64())
            good = batch.filter(pc.invert(pc.is_in(batch.column(ROW), value_set=failed)))
            writer = writer or open_writer(accepted_tmp, good.schema, keyring)
            writer.write_batch(good)
            fingerprints.append(_fingerprints(good, keys))
    finally:
        if writer is not None:
            writer.close()
    if fingerprints:
        reasons += _drop_duplicates(
            accepted_tmp, kind, file_name, np.concatenate(fingerprints), keyring
        )

    quarantined = len({r["row_number"] for r in reasons})
    accepted = open_reader(accepted_tmp, keyring).metadata.num_rows if accepted_tmp.exists() else 0
    if rows_in != accepted + quarantined:
        accepted_tmp.unlink(missing_ok=True)
        raise AccountingError(
            f"{file_name}: {rows_in} rows in, {accepted} accepted + {quarantined} quarantined"
        )
    write_table(pa.Table.from_pylist(reasons, schema=quarantine_schema()), quarantine_out, keyring)
    if rows_in and quarantined / rows_in > max_bad_row_share:
        accepted_tmp.unlink(missing_ok=True)
        return FileVerdict(
            rows_in,
            0,
            quarantined,
            (
                f"{quarantined} of {rows_in} rows ({quarantined / rows_in:.1%}) failed validation; "
                f"the limit is {max_bad_row_share:.0%}"
            ),
        )
    if accepted_tmp.exists():
        accepted_tmp.replace(accepted_out)
    else:
        write_table(_empty_accepted(contract, kind), accepted_out, keyring)
    return FileVerdict(rows_in, accepted, quarantined, None)


def _batches(
    parsed: pq.ParquetFile, kind: str, roster: pa.Table | None
) -> Iterator[pa.RecordBatch]:
    known = _roster_for_join(roster) if kind == "claims" else None
    for batch in parsed.iter_batches(batch_size=BATCH_ROWS):
        yield _with_roster(batch, known) if kind == "claims" else batch


def _roster_for_join(roster: pa.Table | None) -> pa.Table | None:
    """The roster's columns under roster_* names, prepared once per file (None: no roster)."""
    if roster is None or roster.num_rows == 0:
        return None
    return (
        roster.select(["member_id", *CONTACT, *PREFERENCES])
        .rename_columns(["member_id", *(f"roster_{c}" for c in CONTACT + PREFERENCES)])
        .append_column("in_roster", pa.array([True] * roster.num_rows))
    )


def _with_roster(batch: pa.RecordBatch, known: pa.Table | None) -> pa.RecordBatch:
    """Fill empty contact columns from the roster; add the member's delivery preferences.

    A member the roster knows gets its consent (absent means no); a member it does not know
    keeps consent empty, meaning the extract's email address is the member's e-delivery choice.
    """
    table = pa.Table.from_batches([batch])
    if known is None:
        consent = pa.nulls(batch.num_rows, pa.bool_())
        language = pa.nulls(batch.num_rows, pa.string())
        return pa.RecordBatch.from_arrays(
            [*batch.columns, consent, language], names=[*batch.schema.names, *PREFERENCES]
        )
    # Only this batch's members join: hashing the whole roster for every batch would cost a
    # pass over millions of rows per batch.
    known = known.filter(pc.is_in(known["member_id"], value_set=batch.column("member_id")))
    joined = table.join(known, "member_id", join_type="left outer").sort_by(ROW)
    columns = {name: joined[name] for name in table.column_names}
    for name in CONTACT:
        columns[name] = pc.coalesce(joined[name], joined[f"roster_{name}"])
    in_roster = pc.fill_null(joined["in_roster"], False)
    columns["edelivery_consent"] = pc.if_else(
        in_roster,
        pc.fill_null(joined["roster_edelivery_consent"], False),
        pa.scalar(None, pa.bool_()),
    )
    columns["language"] = joined["roster_language"]
    return pa.Table.from_pydict(columns).combine_chunks().to_batches()[0]


def _gx_failures(
    batch: pa.RecordBatch, contract: Contract, file_name: str
) -> list[dict[str, object]]:
    if batch.num_rows == 0:
        return []
    suite = load_suite(contract.name)
    columns = []
    for name in _suite_columns(contract.name):
        column = batch.column(name)
        # GX compares numbers; the exact decimals stay in the Arrow batch.
        columns.append(
            pc.cast(column, pa.float64()) if pa.types.is_decimal(column.type) else column
        )
    frame = pa.table(columns, names=_suite_columns(contract.name)).to_pandas()
    # An unnamed index makes GX report bare row numbers; a named one adds the row's values.
    frame.index = pd.Index(batch.column(ROW).to_numpy())
    result = (
        _batch_definition()
        .get_batch(batch_parameters={"dataframe": frame})
        .validate(
            suite,
            result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False},
        )
    )
    reasons = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        assert config is not None, "a suite's results always carry their expectation"
        if outcome.exception_info and outcome.exception_info.get("raised_exception"):
            # An expectation that could not run is a bug in the suite, not bad data.
            raise RuntimeError(f"expectation {config.type} on {file_name} failed to run")
        kwargs = config.kwargs
        field = kwargs.get("column") or f"{kwargs['column_A']},{kwargs['column_B']}"
        for row_number in outcome.result.get("unexpected_index_list") or []:
            reasons.append(
                quarantine_reason(
                    file_name, int(row_number), field, config.meta["rule"], config.meta["message"]
                )
            )
    return reasons


def _rule_failures(
    batch: pa.RecordBatch, rules: tuple[RowRule, ...], file_name: str, run_date: date
) -> list[dict[str, object]]:
    reasons = []
    for rule in rules:
        failing = rule.failing(batch, run_date)
        reasons += quarantine_rows(batch, failing, file_name, rule.field, rule.rule, rule.message)
    return reasons


def _contact_failures(batch: pa.RecordBatch, file_name: str) -> list[dict[str, object]]:
    """After the roster fill: a name to print, and an email or a whole postal address."""
    valid = {name: pc.is_valid(batch.column(name)) for name in CONTACT}
    named = pc.and_(valid["first_name"], valid["last_name"])
    postal = valid["address_line"]
    for name in _POSTAL[1:]:
        postal = pc.and_(postal, valid[name])
    reachable = pc.or_(valid["email"], postal)
    reasons = []
    for mask, rule, message in (
        (named, "member_name", "member has no first and last name in the extract or roster"),
        (reachable, "member_contact", "member has neither an email nor a complete postal address"),
    ):
        reasons += quarantine_rows(batch, pc.invert(mask), file_name, "member_id", rule, message)
    return reasons


# Lines that repeat: claims by claim, line and status (the first stays); rosters by member
# (the last stays: a later row is the newer one).
_DUPLICATE_KEYS = {"claims": ["claim_id", "line_number", "claim_status"], "roster": ["member_id"]}
_FINGERPRINT = np.dtype([("hash", np.uint64), ("row", np.int64)])


def _fingerprints(batch: pa.RecordBatch, keys: list[str]) -> np.ndarray:
    """(64-bit hash of the key columns, row number) per row: 16 bytes a row, whatever the keys."""
    text = [pc.fill_null(pc.cast(batch.column(k), pa.string()), "\x00") for k in keys]
    joined = pc.binary_join_element_wise(*text, "\x1f") if len(text) > 1 else text[0]
    out = np.empty(batch.num_rows, dtype=_FINGERPRINT)
    out["hash"] = pd.util.hash_array(joined.to_numpy(zero_copy_only=False))
    out["row"] = batch.column(ROW).to_numpy()
    return out


def _drop_duplicates(
    accepted: Path, kind: str, file_name: str, fingerprints: np.ndarray, keyring: Keyring
) -> list[dict[str, object]]:
    """Quarantine repeated lines and rewrite the accepted file without them.

    Candidates come from equal fingerprints (sorted, no hash table over the whole file); each is
    confirmed on its real key values, so a hash collision never drops a line.
    """
    order = np.argsort(fingerprints, order=["hash", "row"], kind="stable")
    ranked = fingerprints[order]
    same_as_previous = ranked["hash"][1:] == ranked["hash"][:-1]
    if not same_as_previous.any():
        return []
    keys = _DUPLICATE_KEYS[kind]
    in_group = np.zeros(len(ranked), dtype=bool)
    in_group[1:] |= same_as_previous
    in_group[:-1] |= same_as_previous
    candidates = pa.array(ranked["row"][in_group])
    rows = read_table(
        accepted, keyring, columns=[*keys, ROW], filters=pc.is_in(pc.field(ROW), candidates)
    )
    # Among rows with equal keys the first (claims) or the last (rosters) stays.
    agg = "min" if kind == "claims" else "max"
    kept = rows.group_by(keys, use_threads=False).aggregate([(ROW, agg)])[f"{ROW}_{agg}"]
    dropped = pc.filter(rows[ROW], pc.invert(pc.is_in(rows[ROW], value_set=kept)))
    if len(dropped) == 0:
        return []
    rewritten = accepted.with_name(accepted.name + ".dedup")
    source = open_reader(accepted, keyring)
    with open_writer(rewritten, source.schema_arrow, keyring) as writer:
        for batch in source.iter_batches(batch_size=BATCH_ROWS):
            writer.write_batch(batch.filter(pc.invert(pc.is_in(batch.column(ROW), dropped))))
    rewritten.replace(accepted)
    rule, message = (
        ("duplicate_line", "same claim, line and status as an earlier row")
        if kind == "claims"
        else ("duplicate_member", "a later row has this member")
    )
    return [
        quarantine_reason(file_name, n, ",".join(keys), rule, message) for n in dropped.to_pylist()
    ]


def _empty_accepted(contract: Contract, kind: str) -> pa.Table:
    schema = contract.staging_schema.append(pa.field(ROW, pa.int64()))
    if kind == "claims":
        schema = schema.append(pa.field("edelivery_consent", pa.bool_())).append(
            pa.field("language", pa.string())
        )
    return schema.empty_table()
