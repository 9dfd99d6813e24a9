"""Render stage: one Letter-size Explanation of Benefits PDF per statement.

All wording comes from templates/eob_document.<language>.toml (the member's language when it
exists, else English), code explanations from templates/adjustment_codes.<language>.toml and
logo, colours and contact details from templates/branding.toml; this module only lays them out.
Layout is fixed in points so that the member's address falls in the window of a #10 envelope
when the page is printed and folded in thirds (statements without an email go to print).
The built-in Helvetica fonts need no font files but only cover Latin-1: other characters
render as a box.

Rendering is two steps on a bare reportlab canvas (no platypus: it was two thirds of the
cost). Layout turns the statement into blocks (summary box, table rows, headed sections) whose
lines are broken by textlayout.py, then places them over pages, keeping a heading with
its text and repeating the table header on every page the table reaches; so the page count
is known before anything is drawn. Drawing then writes each page once. Everything that is the
same for every member of a plan (notices, headings, code explanations, the logo) is laid out
or encoded once per process.
"""

from __future__ import annotations

import copy
import functools
import gc
import io
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image
from reportlab.graphics.barcode.code128 import Code128
from reportlab.lib import colors
from reportlab.lib.pagesizes import LETTER
from reportlab.lib.rl_accel import escapePDF, fp_str
from reportlab.lib.units import inch
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase.pdfdoc import PDFImageXObject
from reportlab.pdfbase.pdfmetrics import getFont, stringWidth, unicode2T1
from reportlab.pdfgen.canvas import Canvas

from pipeline.documents.codes import load_code_book
from pipeline.documents.protect import protect_pdf
from pipeline.documents.statements import LineStatus, Statement, StatementLine
from pipeline.documents.templates import check_language, document_language, read_toml
from pipeline.documents.textlayout import TextLine, TextStyle, parse_markup
from pipeline.errors import ConfigError
from pipeline.records.atrest import Keyring, write_atomically, write_encrypted
from pipeline.resources import TEMPLATES_DIR


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
# Keys drawn as they are; every other key may use the markup of textlayout.py (<b>, <i>).
_PLAIN_KEYS = frozenset({
    "language_tag", "date_format", "title", "member_name", "address_last_line", "statement_id",
    "period", "continued_header", "footer",
})  # fmt: skip


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
        if key not in _PLAIN_KEYS:
            try:
                parse_markup(value)
            except ValueError as err:
                raise ConfigError(f"{path}: key {key}: {err}") from err
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
LOGO_HEIGHT = 0.5 * inch
# The logo's PDF image object, the same in every document.
_LOGO_NAME = "eob-logo"


@functools.cache
def _logo_image() -> PDFImageXObject:
    """The logo as a PDF image object, decoded and compressed once per process: through
    canvas.drawImage every document paid two md5 passes over its pixels and a zlib pass, a
    third of the render time. Transparency is flattened onto the white page it sits on."""
    with Image.open(BRANDING.logo) as logo:
        rgba = logo.convert("RGBA")
    flat = Image.new("RGB", rgba.size, "white")
    flat.paste(rgba, mask=rgba)
    return PDFImageXObject(_LOGO_NAME, ImageReader(flat))


ZEBRA = colors.HexColor("#F4F6F8")
GREY = colors.HexColor("#555555")
RULE = colors.HexColor("#B8C4D0")

# Service date, provider, service, billed, allowed, plan paid, you may owe: sums to
# CONTENT_WIDTH. With 4pt cell padding, money columns fit $999,999.99 at 8.5pt and the English
# headers "Service date" and "You may owe" fit on one line; the text columns take the rest.
CELL_PADDING = 4
COLUMN_WIDTHS = (60.0, 96.0, 116.0, 56.0, 56.0, 56.0, 64.0)
assert abs(sum(COLUMN_WIDTHS) - CONTENT_WIDTH) < 0.01
_COLUMN_LEFTS = tuple(MARGIN + sum(COLUMN_WIDTHS[:n]) for n in range(len(COLUMN_WIDTHS)))
_MONEY_COLUMNS = range(3, 7)

_BODY = TextStyle(size=9, leading=12, color=colors.black)
_SMALL = TextStyle(size=7.5, leading=9.5, color=colors.black)
_HEADING = TextStyle(size=11, leading=14, color=NAVY, bold=True)
HEADING_SPACE_BEFORE = 14
HEADING_SPACE_AFTER = 4
_SUMMARY = TextStyle(size=15, leading=19, color=colors.black)
_NOT_A_BILL = TextStyle(size=12, leading=19, color=NAVY, bold=True)
_NOTE = TextStyle(size=8.5, leading=11, color=GREY)
_CELL = TextStyle(size=8.5, leading=10.5, color=colors.black)
_HEADER_CELL = TextStyle(size=8.5, leading=10.5, color=colors.white, bold=True)
_TOTALS_CELL = TextStyle(size=8.5, leading=10.5, color=colors.black, bold=True)
_CELL_NOTE = TextStyle(size=7.5, leading=9, color=GREY)
# The summary box: the amount (left) and "not a bill" (right) above a note across the box.
SUMMARY_PADDING = 10
SUMMARY_LEFT_WIDTH = CONTENT_WIDTH * 0.64
# Print-mail tracking barcode of the statement id, top right of page 1 outside the window.
BARCODE_HEIGHT = 0.3 * inch
BARCODE_BAR_WIDTH = 0.6


class _Page:
    """Draws one page. Shapes go straight onto the canvas; text is collected as PDF text
    operators and written over them as one text block when the page is finished. The encoded
    form of each string is cached (most strings recur), and the font and colour are only set
    when they change."""

    def __init__(self, canvas: Canvas) -> None:
        self.canvas = canvas
        self._ops = ["q BT"]
        self._font: tuple[str, float] | None = None
        self._color: colors.Color | None = None

    def lines(
        self,
        lines: Sequence[TextLine],
        style: TextStyle,
        left: float,
        top: float,
        *,
        right: float | None = None,
    ) -> float:
        """Draw lines from `top` down, flush left at `left` or flush right at `right`; return
        the bottom of the last line."""
        self._set_color(style.color)
        baseline = top - style.size
        for line in lines:
            self._ops.append(
                f"1 0 0 1 {fp_str(left if right is None else right - line.width, baseline)} Tm"
            )
            for font, text in line.pieces:
                self._show(font, style.size, text)
            baseline -= style.leading
        return top - len(lines) * style.leading

    def string(
        self, text: str, font: str, size: float, color: colors.Color, x: float, y: float,
        *, right: bool = False,
    ) -> None:  # fmt: skip
        """One line of plain text with its baseline at y, flush left at x or flush right."""
        self._set_color(color)
        self._ops.append(
            f"1 0 0 1 {fp_str(x - stringWidth(text, font, size) if right else x, y)} Tm"
        )
        self._show(font, size, text)

    def finish(self) -> None:
        self._ops.append("ET Q")
        self.canvas.addLiteral("\n".join(self._ops))
        self.canvas.showPage()

    def _show(self, font: str, size: float, text: str) -> None:
        for face, shown in _encoded(font, text):
            if self._font != (face, size):
                # The document's resource name of the font (registered on first use).
                name = self.canvas._doc.getInternalFontName(face)
                self._ops.append(f"{name} {fp_str(size)} Tf")
                self._font = (face, size)
            self._ops.append(shown)

    def _set_color(self, color: colors.Color) -> None:
        if self._color is not color:
            self._ops.append(f"{fp_str(color.red, color.green, color.blue)} rg")
            self._color = color


