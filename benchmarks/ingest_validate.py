"""Ingest + validate throughput on a synthetic extract, against a bare pyarrow CSV read.

Prints one line: rows/s of parse + GX validation, the same for pyarrow.csv.read_csv of the same
file (the floor: no typing, no rules), their ratio, and peak RSS.
Usage: python benchmarks/ingest_validate.py [ROWS]   (default 200000)
"""

from __future__ import annotations

import csv
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.csv as pacsv

from pipeline.ingest import parse_claim_lines
from pipeline.validate import load_suite, validate_claim_lines

SAMPLE = Path(__file__).resolve().parent.parent / "data_samples/landing/acme/claims_2026-10.csv"


def synthetic_extract(path: Path, rows: int) -> None:
    """The sample's rows repeated with distinct member and claim ids."""
    with SAMPLE.open(encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        fields = list(reader.fieldnames or [])
        template = [row for row in reader if None not in row.values()]
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for n in range(rows):
            row = template[n % len(template)]
            writer.writerow({**row, "member_id": f"B{n // 4:09d}", "claim_id": f"K{n:010d}"})


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "extract.csv"
        synthetic_extract(path, rows)
        load_suite()  # build the suite and GX context outside the timed part

        started = time.perf_counter()
        pacsv.read_csv(path)
        baseline = time.perf_counter() - started

        started = time.perf_counter()
        parsed = parse_claim_lines(path)
        checked = validate_claim_lines(parsed.rows, file_name=path.name)
        ours = time.perf_counter() - started

    assert parsed.rows_in == rows
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"ingest+validate: {rows / ours:,.0f} rows/s ({rows:,} rows in {ours:.2f} s, "
        f"{checked.accepted.num_rows:,} accepted); pyarrow read_csv baseline "
        f"{rows / baseline:,.0f} rows/s; ratio {ours / baseline:.1f}x; peak RSS {peak_mb:,.0f} MB"
    )


if __name__ == "__main__":
    main()
