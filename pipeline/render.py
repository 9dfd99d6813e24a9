"""Render stage: one Letter-size Explanation of Benefits PDF per statement.

All wording comes from templates/eob_document.<language>.toml (the member's language when it
exists, else English), code explanations from templates/adjustment_codes.<language>.toml and
logo, colours and contact details from templates/branding.toml; this module only lays them out.
Layout is fixed in points so that the member's address falls in the window of a #10 envelope
when the page is printed and folded in thirds (statements without an email go to print).
The built-in Helvetica fonts need no font files but only cover Latin-1: other characters
render as a box.
"""

from __future__ import annotations

import functools
import io
import string
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from reportlab.graphics.barcode.code128 import Code128
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import LETTER
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import inch
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    BaseDocTemplate,
    Frame,
    KeepTogether,
    PageTemplate,
    Paragraph,
    Table,
    TableStyle,
)

from pipeline.atrest import Keyring, write_atomically, write_encrypted
from pipeline.codes import load_code_book
from pipeline.errors import ConfigError
from pipeline.protect import protect_pdf
from pipeline.render_templates import (
    TEMPLATES_DIR,
    check_language,
    document_language,
    read_toml,
)
from pipeline.statements import LineStatus, Statement, StatementLine


@dataclass(frozen=True)
class Wording:
    """Every piece of text on the document, in one language (see the TOML for each key)."""

    language_tag: str
    date_format: str
    title: str
    not_a_bill: str
    member_name: str
    address_last_line: str
    statement_id: str
    period: str
    summary: str
    summary_note: str
    claims_heading: str
    column_service_date: str
    column_provider: str
    column_service: str
    column_billed: str
    column_allowed: str
    column_plan_paid: str
    column_you_may_owe: str
    service_line: str
    generic_service: str
    totals_label: str
    status_adjusted: str
    status_denied: str
    status_reversed: str
    status_voided: str
    share_deductible: str
    share_copay: str
    share_coinsurance: str
    share_not_covered: str
    share_discount: str
    line_codes: str
    accumulators_heading: str
    accumulator_deductible: str
    accumulator_out_of_pocket: str
    codes_heading: str
    code_explanation: str
    appeal_heading: str
    appeal_rights: str
    contact_heading: str
    contact: str
    appeal_address: str
    nondiscrimination_heading: str
    nondiscrimination: str
    taglines_heading: str
    taglines: str
    continued_header: str
    footer: str


# Placeholders each key may use; keys not listed take none. Checked at load time so that a
# typo in a translation fails once, before the batch, not as a KeyError on every statement.
_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "member_name": frozenset({"first_name", "last_name"}),
    "address_last_line": frozenset({"city", "state", "postal_code"}),
    "statement_id": frozenset({"statement_id"}),
    "period": frozenset({"start", "end"}),
    "summary": frozenset({"amount"}),
    "service_line": frozenset({"code", "description"}),
    "contact": frozenset({"plan_name", "phone", "website"}),
    "appeal_address": frozenset({"appeals_address"}),
    "nondiscrimination": frozenset({"plan_name", "phone"}),
    "taglines": frozenset({"phone"}),
    "share_deductible": frozenset({"amount"}),
    "share_copay": frozenset({"amount"}),
    "share_coinsurance": frozenset({"amount"}),
    "share_not_covered": frozenset({"amount"}),
    "share_discount": frozenset({"amount"}),
    "line_codes": frozenset({"codes"}),
    "accumulator_deductible": frozenset({"met", "limit", "remaining"}),
    "accumulator_out_of_pocket": frozenset({"met", "limit", "remaining"}),
    "code_explanation": frozenset({"code", "explanation"}),
    "continued_header": frozenset({"plan_name", "title"}),
    "footer": frozenset({"page", "pages"}),
}
_WORDING_KEYS = frozenset(f.name for f in fields(Wording))


