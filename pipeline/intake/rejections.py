"""Rejection reports for insurers: what was wrong with a file they dropped, without its data.

outbox/<insurer>/<file>.rejected.csv lists every reason (row, field, rule, message) and
outbox/<insurer>/<file>.rejected.txt summarises them for a person. The file's name is shown
escaped (a control character cannot forge a line) and the reports are named by its safe stored
form (pipeline.intake.names).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.intake.names import shown, stored

_COLUMNS = ["row_number", "field", "rule", "message"]


def write_rejection_report(
    outbox: Path,
    *,
    insurer: str,
    file_name: str,
    sha256: str | None,
    reason: str,
    quarantine: pa.Table | None,
) -> Path:
    """Write the report pair (the summary alone when there are no row reasons: a file refused
    or rejected whole, its sha256 None when it was not read); returns the summary's path."""
    folder = outbox / insurer
    folder.mkdir(parents=True, exist_ok=True)
    name = stored(file_name)
    lines = [
        f"File:     {shown(file_name)}",
        f"SHA-256:  {sha256 or '(not read)'}",
        f"Verdict:  rejected: {reason}",
        "",
        "Nothing of this file was processed. Correct it and drop it again; a corrected file",
        "is a new version of the same name.",
    ]
    if quarantine is not None and quarantine.num_rows:
        pacsv.write_csv(quarantine.select(_COLUMNS), folder / f"{name}.rejected.csv")
        counts = (
            quarantine.group_by(["rule", "field", "message"])
            .aggregate([("row_number", "count_distinct"), ("row_number", "min")])
            .sort_by([("row_number_count_distinct", "descending")])
        )
        lines += ["", f"Problems ({name}.rejected.csv lists every row):", ""]
        lines += [
            f"  {r['row_number_count_distinct']:>8} rows  {r['rule']:<28} {r['field']:<24} "
            f"{r['message']} (first at row {r['row_number_min']})"
            for r in counts.to_pylist()
        ]
    summary = folder / f"{name}.rejected.txt"
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary
