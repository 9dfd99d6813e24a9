"""Validate stage: the Great Expectations suite in schemas/expectations/ plus the contract's
required fields, run over a parsed file; rows that fail any rule are quarantined with reasons.

Only failing row numbers are taken from GX results: the unexpected values it also returns
are PHI and never leave this function.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contracts import SCHEMAS_DIR, Contract, load_contract
from pipeline.ingest import ROW, quarantine_schema

# GX phones home unless told not to; this pipeline makes no network traffic.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
import great_expectations as gx  # noqa: E402
from great_expectations.core.batch_definition import BatchDefinition  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatedFile:
    accepted: pa.Table
    quarantine: pa.Table


@cache
def load_suite(name: str = "claim_line") -> gx.ExpectationSuite:
    """Required-field checks from the contract, then the suite file's rules."""
    contract = load_contract(name)
    raw = json.loads((SCHEMAS_DIR / "expectations" / f"{name}.json").read_text(encoding="utf-8"))
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
def _batch_definition() -> BatchDefinition[Any]:
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("claims").add_dataframe_asset("claim_lines")
    return asset.add_batch_definition_whole_dataframe("whole_file")


def validate_claim_lines(
    rows: pa.Table, *, file_name: str, contract: Contract | None = None
) -> ValidatedFile:
    """Split parsed rows (with the _row column) into accepted rows and quarantine reasons."""
    contract = contract or load_contract("claim_line")
    suite = load_suite(contract.name)
    if rows.num_rows == 0:
        return ValidatedFile(rows.drop_columns([ROW]), quarantine_schema().empty_table())
    frame = rows.drop_columns([ROW]).to_pandas()
    for field in contract.fields:
        if field.type == "decimal":
            # GX compares numbers; the exact decimals stay in the Arrow table.
            frame[field.name] = frame[field.name].astype("float64")
    # An unnamed index makes GX report bare row numbers; a named one adds the row's values.
    frame.index = pd.Index(rows[ROW].to_numpy())
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
        # A two-column rule names both columns: either may be the wrong one.
        columns = kwargs.get("column") or f"{kwargs['column_A']},{kwargs['column_B']}"
        for row_number in outcome.result.get("unexpected_index_list") or []:
            reasons.append(
                {
                    "file_name": file_name,
                    "row_number": int(row_number),
                    "field": columns,
                    "rule": config.meta["rule"],
                    "message": config.meta["message"],
                }
            )
    quarantine = pa.Table.from_pylist(reasons, schema=quarantine_schema())
    failed_rows = pa.array(sorted({r["row_number"] for r in reasons}), pa.int64())
    accepted = rows.filter(pc.invert(pc.is_in(rows[ROW], value_set=failed_rows)))
    log.info("validated %s: %d rows, %d failed", file_name, rows.num_rows, len(failed_rows))
    return ValidatedFile(accepted.drop_columns([ROW]), quarantine)
