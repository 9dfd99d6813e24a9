"""Remake the reference pictures of the EOB document: one PNG per document template (language),
both pages side by side, from a fictional member's statement with every kind of line.

Usage: .venv/bin/python docs/reference/make_pngs.py   (needs pdftoppm from poppler-utils)
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import replace
from datetime import date
from decimal import Decimal as D
from pathlib import Path

from PIL import Image

from pipeline.documents.render import render_statement_pdf
from pipeline.documents.statements import Accumulator, LineStatus, Member, Statement, StatementLine
from pipeline.resources import TEMPLATES_DIR

HERE = Path(__file__).resolve().parent
MEMBER = Member("M000123", "Ana María", "Pérez", "1234 Avenida de la Constitución, Apt 5B",
                "San José", "CA", "95112", "ana.perez@example.com", date(1980, 3, 4))  # fmt: skip
LINES = (
    StatementLine("C1", 1, date(2026, 10, 2), "Valley Medical Group", "99213",
                  "Office visit, established patient", D("250.00"), D("180.00"), D("150.00"),
                  D("30.00"), copay=D("30.00"), adjustment_codes=("CO-45", "PR-3")),
    StatementLine("C2", 1, date(2026, 10, 9), "Clínica Núñez & Hijos, S.C.", "80053", None,
                  D("120.00"), D("0.00"), D("0.00"), D("0.00"), status=LineStatus.DENIED,
                  adjustment_codes=("CO-197", "N130")),
    StatementLine("C3", 1, date(2026, 10, 9), "Valley Imaging Center", "73721", "MRI of knee",
                  D("-838.17"), D("-746.04"), D("-746.04"), D("0.00"),
                  status=LineStatus.REVERSED, adjustment_codes=("CR-129",)),
    StatementLine("C4", 1, date(2026, 10, 20), "Valley Imaging Center", "73721", "MRI of knee",
                  D("838.17"), D("746.04"), D("546.04"), D("200.00"), deductible=D("150.00"),
                  coinsurance=D("50.00"), adjustment_codes=("CO-45", "PR-1", "PR-2", "XY-999")),
)  # fmt: skip


def main() -> None:
    for template in sorted(TEMPLATES_DIR.glob("eob_document.*.toml")):
        language = template.name.split(".")[1]
        statement = Statement("s0a1b2c3d4e5f60718293a4b5", replace(MEMBER, language=language),
                              date(2026, 10, 2), date(2026, 10, 20), LINES,
                              Accumulator(D("1500.00"), D("650.00")),
                              Accumulator(D("6000.00"), D("1230.50")))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            pdf = Path(tmp) / "eob.pdf"
            render_statement_pdf(statement, plan_name="Example Health Plan", out_path=pdf)
            subprocess.run(["pdftoppm", "-png", "-r", "60", pdf, Path(tmp) / "p"], check=True)
            pages = [Image.open(p) for p in sorted(Path(tmp).glob("p-*.png"))]
            sheet = Image.new("RGB", (sum(p.width for p in pages) + 10 * (len(pages) - 1),
                                      max(p.height for p in pages)), "#888888")  # fmt: skip
            x = 0
            for page in pages:
                sheet.paste(page, (x, 0))
                x += page.width + 10
            sheet.save(HERE / f"eob_document.{language}.png", optimize=True)


if __name__ == "__main__":
    main()
