"""Render stage: the PDF says the right things, in the right places, on every page.

Statements are built here with synthetic members; text is read back with pypdf.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pypdf import PdfReader
from reportlab.pdfbase.pdfmetrics import stringWidth

from pipeline.documents import wording as wording_module
from pipeline.documents.codes import load_code_book
from pipeline.documents.layout import COLUMN_WIDTHS
from pipeline.documents.page import MARGIN
from pipeline.documents.render import render_all, render_statement_pdf
from pipeline.documents.statements import Accumulator, LineStatus, Member, Statement, StatementLine
from pipeline.documents.wording import format_money, load_branding, load_wording, wording_for
from pipeline.errors import ConfigError
from pipeline.records.atrest import parse_keys, read_decrypted

PLAN = "Example Health Plan"
HEADER_ROW = "Service date Provider Service Billed Allowed Plan paid You may owe"

MEMBER = Member(
    member_id="M000123",
    first_name="Ana María",
    last_name="Pérez",
    address_line="1234 Avenida de la Constitución, Apt 5B",
    city="San José",
    state="CA",
    postal_code="95112",
    email="ana.perez@example.com",
)


def line(
    number: int,
    *,
    billed: str = "100.00",
    paid: str = "80.00",
    owe: str = "20.00",
    provider: str = "Valley Medical Group",
    description: str | None = "Office visit, established patient",
) -> StatementLine:
    return StatementLine(
        claim_id=f"C{number:05d}",
        line_number=1,
        service_date=date(2025, 1, 2) + timedelta(days=number),
        provider_name=provider,
        procedure_code=f"99{number % 1000:03d}",
        service_description=description,
        billed_amount=Decimal(billed),
        allowed_amount=Decimal(paid) + Decimal(owe),
        plan_paid=Decimal(paid),
        member_responsibility=Decimal(owe),
    )


def statement(lines: list[StatementLine], member: Member = MEMBER) -> Statement:
    return Statement(
        statement_id="s0a1b2c3d4e5f60718293a4b5",
        member=member,
        period_start=min(item.service_date for item in lines),
        period_end=max(item.service_date for item in lines),
        lines=tuple(lines),
    )


def render_pages(tmp_path: Path, stmt: Statement, **kwargs: Any) -> tuple[int, list[str]]:
    """Render; return the reported page count and each page's text, whitespace collapsed."""
    out = tmp_path / "eob.pdf"
    count = render_statement_pdf(stmt, plan_name=PLAN, out_path=out, **kwargs)
    reader = PdfReader(out)
    assert count == len(reader.pages)
    return count, [" ".join(page.extract_text().split()) for page in reader.pages]


def test_one_page_statement_shows_amounts_totals_and_fixed_text(tmp_path: Path) -> None:
    stmt = statement([
        line(1, billed="1234.50", paid="1000.00", owe="234.50"),
        line(2, billed="200.00", paid="150.25", owe="49.75"),
        line(3, billed="15.25", paid="0.00", owe="15.25"),
    ])  # fmt: skip

    count, pages = render_pages(tmp_path, stmt)

    # The notices (nondiscrimination, language taglines) take the second page.
    assert count == 2
    text = pages[0]
    assert "$1,234.50 $1,234.50 $1,000.00 $234.50" in text
    assert "$200.00 $200.00 $150.25 $49.75" in text
    assert "$15.25 $15.25 $0.00 $15.25" in text
    assert "Totals $1,449.75 $1,449.75 $1,150.25 $299.50" in text
    assert "You may owe your provider $299.50" in text
    assert "THIS IS NOT A BILL" in text
    assert "s0a1b2c3d4e5f60718293a4b5" in text
    assert "Service dates: 01/03/2025 to 01/05/2025" in text
    assert "Page 1 of 2" in text and "Page 2 of 2" in pages[1]
    assert HEADER_ROW in text
    assert PLAN in text
    everything = " ".join(pages)
    assert "Your right to appeal" in everything and "Questions?" in everything
    assert "Nondiscrimination notice" in everything
    assert "ATENCIÓN: si habla español" in everything


def test_member_address_block_and_accented_text_survive_extraction(tmp_path: Path) -> None:
    stmt = statement([line(1, provider="Clínica Núñez & Hijos, S.C.")])

    _, pages = render_pages(tmp_path, stmt)

    assert "Ana María Pérez 1234 Avenida de la Constitución, Apt 5B San José, CA 95112" in pages[0]
    assert "Clínica Núñez & Hijos, S.C." in pages[0]