@functools.cache
def load_wording(language: str = "en") -> Wording:
    """The wording of templates/eob_document.<language>.toml, read and checked once per process."""
    check_language(language)
    path = TEMPLATES_DIR / f"eob_document.{language}.toml"
    data = read_toml(path)
    missing = sorted(_WORDING_KEYS - data.keys())
    unknown = sorted(data.keys() - _WORDING_KEYS)
    if missing or unknown:
        raise ConfigError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: key {key}: expected a string")
        allowed = _PLACEHOLDERS.get(key, frozenset())
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as err:
            raise ConfigError(f"{path}: key {key}: {err}") from err
        if not used <= allowed:
            raise ConfigError(f"{path}: key {key}: unknown placeholders {sorted(used - allowed)}")
    return Wording(**data)


def wording_for(preference: str | None) -> Wording:
    """The wording in the member's preferred language, English when there is none in it."""
    return load_wording(document_language(preference))


@dataclass(frozen=True)
class Branding:
    logo: Path
    primary_color: str
    pale_color: str
    member_services_phone: str
    website: str
    appeals_address: str


@functools.cache
def load_branding() -> Branding:
    path = TEMPLATES_DIR / "branding.toml"
    raw = read_toml(path)
    try:
        branding = Branding(**{**raw, "logo": TEMPLATES_DIR / raw["logo"]})
    except (TypeError, KeyError) as err:
        raise ConfigError(f"{path}: expected keys {[f.name for f in fields(Branding)]}") from err
    for key in ("primary_color", "pale_color"):
        try:
            colors.HexColor(getattr(branding, key))
        except ValueError as err:
            raise ConfigError(f"{path}: key {key}: not a #RRGGBB colour") from err
    if not branding.logo.is_file():
        raise ConfigError(f"{path}: key logo: no file {branding.logo.name} in {TEMPLATES_DIR}")
    return branding


def format_money(amount: Decimal) -> str:
    """$1,234.56; a negative amount (a reversal) as -$1,234.56."""
    cents = amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents):,.2f}"


# --- Fixed layout, in points (1 inch = 72). Letter is 612 x 792. ---------------------------

PAGE_WIDTH, PAGE_HEIGHT = LETTER
MARGIN = 0.75 * inch
CONTENT_WIDTH = PAGE_WIDTH - 2 * MARGIN
# #10 window envelope: on a letter folded in thirds the window shows roughly 0.75in-4.75in
# from the left and 2in-3in from the top. The block sits in its upper left so that it stays
# visible when the letter shifts inside the envelope.
ADDRESS_LEFT = MARGIN
ADDRESS_TOP = 2.0 * inch
ADDRESS_LEADING = 14
# The flowing content starts under the window area on page 1 and under the header after.
FIRST_FRAME_TOP = 3.1 * inch
LATER_FRAME_TOP = 0.95 * inch
FRAME_BOTTOM = 0.8 * inch
FOOTER_BASELINE = 0.5 * inch

BRANDING = load_branding()
NAVY = colors.HexColor(BRANDING.primary_color)
PALE_BLUE = colors.HexColor(BRANDING.pale_color)
# Read once per process: every document embeds the same image.
_LOGO = ImageReader(str(BRANDING.logo))
LOGO_HEIGHT = 0.5 * inch
ZEBRA = colors.HexColor("#F4F6F8")
GREY = colors.HexColor("#555555")
RULE = colors.HexColor("#B8C4D0")

# Service date, provider, service, billed, allowed, plan paid, you may owe: sums to
# CONTENT_WIDTH. With 4pt cell padding, money columns fit $999,999.99 at 8.5pt and the English
# headers "Service date" and "You may owe" fit on one line; the text columns take the rest.
CELL_PADDING = 4
COLUMN_WIDTHS = (60.0, 96.0, 116.0, 56.0, 56.0, 56.0, 64.0)
assert abs(sum(COLUMN_WIDTHS) - CONTENT_WIDTH) < 0.01