@functools.lru_cache(maxsize=32768)
def _encoded(font: str, text: str) -> tuple[tuple[str, str], ...]:
    """The text as PDF show-text operators in its font's encoding, (font, operator) in order:
    characters the font lacks come from reportlab's substitution fonts (Symbol, ZapfDingbats),
    as they do through canvas.drawString."""
    face = getFont(font)
    return tuple(
        (used.fontName, f"({escapePDF(run)}) Tj")
        for used, run in unicode2T1(text, [face, *face.substitutionFonts])
    )


@dataclass(frozen=True)
class _Block:
    """Something drawn in the flowing content: its height, and how to draw it given its top."""

    height: float
    draw: Callable[[_Page, float], None]


@dataclass(frozen=True)
class _Group:
    """Blocks kept on one page when they fit on one (a heading with its text, a table row).
    The space before is dropped at the top of a page; a group inside the claims table gets
    the table's header again when it starts a page."""

    blocks: tuple[_Block, ...]
    space_before: float = 0.0
    in_table: bool = False

    @property
    def height(self) -> float:
        return sum(block.height for block in self.blocks)


@dataclass(frozen=True)
class _PageText:
    """The text drawn at fixed places (outside the flowing content), already formatted."""

    plan_name: str
    title: str
    continued_header: str
    statement_id: str
    barcode: str
    period: str
    address: tuple[str, ...]
    footer: str


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
        footer=wording.footer,
    )
    # Layout first: every line and page break is known, so the page count is, before drawing.
    pages = _paginate(_content(statement, plan_name, wording), _claims_header(wording))
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=LETTER, lang=wording.language_tag)
    # Metadata is visible without opening the document: the title is fixed wording, never
    # member data.
    canvas.setTitle(wording.title)
    canvas.setSubject(wording.title)
    canvas.setAuthor(plan_name)
    canvas.setCreator("eob-delivery")
    for number, placed in enumerate(pages, start=1):
        page = _Page(canvas)
        if number == 1:
            _draw_first_page(page, page_text)
        else:
            _draw_later_page(page, page_text)
        for top, block in placed:
            block.draw(page, top)
        _draw_footer(page, page_text, number, len(pages))
        page.finish()
    canvas.save()
    return buffer.getvalue(), len(pages)


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
    # Warmed here, the caches are inherited by forked workers; the initializer warms them
    # where workers are spawned instead.
    _warm_up(plan_name)
    with ProcessPoolExecutor(
        max_workers=min(workers, len(shards)), initializer=_start_worker, initargs=(plan_name,)
    ) as pool:
        yield from pool.map(render, shards, shard_passwords)


def _start_worker(plan_name: str) -> None:
    """Once per render process. What it inherited from the parent is moved out of the
    garbage collector's reach: collections in the worker would otherwise touch (and so copy)
    every inherited page of memory."""
    gc.freeze()
    _warm_up(plan_name)


def _warm_up(plan_name: str) -> None:
    """Load and lay out what every document of the plan shares, in each language: wording,
    code explanations, the claims header, the fixed sections, the logo."""
    _logo_image()
    for template in TEMPLATES_DIR.glob("eob_document.*.toml"):
        wording = load_wording(template.name.split(".")[1])
        load_code_book(document_language(wording.language_tag.partition("-")[0]))
        _claims_header(wording)
        _fixed_sections(wording, plan_name)


def _paginate(groups: Sequence[_Group], table_header: _Block) -> list[list[tuple[float, _Block]]]:
    """Place the groups top to bottom over pages: each page a list of (top, block)."""
    pages: list[list[tuple[float, _Block]]] = [[]]
    y = PAGE_HEIGHT - FIRST_FRAME_TOP
    fresh = True  # nothing placed yet on this page but what every page of its kind repeats

    def place(block: _Block) -> None:
        nonlocal y
        pages[-1].append((y, block))
        y -= block.height

    def new_page(in_table: bool) -> None:
        nonlocal y, fresh
        pages.append([])
        y = PAGE_HEIGHT - LATER_FRAME_TOP
        if in_table:
            place(table_header)
        fresh = True

    for group in groups:
        space = 0.0 if fresh else group.space_before
        if not fresh and y - space - group.height < FRAME_BOTTOM:
            new_page(group.in_table)
            space = 0.0
        y -= space
        for block in group.blocks:
            # Only a group taller than a whole page gets here with a block that does not fit.
            if not fresh and y - block.height < FRAME_BOTTOM:
                new_page(group.in_table)
            place(block)
            fresh = False
    return pages