def test_address_block_sits_in_the_envelope_window(tmp_path: Path) -> None:
    out = tmp_path / "eob.pdf"
    render_statement_pdf(statement([line(1)]), plan_name=PLAN, out_path=out)
    positions = {
        text.strip(): (tm[4] + cm[4], tm[5] + cm[5])
        for text, cm, tm in _fragments(PdfReader(out).pages[0])
    }
    x, y = positions["Ana María Pérez"]
    page_height = 792
    # #10 window: about 0.75in-4.75in from the left, 2in-3in from the top of the page.
    assert 0.7 * 72 <= x <= 1.0 * 72
    assert 2.0 * 72 <= page_height - y <= 2.4 * 72
    _, last_y = positions["San José, CA 95112"]
    assert page_height - last_y <= 3.0 * 72


def test_service_without_description_gets_generic_wording(tmp_path: Path) -> None:
    stmt = statement([line(7, description=None), line(8, description="  ")])

    _, pages = render_pages(tmp_path, stmt)

    assert "99007 Medical service" in pages[0]
    assert "99008 Medical service" in pages[0]


def test_member_data_is_text_not_markup(tmp_path: Path) -> None:
    provider = "Smith & Jones <b>Pediatrics</b>"
    stmt = statement([line(1, provider=provider, description="X-ray <2 views")])

    _, pages = render_pages(tmp_path, stmt)

    assert provider in pages[0]
    assert "X-ray <2 views" in pages[0]


def test_long_statement_spans_pages_with_numbered_footer_and_repeated_header(
    tmp_path: Path,
) -> None:
    # Each line owes a distinct amount, so every line can be found exactly once.
    lines = [line(i, owe=f"{i}.{i % 100:02d}", paid="10.00", billed="1.00") for i in range(200)]
    stmt = statement(lines)

    count, pages = render_pages(tmp_path, stmt)

    assert count >= 4
    for number, text in enumerate(pages, start=1):
        assert f"Page {number} of {count}" in text
        assert "s0a1b2c3d4e5f60718293a4b5" in text
    assert all("(continued)" in text for text in pages[1:])
    everything = " ".join(pages)
    for item in lines:
        owe = format_money(item.member_responsibility)
        allowed = format_money(item.allowed_amount)
        assert everything.count(f"$1.00 {allowed} $10.00 {owe} ") == 1
    total = format_money(stmt.total_member_responsibility)
    allowed_total = format_money(stmt.total_allowed)
    assert f"Totals $200.00 {allowed_total} $2,000.00 {total}" in everything
    totals_page = next(n for n, text in enumerate(pages) if "Totals" in text)
    assert all(HEADER_ROW in text for text in pages[: totals_page + 1])


def test_long_provider_name_wraps_inside_its_column(tmp_path: Path) -> None:
    name = (
        "Northern Regional Comprehensive Orthopaedic and Sports Medicine Surgical "
        "Associates of the Greater Metropolitan Area Limited Liability Partnership "
        "Zzqqzzqqzzqqzzqqzzqqzzqqzzqqzzqqzzqqzzqqzzqqzzqqzzqq"
    )
    out = tmp_path / "eob.pdf"
    render_statement_pdf(statement([line(1, provider=name)]), plan_name=PLAN, out_path=out)

    page = PdfReader(out).pages[0]
    text = page.extract_text()
    assert "".join(name.split()) in "".join(text.split())
    # Wrapped: the name is spread over several lines of the cell...
    assert sum(1 for row in text.splitlines() if row.strip() and row.strip() in name) >= 3
    # ...and no piece of it crosses into the next column.
    left = MARGIN + COLUMN_WIDTHS[0]
    right = left + COLUMN_WIDTHS[1]
    pieces = [
        (tm[4] + cm[4], piece.strip())
        for piece, cm, tm in _fragments(page)
        if piece.strip() and piece.strip() in name
    ]
    assert len(pieces) >= 3
    for x, piece in pieces:
        assert left <= x and x + stringWidth(piece, "Helvetica", 8.5) <= right, piece


def test_pdf_metadata_carries_no_member_data(tmp_path: Path) -> None:
    out = tmp_path / "eob.pdf"
    render_statement_pdf(statement([line(1)]), plan_name=PLAN, out_path=out)

    reader = PdfReader(out)
    assert reader.metadata is not None
    assert reader.metadata.title == "Explanation of Benefits"
    assert reader.metadata.author == PLAN
    assert str(reader.root_object["/Lang"]) == "en-US"
    info = " ".join(str(value) for value in reader.metadata.values())
    for field in ("Ana", "Pérez", "M000123", "San José", "s0a1b2c3d4e5f60718293a4b5"):
        assert field not in info


