"""Ingest + validate of a synthetic extract, streamed in record batches, against a bare
pyarrow CSV read of the same file.

Prints one line: lines/s and seconds of ingest (typing) + validation (GX suite, row rules,
duplicates), the same for pyarrow.csv.read_csv alone (no typing, no rules), their ratio, and
the CPU seconds (user + system, all threads) of ingest + validation, the CPU seconds of
archiving the extract encrypted (what the ingest step does after parsing a file), and the peak
RSS of this process (the extract is generated in a child process first).
Usage: python benchmarks/ingest_validate.py [LINES]   (default 5000000; goal <= 120 s, <= 1.5 GB)
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow.csv as pacsv

from pipeline.intake.ingest import ingest_file
from pipeline.intake.validate import load_suite, validate_file
from pipeline.records.atrest import encrypt_file, new_key_line, parse_keys
from pipeline.records.contracts import load_contract


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000_000
    with tempfile.TemporaryDirectory() as tmp:
        extract = Path(tmp) / "extract.csv"
        subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from pipeline.ops.synthetic import generate_extract; "
             "generate_extract(Path(sys.argv[1]), int(sys.argv[2]))", str(extract), str(lines)],
            check=True,
        )  # fmt: skip
        load_suite("claim_line")  # the GX context is built once per process, outside the timing
        # The intermediates are encrypted at rest as in the runner (atrest_parquet).
        keyring = parse_keys(new_key_line("bench"), source="benchmark")

        started = time.perf_counter()
        for _ in pacsv.open_csv(extract):
            pass
        baseline = time.perf_counter() - started

        started, cpu_started = time.perf_counter(), _cpu_seconds()
        result = ingest_file(extract, parsed_out=Path(tmp) / "parsed.parquet",
                             quarantine_out=Path(tmp) / "pq.parquet", fmt="csv", columns={},
                             contract=load_contract("claim_line"), keyring=keyring)  # fmt: skip
        typed = time.perf_counter()
        verdict = validate_file(
            kind="claims", file_name=extract.name, parsed=Path(tmp) / "parsed.parquet",
            parse_quarantine=Path(tmp) / "pq.parquet", accepted_out=Path(tmp) / "acc.parquet",
            quarantine_out=Path(tmp) / "q.parquet", rows_in=result.rows_in,
            run_date=date(2026, 11, 22), roster=None, max_bad_row_share=1.0, keyring=keyring,
        )  # fmt: skip
        ours, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
        cpu_started = _cpu_seconds()
        encrypt_file(extract, Path(tmp) / "archived.csv", keyring, "archive/bench/extract.csv")
        archive_cpu = _cpu_seconds() - cpu_started
        extract_mb = extract.stat().st_size / 1e6

    assert verdict.rows_in == lines == verdict.accepted + verdict.quarantined
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"ingest+validate: {lines / ours:,.0f} lines/s ({lines:,} lines in {ours:.1f} s: ingest "
        f"{typed - started:.1f} s, validate {ours - (typed - started):.1f} s; "
        f"{verdict.accepted:,} accepted, {verdict.quarantined:,} quarantined; CPU {cpu:.1f} s); "
        f"pyarrow streaming "
        f"read_csv baseline {lines / baseline:,.0f} lines/s; ratio {ours / baseline:.1f}x; "
        f"archive encrypted: CPU {archive_cpu:.2f} s for {extract_mb:,.0f} MB; "
        f"peak RSS {peak_mb:,.0f} MB"
    )


def _cpu_seconds() -> float:
    # On the shared machine wall-clock depends on the neighbours; CPU time much less.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
