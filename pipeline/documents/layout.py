"""Layout: a statement's flowing content as blocks of broken lines (summary box, claims table
rows, headed sections), placed over pages before anything is drawn, so that the page count is
known first. A heading stays with its text and the claims table's header is repeated on every
page the table reaches. What every document of a plan shares (notices, headings, code
explanations) is laid out once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from xml.sax.saxutils import escape

from reportlab.lib import colors

from pipeline.documents.codes import load_code_book
from pipeline.documents.page import (
    BRANDING,
    CONTENT_WIDTH,
    FIRST_FRAME_TOP,
    FRAME_BOTTOM,
    GREY,
    LATER_FRAME_TOP,
    MARGIN,
    NAVY,
    PAGE_HEIGHT,
    PALE_BLUE,
    RULE,
    ZEBRA,
    Page,
)
from pipeline.documents.statements import LineStatus, Statement, StatementLine
from pipeline.documents.templates import document_language
from pipeline.documents.textlayout import TextLine, TextStyle
from pipeline.documents.wording import Wording, format_date, format_money

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


@dataclass(frozen=True)
class Block:
    """Something drawn in the flowing content: its height, and how to draw it given its top."""

    height: float
    draw: Callable[[Page, float], None]


@dataclass(frozen=True)
class _Group:
    """Blocks kept on one page when they fit on one (a heading with its text, a table row).
    The space before is dropped at the top of a page; a group inside the claims table gets
    the table's header again when it starts a page."""

    blocks: tuple[Block, ...]
    space_before: float = 0.0
    in_table: bool = False

    @property
    def height(self) -> float:
        return sum(block.height for block in self.blocks)


# A page's flowing content: each block with the height of its top on the page.
PlacedPage = list[tuple[float, Block]]


def lay_out(statement: Statement, plan_name: str, wording: Wording) -> list[PlacedPage]:
    """The statement's flowing content placed over its pages, in order."""
    return _paginate(_content(statement, plan_name, wording), _claims_header(wording))


def lay_out_shared(wording: Wording, plan_name: str) -> None:
    """Lay out what every document of the plan in this wording shares (code explanations,
    the claims header, the fixed sections) into this process's caches."""
    load_code_book(_code_language(wording))
    _claims_header(wording)
    _fixed_sections(wording, plan_name)


def _code_language(wording: Wording) -> str:
    return document_language(wording.language_tag.partition("-")[0])


def _paginate(groups: Sequence[_Group], table_header: Block) -> list[PlacedPage]:
    """Place the groups top to bottom over pages: each page a list of (top, block)."""
    pages: list[PlacedPage] = [[]]
    y = PAGE_HEIGHT - FIRST_FRAME_TOP
    fresh = True  # nothing placed yet on this page but what every page of its kind repeats

    def place(block: Block) -> None:
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
        book = load_code_book(_code_language(wording))
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
def _heading(markup: str) -> Block:
    lines = _HEADING.lines(markup, CONTENT_WIDTH)

    def draw(page: Page, top: float) -> None:
        page.lines(lines, _HEADING, MARGIN, top)

    return Block(len(lines) * _HEADING.leading + HEADING_SPACE_AFTER, draw)


def _paragraph(markup: str, style: TextStyle) -> Block:
    lines = style.lines(markup, CONTENT_WIDTH)

    def draw(page: Page, top: float) -> None:
        page.lines(lines, style, MARGIN, top)

    return Block(len(lines) * style.leading, draw)


def _summary_box(amount: str, wording: Wording) -> Block:
    inner_left = SUMMARY_LEFT_WIDTH - 2 * SUMMARY_PADDING
    inner_right = CONTENT_WIDTH - SUMMARY_LEFT_WIDTH - 2 * SUMMARY_PADDING
    summary = _SUMMARY.lines(wording.summary.format(amount=amount), inner_left)
    not_a_bill = _NOT_A_BILL.lines(wording.not_a_bill, inner_right)
    note = _NOTE.lines(wording.summary_note, CONTENT_WIDTH - 2 * SUMMARY_PADDING)
    top_height = max(len(summary) * _SUMMARY.leading, len(not_a_bill) * _NOT_A_BILL.leading)
    padding = 9
    height = padding + top_height + 3 + len(note) * _NOTE.leading + padding

    def draw(page: Page, top: float) -> None:
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

    return Block(height, draw)


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
) -> Block:
    """A table row: cells side by side from column 0 (the last cell may span the rest), money
    columns flush right; 4pt padding; an optional background and rule below (or above)."""
    content = max(_cell_height(cell) for cell in cells)
    height = content + 2 * CELL_PADDING
    # A row of fewer cells spans its first cell over the missing columns.
    spans = len(COLUMN_WIDTHS) - len(cells) + 1
    lefts = (_COLUMN_LEFTS[0], *_COLUMN_LEFTS[spans:])
    columns = (0, *range(spans, len(COLUMN_WIDTHS)))

    def draw(page: Page, top: float) -> None:
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

    return Block(height, draw)


@functools.cache
def _claims_header(wording: Wording) -> Block:
    titles = (
        wording.column_service_date, wording.column_provider, wording.column_service,
        wording.column_billed, wording.column_allowed, wording.column_plan_paid,
        wording.column_you_may_owe,
    )  # fmt: skip
    cells = [
        [(_cell_lines(title, _HEADER_CELL, n), _HEADER_CELL)] for n, title in enumerate(titles)
    ]
    return _row(cells, background=NAVY, bottom_aligned=True)


def _claim_row(line: StatementLine, wording: Wording, *, zebra: bool) -> Block:
    # Member data is escaped: a provider named "A & B <Clinic>" is text, not markup.
    description = (line.service_description or "").strip()
    service = wording.service_line.format(
        code=escape(line.procedure_code),
        description=escape(description) if description else wording.generic_service,
    )
    cells: list[_Cell] = [
        [(_CELL.line(format_date(line.service_date, wording)), _CELL)],
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


def _totals_row(statement: Statement, wording: Wording) -> Block:
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


__all__ = [
    "CELL_PADDING",
    "COLUMN_WIDTHS",
    "Block",
    "PlacedPage",
    "lay_out",
    "lay_out_shared",
]
