"""Render stage: one Letter-size Explanation of Benefits PDF per statement.

All wording comes from templates/eob_document.<language>.toml (the member's language when it
exists, else English), code explanations from templates/adjustment_codes.<language>.toml and
logo, colours and contact details from templates/branding.toml; these modules only lay them out.
Layout is fixed in points so that the member's address falls in the window of a #10 envelope
when the page is printed and folded in thirds (statements without an email go to print).
The built-in Helvetica fonts need no font files but only cover Latin-1: other characters
render as a box.

Rendering is two steps on a bare reportlab canvas (no platypus: it was two thirds of the
cost): layout.py turns the statement into blocks placed over pages, then each page is drawn
once (page.py). Wording and branding come from wording.py. Everything that is the same for
every member of a plan (notices, headings, code explanations, the logo) is laid out or encoded
once per process.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import io
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from reportlab.graphics.barcode.code128 import Code128
from reportlab.lib import colors
from reportlab.lib.pagesizes import LETTER
from reportlab.lib.rl_accel import fp_str
from reportlab.lib.units import inch
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase.pdfdoc import PDFImageXObject
from reportlab.pdfgen.canvas import Canvas

from pipeline.documents.layout import lay_out, lay_out_shared
from pipeline.documents.page import (
    ADDRESS_LEADING,
    ADDRESS_LEFT,
    ADDRESS_TOP,
    BRANDING,
    FOOTER_BASELINE,
    GREY,
    MARGIN,
    NAVY,
    PAGE_HEIGHT,
    PAGE_WIDTH,
    RULE,
    Page,
)
from pipeline.documents.protect import protect_pdf
from pipeline.documents.statements import Statement
from pipeline.documents.wording import Wording, format_date, load_wording, wording_for
from pipeline.records.atrest import Keyring, write_atomically, write_encrypted
from pipeline.resources import TEMPLATES_DIR

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


# Print-mail tracking barcode of the statement id, top right of page 1 outside the window.
BARCODE_HEIGHT = 0.3 * inch
BARCODE_BAR_WIDTH = 0.6


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
            start=format_date(statement.period_start, wording),
            end=format_date(statement.period_end, wording),
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
    pages = lay_out(statement, plan_name, wording)
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=LETTER, lang=wording.language_tag)
    # Metadata is visible without opening the document: the title is fixed wording, never
    # member data.
    canvas.setTitle(wording.title)
    canvas.setSubject(wording.title)
    canvas.setAuthor(plan_name)
    canvas.setCreator("eob-delivery")
    for number, placed in enumerate(pages, start=1):
        page = Page(canvas)
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
    # where workers are spawned instead. The start method is named, not taken from a global
    # setting: on Linux the workers must be forked by this process (see _die_with_parent).
    _warm_up(plan_name)
    with ProcessPoolExecutor(
        max_workers=min(workers, len(shards)),
        mp_context=multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn"),
        initializer=_start_worker,
        initargs=(plan_name, os.getpid()),
    ) as pool:
        yield from pool.map(render, shards, shard_passwords)


def _start_worker(plan_name: str, parent_pid: int) -> None:
    """Once per render process. What it inherited from the parent is moved out of the
    garbage collector's reach: collections in the worker would otherwise touch (and so copy)
    every inherited page of memory."""
    if sys.platform == "linux":
        _die_with_parent(parent_pid)
    gc.freeze()
    _warm_up(plan_name)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when its parent ends, however it ends: after a
    `kill -9` of the render step, orphaned workers would otherwise wait on their task queue
    for good. The signal is tied to the parent thread that forked the worker: the one
    iterating render_all, which holds the pool open until it is done."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have ended between the fork and the prctl: then no signal comes.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _warm_up(plan_name: str) -> None:
    """Load and lay out what every document of the plan shares, in each language: wording,
    code explanations, the claims header, the fixed sections, the logo."""
    _logo_image()
    for template in TEMPLATES_DIR.glob("eob_document.*.toml"):
        lay_out_shared(load_wording(template.name.split(".")[1]), plan_name)


def _draw_first_page(page: Page, text: _PageText) -> None:
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


def _draw_later_page(page: Page, text: _PageText) -> None:
    baseline = PAGE_HEIGHT - 0.6 * inch
    page.string(text.continued_header, "Helvetica-Bold", 10, NAVY, MARGIN, baseline)
    page.canvas.setStrokeColor(NAVY)
    page.canvas.setLineWidth(0.75)
    page.canvas.line(MARGIN, baseline - 7, PAGE_WIDTH - MARGIN, baseline - 7)


def _draw_footer(page: Page, text: _PageText, number: int, pages: int) -> None:
    # The statement id on every page lets a loose printed page be matched to its statement.
    page.canvas.setStrokeColor(RULE)
    page.canvas.setLineWidth(0.5)
    page.canvas.line(MARGIN, FOOTER_BASELINE + 11, PAGE_WIDTH - MARGIN, FOOTER_BASELINE + 11)
    page.string(text.statement_id, "Helvetica", 8, GREY, MARGIN, FOOTER_BASELINE)
    page.string(text.footer.format(page=number, pages=pages), "Helvetica", 8, GREY,
                PAGE_WIDTH - MARGIN, FOOTER_BASELINE, right=True)  # fmt: skip


__all__ = ["Rendered", "render_all", "render_shard", "render_statement", "render_statement_pdf"]