# Styles are built once per process: documents only reference them.
_BODY = ParagraphStyle("eob-body", fontName="Helvetica", fontSize=9, leading=12)
_HEADING = ParagraphStyle(
    "eob-heading", fontName="Helvetica-Bold", fontSize=11, leading=14, textColor=NAVY,
    spaceBefore=14, spaceAfter=4,
)  # fmt: skip
_SUMMARY = ParagraphStyle("eob-summary", fontName="Helvetica", fontSize=15, leading=19)
_NOT_A_BILL = ParagraphStyle(
    "eob-not-a-bill", fontName="Helvetica-Bold", fontSize=12, leading=19, alignment=TA_RIGHT,
    textColor=NAVY,
)  # fmt: skip
_NOTE = ParagraphStyle("eob-note", fontName="Helvetica", fontSize=8.5, leading=11, textColor=GREY)
_CELL = ParagraphStyle("eob-cell", fontName="Helvetica", fontSize=8.5, leading=10.5)
_HEADER_CELL = ParagraphStyle(
    "eob-header-cell", fontName="Helvetica-Bold", fontSize=8.5, leading=10.5,
    textColor=colors.white,
)  # fmt: skip
_HEADER_CELL_RIGHT = ParagraphStyle("eob-header-cell-right", _HEADER_CELL, alignment=TA_RIGHT)
_TOTALS_CELL = ParagraphStyle("eob-totals-cell", _CELL, fontName="Helvetica-Bold")
_CELL_NOTE = ParagraphStyle("eob-cell-note", _CELL, fontSize=7.5, leading=9, textColor=GREY)
_SMALL = ParagraphStyle("eob-small", _BODY, fontSize=7.5, leading=9.5)

_SUMMARY_STYLE = TableStyle([
    ("BACKGROUND", (0, 0), (-1, -1), PALE_BLUE),
    ("BOX", (0, 0), (-1, -1), 1, NAVY),
    ("SPAN", (0, 1), (1, 1)),
    ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
    ("LEFTPADDING", (0, 0), (-1, -1), 10),
    ("RIGHTPADDING", (0, 0), (-1, -1), 10),
    ("TOPPADDING", (0, 0), (-1, 0), 9),
    # The smaller "not a bill" type sits lower so both texts share a baseline.
    ("TOPPADDING", (1, 0), (1, 0), 11),
    ("BOTTOMPADDING", (0, 1), (-1, 1), 9),
])  # fmt: skip

# Row 0 is the header, the last row the totals. Negative indices survive page splits.
_CLAIMS_STYLE = TableStyle([
    ("FONT", (0, 0), (-1, -1), "Helvetica", 8.5, 10.5),
    ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ("ALIGN", (3, 0), (-1, -1), "RIGHT"),
    ("TOPPADDING", (0, 0), (-1, -1), 4),
    ("BOTTOMPADDING", (0, 0), (-1, -1), 4),
    ("LEFTPADDING", (0, 0), (-1, -1), CELL_PADDING),
    ("RIGHTPADDING", (0, 0), (-1, -1), CELL_PADDING),
    ("BACKGROUND", (0, 0), (-1, 0), NAVY),
    ("VALIGN", (0, 0), (-1, 0), "BOTTOM"),
    ("ROWBACKGROUNDS", (0, 1), (-1, -2), [colors.white, ZEBRA]),
    ("LINEBELOW", (0, 1), (-1, -2), 0.25, RULE),
    ("LINEABOVE", (0, -1), (-1, -1), 1, NAVY),
    ("FONT", (0, -1), (-1, -1), "Helvetica-Bold", 8.5, 10.5),
    ("SPAN", (0, -1), (2, -1)),
])  # fmt: skip
# Print-mail tracking barcode of the statement id, top right of page 1 outside the window.
BARCODE_HEIGHT = 0.3 * inch
BARCODE_BAR_WIDTH = 0.6