def _content(statement: Statement, plan_name: str, wording: Wording) -> list[_Group]:
    """The flowing content, in order: summary box, claims table, plan-year progress, codes,
    then the fixed sections."""
    summary = _summary_box(format_money(statement.total_member_responsibility), wording)
    rows = [_claim_row(line, wording, zebra=n % 2 == 1) for n, line in enumerate(statement.lines)]
    groups = [
        _Group((summary,)),
        # The table's heading and header never end a page without a first row under them.
        _Group(
            (_heading(wording.claims_heading), _claims_header(wording), *rows[:1]),
            space_before=HEADING_SPACE_BEFORE,
        ),
        *(_Group((row,), in_table=True) for row in rows[1:]),
        _Group((_totals_row(statement, wording),), in_table=True),
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
        groups.append(_section(wording.accumulators_heading, _BODY, accumulators))
    if statement.adjustment_codes:
        book = load_code_book(document_language(wording.language_tag.partition("-")[0]))
        explanations = [
            wording.code_explanation.format(
                code=escape(code), explanation=escape(book.explain(code))
            )
            for code in statement.adjustment_codes
        ]
        groups.append(_section(wording.codes_heading, _BODY, explanations))
    groups += _fixed_sections(wording, plan_name)
    return groups


@functools.cache
def _fixed_sections(wording: Wording, plan_name: str) -> tuple[_Group, ...]:
    """Appeal rights, contact, nondiscrimination notice and taglines: laid out once per
    language and plan and shared by every document the process renders."""
    branding = BRANDING
    phone = escape(branding.member_services_phone)
    plan = escape(plan_name)
    appeals_address = escape(branding.appeals_address)
    return (
        _section(wording.appeal_heading, _BODY, [
            wording.appeal_rights,
            wording.appeal_address.format(appeals_address=appeals_address),
        ]),
        _section(wording.contact_heading, _BODY, [
            wording.contact.format(plan_name=plan, phone=phone, website=escape(branding.website))
        ]),
        _section(wording.nondiscrimination_heading, _SMALL,
                 [wording.nondiscrimination.format(plan_name=plan, phone=phone)]),
        _section(wording.taglines_heading, _SMALL,
                 [t for t in wording.taglines.format(phone=phone).splitlines() if t.strip()]),
    )  # fmt: skip


def _section(heading: str, style: TextStyle, paragraphs: Sequence[str]) -> _Group:
    # Kept together: a heading never sits alone at the bottom of a page.
    return _Group(
        (_heading(heading), *(_paragraph(text, style) for text in paragraphs)),
        space_before=HEADING_SPACE_BEFORE,
    )


@functools.lru_cache(maxsize=64)
def _heading(markup: str) -> _Block:
    lines = _HEADING.lines(markup, CONTENT_WIDTH)

    def draw(page: _Page, top: float) -> None:
        page.lines(lines, _HEADING, MARGIN, top)

    return _Block(len(lines) * _HEADING.leading + HEADING_SPACE_AFTER, draw)


def _paragraph(markup: str, style: TextStyle) -> _Block:
    lines = style.lines(markup, CONTENT_WIDTH)

    def draw(page: _Page, top: float) -> None:
        page.lines(lines, style, MARGIN, top)

    return _Block(len(lines) * style.leading, draw)


def _summary_box(amount: str, wording: Wording) -> _Block:
    inner_left = SUMMARY_LEFT_WIDTH - 2 * SUMMARY_PADDING
    inner_right = CONTENT_WIDTH - SUMMARY_LEFT_WIDTH - 2 * SUMMARY_PADDING
    summary = _SUMMARY.lines(wording.summary.format(amount=amount), inner_left)
    not_a_bill = _NOT_A_BILL.lines(wording.not_a_bill, inner_right)
    note = _NOTE.lines(wording.summary_note, CONTENT_WIDTH - 2 * SUMMARY_PADDING)
    top_height = max(len(summary) * _SUMMARY.leading, len(not_a_bill) * _NOT_A_BILL.leading)
    padding = 9
    height = padding + top_height + 3 + len(note) * _NOTE.leading + padding

    def draw(page: _Page, top: float) -> None:
        canvas = page.canvas
        canvas.setFillColor(PALE_BLUE)
        canvas.setStrokeColor(NAVY)
        canvas.setLineWidth(1)
        canvas.rect(MARGIN, top - height, CONTENT_WIDTH, height, stroke=1, fill=1)
        # Each text is centred in the height of the taller; "not a bill", in smaller type,
        # shares the amount's baseline when both take one line.
        text_top = top - padding
        page.lines(summary, _SUMMARY, MARGIN + SUMMARY_PADDING,
                   text_top - (top_height - len(summary) * _SUMMARY.leading) / 2)  # fmt: skip
        page.lines(
            not_a_bill, _NOT_A_BILL, 0,
            text_top - (top_height - len(not_a_bill) * _NOT_A_BILL.leading) / 2
            - _SUMMARY.size + _NOT_A_BILL.size,
            right=MARGIN + CONTENT_WIDTH - SUMMARY_PADDING,
        )  # fmt: skip
        page.lines(note, _NOTE, MARGIN + SUMMARY_PADDING, text_top - top_height - 3)

    return _Block(height, draw)


# A table cell: its text as (lines, style) parts stacked top down.
_Cell = Sequence[tuple[Sequence[TextLine], TextStyle]]


def _cell_height(cell: _Cell) -> float:
    return sum(len(lines) * style.leading for lines, style in cell)


def _cell_lines(markup: str, style: TextStyle, column: int) -> tuple[TextLine, ...]:
    return style.lines(markup, COLUMN_WIDTHS[column] - 2 * CELL_PADDING)


def _row(
    cells: Sequence[_Cell],
    *,
    background: colors.Color | None = None,
    rule: tuple[float, colors.Color] | None = None,
    rule_above: bool = False,
    bottom_aligned: bool = False,
) -> _Block:
    """A table row: cells side by side from column 0 (the last cell may span the rest), money
    columns flush right; 4pt padding; an optional background and rule below (or above)."""
    content = max(_cell_height(cell) for cell in cells)
    height = content + 2 * CELL_PADDING
    # A row of fewer cells spans its first cell over the missing columns.
    spans = len(COLUMN_WIDTHS) - len(cells) + 1
    lefts = (_COLUMN_LEFTS[0], *_COLUMN_LEFTS[spans:])
    columns = (0, *range(spans, len(COLUMN_WIDTHS)))

    def draw(page: _Page, top: float) -> None:
        canvas = page.canvas
        if background is not None:
            canvas.setFillColor(background)
            canvas.rect(MARGIN, top - height, CONTENT_WIDTH, height, stroke=0, fill=1)
        if rule is not None:
            width, color = rule
            y = top if rule_above else top - height
            canvas.setStrokeColor(color)
            canvas.setLineWidth(width)
            canvas.line(MARGIN, y, MARGIN + CONTENT_WIDTH, y)
        for cell, left, column in zip(cells, lefts, columns, strict=True):
            y = top - CELL_PADDING
            if bottom_aligned:
                y -= content - _cell_height(cell)
            right = (
                left + COLUMN_WIDTHS[column] - CELL_PADDING if column in _MONEY_COLUMNS else None
            )
            for lines, style in cell:
                y = page.lines(lines, style, left + CELL_PADDING, y, right=right)

    return _Block(height, draw)


@functools.cache
def _claims_header(wording: Wording) -> _Block:
    titles = (
        wording.column_service_date, wording.column_provider, wording.column_service,
        wording.column_billed, wording.column_allowed, wording.column_plan_paid,
        wording.column_you_may_owe,
    )  # fmt: skip
    cells = [
        [(_cell_lines(title, _HEADER_CELL, n), _HEADER_CELL)] for n, title in enumerate(titles)
    ]
    return _row(cells, background=NAVY, bottom_aligned=True)


def _claim_row(line: StatementLine, wording: Wording, *, zebra: bool) -> _Block:
    # Member data is escaped: a provider named "A & B <Clinic>" is text, not markup.
    description = (line.service_description or "").strip()
    service = wording.service_line.format(
        code=escape(line.procedure_code),
        description=escape(description) if description else wording.generic_service,
    )
    cells: list[_Cell] = [
        [(_CELL.line(_date(line.service_date, wording)), _CELL)],
        [(_cell_lines(escape(line.provider_name), _CELL, 1), _CELL)],
        [
            (_cell_lines(service, _CELL, 2), _CELL),
            *((_cell_lines(note, _CELL_NOTE, 2), _CELL_NOTE)
              for note in _line_notes(line, wording)),
        ],
        *_money_cells((line.billed_amount, line.allowed_amount, line.plan_paid,
                       line.member_responsibility), _CELL),
    ]  # fmt: skip
    return _row(cells, background=ZEBRA if zebra else None, rule=(0.25, RULE))


def _totals_row(statement: Statement, wording: Wording) -> _Block:
    label = _TOTALS_CELL.lines(wording.totals_label, sum(COLUMN_WIDTHS[:3]) - 2 * CELL_PADDING)
    totals = (statement.total_billed, statement.total_allowed, statement.total_plan_paid,
              statement.total_member_responsibility)  # fmt: skip
    cells = [[(label, _TOTALS_CELL)], *_money_cells(totals, _TOTALS_CELL)]
    return _row(cells, rule=(1, NAVY), rule_above=True)


def _money_cells(amounts: Sequence[Decimal], style: TextStyle) -> list[_Cell]:
    return [[(style.line(format_money(amount)), style)] for amount in amounts]


_STATUS_FIELD = {
    LineStatus.ADJUSTED: "status_adjusted",
    LineStatus.DENIED: "status_denied",
    LineStatus.REVERSED: "status_reversed",
    LineStatus.VOIDED: "status_voided",
}


def _line_notes(line: StatementLine, wording: Wording) -> list[str]:
    """Under the service: its status when not simply paid, what the member's share is made of,
    and its adjustment codes (explained after the table)."""
    notes = []
    if line.status in _STATUS_FIELD:
        notes.append(getattr(wording, _STATUS_FIELD[line.status]))
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
        notes.append(" · ".join(shares))
    if line.adjustment_codes:
        notes.append(wording.line_codes.format(codes=escape(", ".join(line.adjustment_codes))))
    return notes


def _discounted(line: StatementLine) -> bool:
    # A denied, reversed or voided line allows nothing: billed minus allowed is no discount.
    paid = line.status in (LineStatus.PAID, LineStatus.ADJUSTED)
    return paid and line.allowed_amount > 0 and line.discount > 0


def _draw_first_page(page: _Page, text: _PageText) -> None:
    canvas = page.canvas
    top = PAGE_HEIGHT
    # Logo and plan name where a double-window envelope shows the return address; title opposite.
    logo_bottom = top - 0.75 * inch - 0.12 * inch
    # A document registers the objects it holds, so each gets its own shallow copy of the
    # encoded image (the compressed bytes are shared).
    canvas._doc.addForm(_LOGO_NAME, copy.copy(_logo_image()))
    canvas.saveState()
    canvas.translate(MARGIN, logo_bottom)
    canvas.scale(LOGO_HEIGHT, LOGO_HEIGHT)
    canvas.doForm(_LOGO_NAME)
    canvas.restoreState()
    page.string(text.plan_name, "Helvetica-Bold", 14, NAVY, MARGIN + LOGO_HEIGHT + 8,
                top - 0.75 * inch)  # fmt: skip
    page.string(text.title, "Helvetica-Bold", 18, NAVY, PAGE_WIDTH - MARGIN, top - 0.75 * inch,
                right=True)  # fmt: skip
    canvas.setStrokeColor(NAVY)
    canvas.setLineWidth(1.5)
    canvas.line(MARGIN, top - 0.95 * inch, PAGE_WIDTH - MARGIN, top - 0.95 * inch)
    # Statement reference top right, above the window line so no envelope shows it.
    for n, line in enumerate((text.statement_id, text.period)):
        page.string(line, "Helvetica", 9, colors.black, PAGE_WIDTH - MARGIN,
                    top - 1.15 * inch - 12 * n, right=True)  # fmt: skip
    _draw_barcode(canvas, text.barcode, PAGE_WIDTH - MARGIN, top - 1.15 * inch - 20)
    # Address block: first baseline one cap height below ADDRESS_TOP.
    for n, line in enumerate(text.address):
        page.string(line, "Helvetica", 11, colors.black, ADDRESS_LEFT,
                    top - ADDRESS_TOP - 8 - ADDRESS_LEADING * n)  # fmt: skip


def _draw_barcode(canvas: Canvas, value: str, right: float, top: float) -> None:
    """The value as Code 128 (reportlab's encoding), its bars filled as one path, flush
    right at `right` under `top`: the statement id for the mail vendor's tracking."""
    # Code 128 spells each symbol as bar and space widths: upper-case letters are bars,
    # lower-case ones spaces, A or a one module wide, B or b two, and so on.
    barcode = Code128(value, quiet=False)
    barcode.validate()
    barcode.encode()
    modules = barcode.decompose()
    units = [ord(c.upper()) - ord("A") + 1 for c in modules]
    bars = []
    position = 0
    for c, width in zip(modules, units, strict=True):
        if c.isupper():
            bars.append(f"{position} 0 {width} 1 re")
        position += width
    # In module units: one bar width across, the bar height up, from the bottom left corner.
    left = right - position * BARCODE_BAR_WIDTH
    origin = fp_str(BARCODE_BAR_WIDTH, 0, 0, BARCODE_HEIGHT, left, top - BARCODE_HEIGHT)
    canvas.addLiteral(f"q 0 g {origin} cm {' '.join(bars)} f Q")


def _draw_later_page(page: _Page, text: _PageText) -> None:
    baseline = PAGE_HEIGHT - 0.6 * inch
    page.string(text.continued_header, "Helvetica-Bold", 10, NAVY, MARGIN, baseline)
    page.canvas.setStrokeColor(NAVY)
    page.canvas.setLineWidth(0.75)
    page.canvas.line(MARGIN, baseline - 7, PAGE_WIDTH - MARGIN, baseline - 7)


def _draw_footer(page: _Page, text: _PageText, number: int, pages: int) -> None:
    # The statement id on every page lets a loose printed page be matched to its statement.
    page.canvas.setStrokeColor(RULE)
    page.canvas.setLineWidth(0.5)
    page.canvas.line(MARGIN, FOOTER_BASELINE + 11, PAGE_WIDTH - MARGIN, FOOTER_BASELINE + 11)
    page.string(text.statement_id, "Helvetica", 8, GREY, MARGIN, FOOTER_BASELINE)
    page.string(text.footer.format(page=number, pages=pages), "Helvetica", 8, GREY,
                PAGE_WIDTH - MARGIN, FOOTER_BASELINE, right=True)  # fmt: skip


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