def test_wording_comes_from_the_wording_object(tmp_path: Path) -> None:
    wording = dataclasses.replace(
        load_wording("en"),
        not_a_bill="ESTO NO ES UNA FACTURA",
        footer="Página {page} de {pages}",
        date_format="%d/%m/%Y",
    )

    _, pages = render_pages(tmp_path, statement([line(1)]), wording=wording)

    assert "ESTO NO ES UNA FACTURA" in pages[0]
    assert "THIS IS NOT A BILL" not in pages[0]
    assert "Página 1 de 2" in pages[0]
    assert "03/01/2025" in pages[0]


def test_render_replaces_the_output_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "eob.pdf"
    out.write_bytes(b"stale")

    render_statement_pdf(statement([line(1)]), plan_name=PLAN, out_path=out)

    assert out.read_bytes().startswith(b"%PDF-")
    assert [p.name for p in tmp_path.iterdir()] == ["eob.pdf"]


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("0", "$0.00"),
        ("7.5", "$7.50"),
        ("1234.56", "$1,234.56"),
        ("1234567.891", "$1,234,567.89"),
        ("0.005", "$0.01"),
        ("-12.5", "-$12.50"),
        ("-0.001", "$0.00"),
    ],
)
def test_format_money(amount: str, expected: str) -> None:
    assert format_money(Decimal(amount)) == expected


def test_english_wording_loads_complete() -> None:
    wording = load_wording("en")
    assert wording is load_wording("en")  # read once per process
    assert all(getattr(wording, f.name).strip() for f in dataclasses.fields(wording))
    assert wording.summary.format(amount="$1.00") == "You may owe your provider <b>$1.00</b>"


@pytest.mark.parametrize("language", ["../en", "en/../../x", "", "EN"])
def test_load_wording_refuses_a_bad_language_code(language: str) -> None:
    with pytest.raises(ConfigError):
        load_wording(language)


def test_load_wording_refuses_a_missing_file() -> None:
    with pytest.raises(ConfigError, match="eob_document.zz.toml"):
        load_wording("zz")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda text: text.replace('not_a_bill = "THIS IS NOT A BILL"\n', ""), "missing keys"),
        (lambda text: text + 'colour = "blue"\n', "unknown keys"),
        (lambda text: text.replace("{amount}", "{amt}"), "key summary: unknown placeholders"),
        (lambda text: text.replace("Page {page}", "Page {page"), "key footer"),
        (lambda text: text.replace('title = "Explanation of Benefits"', "title = 3"), "key title"),
        (lambda text: text.replace("<b>{amount}</b>", "<u>{amount}</u>"), "key summary: unsup"),
    ],
)
def test_load_wording_refuses_a_broken_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any, message: str
) -> None:
    english = (wording_module.TEMPLATES_DIR / "eob_document.en.toml").read_text(encoding="utf-8")
    (tmp_path / "eob_document.xx.toml").write_text(change(english), encoding="utf-8")
    monkeypatch.setattr(wording_module, "TEMPLATES_DIR", tmp_path)
    load_wording.cache_clear()
    try:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_wording("xx")
    finally:
        load_wording.cache_clear()


def _fragments(page: Any) -> list[tuple[str, list[float], list[float]]]:
    found: list[tuple[str, list[float], list[float]]] = []

    def visit(text: str, cm: list[float], tm: list[float], *_: object) -> None:
        if text.strip():
            found.append((text, cm, tm))

    page.extract_text(visitor_text=visit)
    return found


# Golden statements with the contract-v2 detail -------------------------------------------


def detailed_statement(language: str) -> Statement:
    member = dataclasses.replace(MEMBER, language=language)
    return Statement(
        statement_id="s0a1b2c3d4e5f60718293a4b5",
        member=member,
        period_start=date(2026, 10, 2),
        period_end=date(2026, 10, 20),
        lines=(
            StatementLine(
                "C1", 1, date(2026, 10, 2), "Valley Medical Group", "99213", "Office visit",
                Decimal("250.00"), Decimal("180.00"), Decimal("150.00"), Decimal("30.00"),
                copay=Decimal("30.00"), adjustment_codes=("CO-45", "PR-3"),
            ),
            StatementLine(
                "C2", 1, date(2026, 10, 9), "Valley Imaging Center", "80053", None,
                Decimal("120.00"), Decimal("0.00"), Decimal("0.00"), Decimal("0.00"),
                status=LineStatus.DENIED, adjustment_codes=("CO-197", "N130"),
            ),
            StatementLine(
                "C3", 1, date(2026, 10, 9), "Valley Imaging Center", "73721", "MRI of knee",
                Decimal("-838.17"), Decimal("-746.04"), Decimal("-746.04"), Decimal("0.00"),
                status=LineStatus.REVERSED, adjustment_codes=("CR-129", "ZZ-9999"),
            ),
        ),
        deductible=Accumulator(Decimal("1500.00"), Decimal("650.00")),
        out_of_pocket=Accumulator(Decimal("6000.00"), Decimal("1230.50")),
    )  # fmt: skip


