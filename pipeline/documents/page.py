"""The page: Letter geometry in points, the document's colours, and Page, which draws text
onto one page of a reportlab canvas.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from reportlab.lib import colors
from reportlab.lib.pagesizes import LETTER
from reportlab.lib.rl_accel import escapePDF, fp_str
from reportlab.lib.units import inch
from reportlab.pdfbase.pdfmetrics import getFont, stringWidth, unicode2T1
from reportlab.pdfgen.canvas import Canvas

from pipeline.documents.textlayout import TextLine, TextStyle
from pipeline.documents.wording import load_branding

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

ZEBRA = colors.HexColor("#F4F6F8")
GREY = colors.HexColor("#555555")
RULE = colors.HexColor("#B8C4D0")


class Page:
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


__all__ = [
    "ADDRESS_LEADING",
    "ADDRESS_LEFT",
    "ADDRESS_TOP",
    "BRANDING",
    "CONTENT_WIDTH",
    "FIRST_FRAME_TOP",
    "FOOTER_BASELINE",
    "FRAME_BOTTOM",
    "GREY",
    "LATER_FRAME_TOP",
    "MARGIN",
    "NAVY",
    "PAGE_HEIGHT",
    "PAGE_WIDTH",
    "PALE_BLUE",
    "RULE",
    "ZEBRA",
    "Page",
]