class _NumberedCanvas(Canvas):  # type: ignore[misc]  # reportlab ships no type hints
    """Canvas that writes "Page N of M": M is only known once every page is laid out.

    Each finished page is kept aside instead of written; save() then draws the footer on each
    with the final count. One layout pass, unlike a two-pass multiBuild.
    """

    def __init__(self, *args: Any, footer: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._footer = footer
        self._pages: list[dict[str, Any]] = []

    def showPage(self) -> None:
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        count = len(self._pages)
        for number, page in enumerate(self._pages, start=1):
            self.__dict__.update(page)
            self.setFont("Helvetica", 8)
            self.setFillColor(GREY)
            self.drawRightString(
                PAGE_WIDTH - MARGIN, FOOTER_BASELINE, self._footer.format(page=number, pages=count)
            )
            super().showPage()
        super().save()


@dataclass(frozen=True)
class _PageText:
    """The text drawn directly on the canvas (outside the flowing content), already formatted."""

    plan_name: str
    title: str
    continued_header: str
    statement_id: str
    barcode: str
    period: str
    address: tuple[str, ...]


def render_statement(
    statement: Statement, *, plan_name: str, wording: Wording | None = None
) -> tuple[bytes, int]:
    """The statement's EOB as PDF bytes, and its page count. Wording defaults to the member's
    preferred language."""
    wording = wording or wording_for(statement.member.language)
    member = statement.member
    page_text = _PageText(
        plan_name=plan_name,
        title=wording.title,
        continued_header=wording.continued_header.format(plan_name=plan_name, title=wording.title),
        statement_id=wording.statement_id.format(statement_id=statement.statement_id),
        barcode=statement.statement_id,
        period=wording.period.format(
            start=_date(statement.period_start, wording), end=_date(statement.period_end, wording)
        ),
        address=(
            wording.member_name.format(first_name=member.first_name, last_name=member.last_name),
            member.address_line,
            wording.address_last_line.format(
                city=member.city, state=member.state, postal_code=member.postal_code
            ),
        ),
    )
    buffer = io.BytesIO()
    doc = BaseDocTemplate(
        buffer,
        pagesize=LETTER,
        # Metadata is visible without opening the document: the title is fixed wording, never
        # member data.
        title=wording.title,
        subject=wording.title,
        author=plan_name,
        creator="eob-delivery",
        lang=wording.language_tag,
        leftMargin=MARGIN,
        rightMargin=MARGIN,
        topMargin=LATER_FRAME_TOP,
        bottomMargin=FRAME_BOTTOM,
    )
    doc.addPageTemplates([
        PageTemplate(
            id="first",
            frames=[_frame(FIRST_FRAME_TOP)],
            onPage=functools.partial(_draw_first_page, text=page_text),
            autoNextPageTemplate="later",
        ),
        PageTemplate(
            id="later",
            frames=[_frame(LATER_FRAME_TOP)],
            onPage=functools.partial(_draw_later_page, text=page_text),
        ),
    ])  # fmt: skip
    doc.build(
        _story(statement, plan_name, wording),
        canvasmaker=functools.partial(_NumberedCanvas, footer=wording.footer),
    )
    pages: int = doc.page
    return buffer.getvalue(), pages


def render_statement_pdf(
    statement: Statement,
    *,
    plan_name: str,
    out_path: Path,
    wording: Wording | None = None,
    keyring: Keyring | None = None,
    password: str | None = None,
) -> int:
    """Write the statement's EOB to out_path (replaced atomically) and return its page count.

    With a keyring the file is encrypted at rest (the statement id is its context); without
    one it is a plain PDF, for documents that are not member data (the reference pages).
    With a password the PDF itself is AES-256 protected (for email).
    """
    data, pages = render_statement(statement, plan_name=plan_name, wording=wording)
    if password is not None:
        data = protect_pdf(data, password)
    if keyring is None:
        write_atomically(out_path, data)
    else:
        write_encrypted(out_path, data, keyring, statement.statement_id)
    return pages


@dataclass(frozen=True)
class Rendered:
    statement_id: str
    path: Path
    pages: int


def render_shard(
    statements: Sequence[Statement],
    passwords: Mapping[str, str],
    *,
    plan_name: str,
    out_dir: Path,
    keyring: Keyring,
) -> list[Rendered]:
    """Render and encrypt one shard of statements; the unit of work of a render process.
    `passwords` holds the PDF password of the shard's statements that get one."""
    done = []
    for statement in statements:
        path = out_dir / f"{statement.statement_id}.pdf"
        pages = render_statement_pdf(
            statement,
            plan_name=plan_name,
            out_path=path,
            keyring=keyring,
            password=passwords.get(statement.statement_id),
        )
        done.append(Rendered(statement.statement_id, path, pages))
    return done


def render_all(
    statements: Sequence[Statement],
    *,
    plan_name: str,
    out_dir: Path,
    keyring: Keyring,
    workers: int,
    passwords: Mapping[str, str] | None = None,
    shard_size: int = 200,
) -> Iterator[list[Rendered]]:
    """Render statements in shards over `workers` processes, yielding each shard as it is done.

    Shards are consecutive slices (statements come in member order), so each finished shard
    can be recorded and a crash loses at most the shards in flight. One worker, or a single
    shard, renders in this process: no pool to start for a handful of statements.
    """
    passwords = passwords or {}
    shards = [statements[i : i + shard_size] for i in range(0, len(statements), shard_size)]
    # Each shard travels with only its own passwords.
    shard_passwords = [
        {s.statement_id: passwords[s.statement_id] for s in shard if s.statement_id in passwords}
        for shard in shards
    ]
    render = functools.partial(render_shard, plan_name=plan_name, out_dir=out_dir, keyring=keyring)
    if workers <= 1 or len(shards) <= 1:
        yield from map(render, shards, shard_passwords)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(shards))) as pool:
        yield from pool.map(render, shards, shard_passwords)


