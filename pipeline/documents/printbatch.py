"""Print channel: one print-ready batch PDF per run and a manifest for the mail vendor.

Statements are concatenated in the order given, each padded to an even page count so that, on
a duplex printer, every statement starts on its own sheet and the vendor can split the stream
by the manifest's page ranges. The manifest (CSV) gives, per mail piece: sequence, statement id
(also the barcode on its first page), first page in the batch, pages, sheets, and ZIP code for
presort. Both files are PHI: the caller writes them encrypted at rest.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass

from pypdf import PdfReader, PdfWriter
from reportlab.lib.pagesizes import LETTER

MANIFEST_COLUMNS = ("sequence", "statement_id", "first_page", "pages", "sheets", "postal_code")


@dataclass(frozen=True)
class PrintPiece:
    statement_id: str
    postal_code: str
    pdf: bytes


@dataclass(frozen=True)
class PrintBatch:
    pdf: bytes
    manifest: bytes
    pieces: int
    pages: int


def build_print_batch(pieces: Iterable[PrintPiece]) -> PrintBatch:
    writer = PdfWriter()
    rows = []
    for sequence, piece in enumerate(pieces, start=1):
        first_page = len(writer.pages) + 1
        reader = PdfReader(io.BytesIO(piece.pdf))
        writer.append(reader)
        pages = len(reader.pages)
        if pages % 2:
            writer.add_blank_page(*LETTER)
        rows.append((sequence, piece.statement_id, first_page, pages, (pages + 1) // 2,
                     piece.postal_code))  # fmt: skip
    pdf = io.BytesIO()
    writer.write(pdf)
    manifest = io.StringIO()
    table = csv.writer(manifest, lineterminator="\n")
    table.writerow(MANIFEST_COLUMNS)
    table.writerows(rows)
    return PrintBatch(pdf.getvalue(), manifest.getvalue().encode(), len(rows), len(writer.pages))


__all__ = ["MANIFEST_COLUMNS", "PrintBatch", "PrintPiece", "build_print_batch"]