def test_golden_english_statuses_codes_and_accumulators(tmp_path: Path) -> None:
    count, pages = render_pages(tmp_path, detailed_statement("en"))
    text = " ".join(pages)

    assert count == 2
    assert "$250.00 $180.00 $150.00 $30.00" in text
    assert "Network discount $70.00 · Copay $30.00" in text
    assert "Denied: the plan did not pay for this service" in text
    assert "Reversal: this takes back an earlier payment" in text
    assert "-$838.17 -$746.04 -$746.04 $0.00" in text
    assert "Totals -$468.17 -$566.04 -$596.04 $30.00" in text
    assert "You may owe your provider $30.00" in text
    # A denied line allows nothing: no "discount" is claimed for it.
    assert "Network discount $120.00" not in text
    assert "Deductible: $650.00 met of $1,500.00; $850.00 left to meet." in text
    assert "Out-of-pocket maximum: $1,230.50 met of $6,000.00; $4,769.50 left" in text
    explained = {
        "CO-45": "The charge is more than the plan's allowed amount for this service. Your "
        "provider has agreed not to bill you for this amount.",
        "PR-3": "This is your copay for the service. You may owe this amount to your provider.",
        "CO-197": "The service needed approval from the plan before it was given",
        "N130": "Check your plan documents for the limits and exclusions",
        "CR-129": "An earlier payment for this service is being corrected.",
        # Unknown code: shown, with the generic explanation.
        "ZZ-9999": "An adjustment was made to this claim.",
    }
    assert "What the codes mean" in text
    for code, explanation in explained.items():
        assert f"{code}: {explanation}" in text


def test_golden_spanish_is_chosen_by_the_member_language(tmp_path: Path) -> None:
    count, pages = render_pages(tmp_path, detailed_statement("es"))
    text = " ".join(pages)

    assert count == 2
    assert "Explicación de Beneficios" in text and "ESTO NO ES UNA FACTURA" in text
    assert "Es posible que deba a su proveedor $30.00" in text
    assert "Fechas de servicio: del 02/10/2026 al 20/10/2026" in text
    assert "Denegada: el plan no pagó este servicio" in text
    assert "Reversión: esto anula un pago anterior" in text
    assert "CO-45: El cargo es mayor que la cantidad permitida" in text
    assert "ZZ-9999: Se hizo un ajuste a esta reclamación." in text
    assert "Deducible: $650.00 cubiertos de $1,500.00; faltan $850.00." in text
    assert "Aviso de no discriminación" in text and "Su derecho a apelar" in text
    assert "Página 1 de 2" in pages[0] and "Página 2 de 2" in pages[1]
    assert "You may owe" not in text
    reader = PdfReader(tmp_path / "eob.pdf")
    assert str(reader.root_object["/Lang"]) == "es-US"
    assert reader.metadata is not None and reader.metadata.title == "Explicación de Beneficios"


@pytest.mark.parametrize("preference", ["fr", "", None, "../es", "ES"])
def test_language_without_wording_falls_back_to_english(preference: str | None) -> None:
    expected = "es" if preference == "ES" else "en"
    assert wording_for(preference).language_tag.startswith(expected)