def _frame(top: float) -> Frame:
    # No frame padding: the drawn header, address and footer align with the content edges.
    return Frame(
        MARGIN, FRAME_BOTTOM, CONTENT_WIDTH, PAGE_HEIGHT - top - FRAME_BOTTOM,
        leftPadding=0, rightPadding=0, topPadding=0, bottomPadding=0,
    )  # fmt: skip


def _story(statement: Statement, plan_name: str, wording: Wording) -> list[Any]:
    you_may_owe = format_money(statement.total_member_responsibility)
    summary = Table(
        [
            [
                Paragraph(wording.summary.format(amount=you_may_owe), _SUMMARY),
                _recurring(wording.not_a_bill, _NOT_A_BILL),
            ],
            [_recurring(wording.summary_note, _NOTE), ""],
        ],
        colWidths=(CONTENT_WIDTH * 0.64, CONTENT_WIDTH * 0.36),
        style=_SUMMARY_STYLE,
    )
    story: list[Any] = [
        summary,
        _recurring(wording.claims_heading, _HEADING),
        _claims_table(statement, wording),
    ]
    accumulators = [
        template.format(
            met=format_money(acc.met),
            limit=format_money(acc.limit),
            remaining=format_money(acc.remaining),
        )
        for template, acc in (
            (wording.accumulator_deductible, statement.deductible),
            (wording.accumulator_out_of_pocket, statement.out_of_pocket),
        )
        if acc is not None
    ]
    if accumulators:
        story.append(
            _section(wording.accumulators_heading, [Paragraph(a, _BODY) for a in accumulators])
        )
    if statement.adjustment_codes:
        book = load_code_book(document_language(wording.language_tag.partition("-")[0]))
        story.append(
            _section(
                wording.codes_heading,
                [
                    _recurring(
                        wording.code_explanation.format(
                            code=escape(code), explanation=book.explain(code)
                        ),
                        _BODY,
                    )
                    for code in statement.adjustment_codes
                ],
            )
        )
    story += [KeepTogether(list(section)) for section in _fixed_sections(wording, plan_name)]
    return story


class _FixedParagraph(Paragraph):  # type: ignore[misc]  # reportlab ships no type hints
    """Text that is the same on every member's document: line breaking (the costliest part of
    laying out a paragraph) is done once per width and process, not once per document."""

    _wrapped: tuple[float, tuple[float, float]] | None = None

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        if self._wrapped is None or self._wrapped[0] != available_width:
            self._wrapped = (available_width, super().wrap(available_width, available_height))
        return self._wrapped[1]


@functools.cache
def _fixed_sections(wording: Wording, plan_name: str) -> tuple[tuple[Paragraph, ...], ...]:
    """Appeal rights, contact, nondiscrimination notice and taglines: heading and paragraphs,
    built once per language and plan and shared by every document the process renders."""
    branding = BRANDING
    phone = escape(branding.member_services_phone)
    plan = escape(plan_name)
    appeals_address = escape(branding.appeals_address)
    sections = [
        (wording.appeal_heading, _BODY, [wording.appeal_rights,
         wording.appeal_address.format(appeals_address=appeals_address)]),
        (wording.contact_heading, _BODY, [wording.contact.format(
            plan_name=plan, phone=phone, website=escape(branding.website))]),
        (wording.nondiscrimination_heading, _SMALL,
         [wording.nondiscrimination.format(plan_name=plan, phone=phone)]),
        (wording.taglines_heading, _SMALL,
         [t for t in wording.taglines.format(phone=phone).splitlines() if t.strip()]),
    ]  # fmt: skip
    return tuple(
        (_FixedParagraph(heading, _HEADING), *(_FixedParagraph(text, style) for text in texts))
        for heading, style, texts in sections
    )


