"""Print channel: a duplex-ready batch and a manifest whose page ranges split it back."""

from __future__ import annotations

import csv
import dataclasses
import io

from pypdf import PdfReader

from pipeline.documents.printbatch import MANIFEST_COLUMNS, PrintPiece, build_print_batch
from pipeline.documents.render import render_statement
from tests.test_render import line, statement


def test_batch_pads_each_piece_to_whole_sheets_and_manifest_splits_it() -> None:
    short = render_statement(statement([line(1)]), plan_name="Plan")[0]
    long = dataclasses.replace(statement([line(n) for n in range(60)]), statement_id="s2")
    long_pdf = render_statement(long, plan_name="Plan")[0]
    pieces = [PrintPiece("s1", "95112", short), PrintPiece("s2", "10001", long_pdf),
              PrintPiece("s3", "60601", short)]  # fmt: skip

    batch = build_print_batch(pieces)

    rows = list(csv.DictReader(io.StringIO(batch.manifest.decode())))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert [r["statement_id"] for r in rows] == ["s1", "s2", "s3"]
    reader = PdfReader(io.BytesIO(batch.pdf))
    assert len(reader.pages) == batch.pages
    for row in rows:
        first, pages, sheets = int(row["first_page"]), int(row["pages"]), int(row["sheets"])
        # Every piece starts on the front of a sheet (odd page number in a duplex stream).
        assert first % 2 == 1 and sheets == (pages + 1) // 2
        text = reader.pages[first - 1].extract_text()
        assert "Page 1 of" in text
        last = reader.pages[first + pages - 2].extract_text()
        assert f"Page {pages} of {pages}" in last
    assert batch.pages == sum(2 * int(r["sheets"]) for r in rows)