def test_statement_id_barcode_scans_back_from_the_printed_page(tmp_path: Path) -> None:
    out = tmp_path / "eob.pdf"
    render_statement_pdf(statement([line(1)]), plan_name=PLAN, out_path=out)
    # Print-like: the page as pixels, read by a real barcode scanner (zbar).
    subprocess.run(["pdftoppm", "-png", "-r", "200", "-f", "1", "-l", "1", out, tmp_path / "p"],
                   check=True)  # fmt: skip
    scanned = subprocess.run(["zbarimg", "--raw", "-q", tmp_path / "p-1.png"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    assert scanned.stdout.split() == ["s0a1b2c3d4e5f60718293a4b5"]


@given(st.text(max_size=12))
def test_every_code_gets_a_non_empty_explanation(code: str) -> None:
    for language in ("en", "es"):
        assert load_code_book(language).explain(code).strip()


@pytest.mark.parametrize(
    ("code", "start"),
    [
        ("CO-45", "The charge is more"),
        ("co 45", "The charge is more"),
        ("PR1", "This amount went toward your deductible. You may owe"),
        ("045", "The charge is more"),
        ("N130", "Check your plan documents"),
        ("MA130", "The claim has incomplete"),
        ("N9999", "An additional remark applies"),
        ("XX-45", "An adjustment was made"),
    ],
)
def test_code_explanations(code: str, start: str) -> None:
    assert load_code_book("en").explain(code).startswith(start)


def test_bundled_spanish_mapping_covers_every_english_code() -> None:
    english, spanish = load_code_book("en"), load_code_book("es")
    assert english.carc.keys() == spanish.carc.keys()
    assert english.rarc.keys() == spanish.rarc.keys()
    assert english.groups.keys() == spanish.groups.keys()
    assert {f.name for f in dataclasses.fields(load_wording("es"))} == {
        f.name for f in dataclasses.fields(load_wording("en"))
    }


def test_render_all_over_processes_writes_every_statement_encrypted(tmp_path: Path) -> None:
    keyring = parse_keys(f"k1:{base64.b64encode(bytes(32)).decode()}", source="test")
    statements = [
        dataclasses.replace(statement([line(n)]), statement_id=f"s{n:024d}") for n in range(5)
    ]

    shards = list(
        render_all(statements, plan_name=PLAN, out_dir=tmp_path, keyring=keyring, workers=2,
                   passwords={"s" + "0" * 23 + "3": "secret"}, shard_size=2)
    )  # fmt: skip

    assert [len(shard) for shard in shards] == [2, 2, 1]
    for done in (item for shard in shards for item in shard):
        reader = PdfReader(io.BytesIO(read_decrypted(done.path, keyring, done.statement_id)))
        assert reader.is_encrypted == done.statement_id.endswith("3")
        if reader.is_encrypted:
            assert reader.decrypt("secret")
        assert len(reader.pages) == done.pages


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda text: text.replace('logo = "logo.png"', 'logo = "missing.png"'), "key logo"),
        (lambda text: text.replace('"#1F3A5F"', '"navy-ish"'), "key primary_color: not a"),
        (lambda text: text + 'motto = "x"\n', "expected keys"),
    ],
)
def test_load_branding_refuses_a_broken_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any, message: str
) -> None:
    original = wording_module.TEMPLATES_DIR / "branding.toml"
    (tmp_path / "branding.toml").write_text(change(original.read_text(encoding="utf-8")))
    (tmp_path / "logo.png").write_bytes((wording_module.TEMPLATES_DIR / "logo.png").read_bytes())
    monkeypatch.setattr(wording_module, "TEMPLATES_DIR", tmp_path)
    load_branding.cache_clear()
    try:
        with pytest.raises(ConfigError, match=message):
            load_branding()
    finally:
        load_branding.cache_clear()


# Renders many statements over two processes, and says so once the first shard is written.
_RENDER_MANY = """
import base64, dataclasses, sys
from datetime import date
from decimal import Decimal
from pathlib import Path
from pipeline.documents.render import render_all
from pipeline.documents.statements import Member, Statement, StatementLine
from pipeline.records.atrest import parse_keys

member = Member("M1", "Ana", "Perez", "1 Main St", "San Jose", "CA", "95112", "a@example.org")
line = StatementLine("C1", 1, date(2025, 1, 2), "Valley Medical Group", "99213", "Office visit",
                     Decimal("100.00"), Decimal("80.00"), Decimal("60.00"), Decimal("20.00"))
statements = [Statement(f"s{n:024d}", member, line.service_date, line.service_date, (line,) * 6)
              for n in range(20000)]
keyring = parse_keys(f"k1:{base64.b64encode(bytes(32)).decode()}", source="test")
for _ in render_all(statements, plan_name="Plan", out_dir=Path(sys.argv[1]), keyring=keyring,
                    workers=2, shard_size=20):
    print("rendering", flush=True)
"""


def _children_of(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                row.split(":\t", 1) for row in status.read_text().splitlines() if ":\t" in row
            )
        except OSError:  # the process ended while we looked
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_render_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    # A `kill -9` of the render step must not leave its workers rendering (or waiting) on.
    child = subprocess.Popen(
        [sys.executable, "-c", _RENDER_MANY, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    workers: set[int] = set()
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "rendering\n"
        workers = _children_of(child.pid)
        assert len(workers) >= 2
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 2
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _running(pid)]
    finally:
        child.kill()
        child.wait()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