def _section(heading: str, body: list[Any]) -> KeepTogether:
    # A heading never sits alone at the bottom of a page.
    return KeepTogether([_recurring(heading, _HEADING), *body])


@functools.cache
def _claims_header(wording: Wording) -> tuple[Paragraph, ...]:
    return (
        _FixedParagraph(wording.column_service_date, _HEADER_CELL),
        _FixedParagraph(wording.column_provider, _HEADER_CELL),
        _FixedParagraph(wording.column_service, _HEADER_CELL),
        _FixedParagraph(wording.column_billed, _HEADER_CELL_RIGHT),
        _FixedParagraph(wording.column_allowed, _HEADER_CELL_RIGHT),
        _FixedParagraph(wording.column_plan_paid, _HEADER_CELL_RIGHT),
        _FixedParagraph(wording.column_you_may_owe, _HEADER_CELL_RIGHT),
    )


def _claims_table(statement: Statement, wording: Wording) -> Table:
    rows: list[list[Any]] = [list(_claims_header(wording))]
    rows.extend(_claim_row(line, wording) for line in statement.lines)
    rows.append([
        _recurring(wording.totals_label, _TOTALS_CELL), "", "",
        format_money(statement.total_billed),
        format_money(statement.total_allowed),
        format_money(statement.total_plan_paid),
        format_money(statement.total_member_responsibility),
    ])  # fmt: skip
    # repeatRows=1: the header row is drawn again at the top of every page the table spans.
    return Table(rows, colWidths=COLUMN_WIDTHS, repeatRows=1, style=_CLAIMS_STYLE)


def _claim_row(line: StatementLine, wording: Wording) -> list[Any]:
    # Plain strings for short fixed-width cells (cheaper); Paragraphs where text must wrap.
    # Member data is escaped: a provider named "A & B <Clinic>" is text, not markup.
    description = (line.service_description or "").strip()
    service = [
        _recurring(
            wording.service_line.format(
                code=escape(line.procedure_code),
                description=escape(description) if description else wording.generic_service,
            ),
            _CELL,
        ),
        *_line_notes(line, wording),
    ]
    return [
        _date(line.service_date, wording),
        _recurring(escape(line.provider_name), _CELL),
        service,
        format_money(line.billed_amount),
        format_money(line.allowed_amount),
        format_money(line.plan_paid),
        format_money(line.member_responsibility),
    ]


_STATUS_FIELD = {
    LineStatus.ADJUSTED: "status_adjusted",
    LineStatus.DENIED: "status_denied",
    LineStatus.REVERSED: "status_reversed",
    LineStatus.VOIDED: "status_voided",
}


@functools.lru_cache(maxsize=8192)
def _recurring(markup: str, style: ParagraphStyle) -> Paragraph:
    """A paragraph whose text recurs across statements (headings, providers, services, status
    and code notes, code explanations) is broken into lines once per process, like the fixed
    text; the cache is bounded."""
    return _FixedParagraph(markup, style)


def _line_notes(line: StatementLine, wording: Wording) -> list[Paragraph]:
    """Under the service: its status when not simply paid, what the member's share is made of,
    and its adjustment codes (explained after the table)."""
    notes = []
    if line.status in _STATUS_FIELD:
        notes.append(_recurring(getattr(wording, _STATUS_FIELD[line.status]), _CELL_NOTE))
    shares = [
        template.format(amount=format_money(amount))
        for template, amount in (
            (wording.share_discount, line.discount if _discounted(line) else None),
            (wording.share_deductible, line.deductible),
            (wording.share_copay, line.copay),
            (wording.share_coinsurance, line.coinsurance),
            (wording.share_not_covered, line.not_covered),
        )
        if amount
    ]
    if shares:
        notes.append(Paragraph(" · ".join(shares), _CELL_NOTE))
    if line.adjustment_codes:
        codes = wording.line_codes.format(codes=escape(", ".join(line.adjustment_codes)))
        notes.append(_recurring(codes, _CELL_NOTE))
    return notes


def _discounted(line: StatementLine) -> bool:
    # A denied, reversed or voided line allows nothing: billed minus allowed is no discount.
    paid = line.status in (LineStatus.PAID, LineStatus.ADJUSTED)
    return paid and line.allowed_amount > 0 and line.discount > 0


def _draw_first_page(canvas: Any, doc: Any, *, text: _PageText) -> None:
    canvas.saveState()
    top = PAGE_HEIGHT
    # Logo and plan name where a double-window envelope shows the return address; title opposite.
    logo_bottom = top - 0.75 * inch - 0.12 * inch
    canvas.drawImage(_LOGO, MARGIN, logo_bottom, LOGO_HEIGHT, LOGO_HEIGHT)
    canvas.setFillColor(NAVY)
    canvas.setFont("Helvetica-Bold", 14)
    canvas.drawString(MARGIN + LOGO_HEIGHT + 8, top - 0.75 * inch, text.plan_name)
    canvas.setFont("Helvetica-Bold", 18)
    canvas.drawRightString(PAGE_WIDTH - MARGIN, top - 0.75 * inch, text.title)
    canvas.setStrokeColor(NAVY)
    canvas.setLineWidth(1.5)
    canvas.line(MARGIN, top - 0.95 * inch, PAGE_WIDTH - MARGIN, top - 0.95 * inch)
    # Statement reference top right, above the window line so no envelope shows it.
    canvas.setFillColor(colors.black)
    canvas.setFont("Helvetica", 9)
    canvas.drawRightString(PAGE_WIDTH - MARGIN, top - 1.15 * inch, text.statement_id)
    canvas.drawRightString(PAGE_WIDTH - MARGIN, top - 1.15 * inch - 12, text.period)
    # The statement id as Code 128, right of the window, for the mail vendor's tracking.
    barcode = Code128(
        text.barcode, barHeight=BARCODE_HEIGHT, barWidth=BARCODE_BAR_WIDTH, quiet=False
    )
    barcode.drawOn(
        canvas, PAGE_WIDTH - MARGIN - barcode.width, top - 1.15 * inch - 20 - BARCODE_HEIGHT
    )
    # Address block: first baseline one cap height below ADDRESS_TOP.
    canvas.setFillColor(colors.black)
    canvas.setFont("Helvetica", 11)
    baseline = top - ADDRESS_TOP - 8
    for line in text.address:
        canvas.drawString(ADDRESS_LEFT, baseline, line)
        baseline -= ADDRESS_LEADING
    _draw_footer_left(canvas, text)
    canvas.restoreState()


def _draw_later_page(canvas: Any, doc: Any, *, text: _PageText) -> None:
    canvas.saveState()
    baseline = PAGE_HEIGHT - 0.6 * inch
    canvas.setFillColor(NAVY)
    canvas.setFont("Helvetica-Bold", 10)
    canvas.drawString(MARGIN, baseline, text.continued_header)
    canvas.setStrokeColor(NAVY)
    canvas.setLineWidth(0.75)
    canvas.line(MARGIN, baseline - 7, PAGE_WIDTH - MARGIN, baseline - 7)
    _draw_footer_left(canvas, text)
    canvas.restoreState()


def _draw_footer_left(canvas: Any, text: _PageText) -> None:
    # The statement id on every page lets a loose printed page be matched to its statement.
    canvas.setStrokeColor(RULE)
    canvas.setLineWidth(0.5)
    canvas.line(MARGIN, FOOTER_BASELINE + 11, PAGE_WIDTH - MARGIN, FOOTER_BASELINE + 11)
    canvas.setFillColor(GREY)
    canvas.setFont("Helvetica", 8)
    canvas.drawString(MARGIN, FOOTER_BASELINE, text.statement_id)


def _date(value: date, wording: Wording) -> str:
    return value.strftime(wording.date_format)


__all__ = [
    "Branding",
    "Rendered",
    "Wording",
    "format_money",
    "load_branding",
    "load_wording",
    "render_all",
    "render_shard",
    "render_statement",
    "render_statement_pdf",
    "wording_for",
]
