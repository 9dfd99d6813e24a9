"""Line breaking of short marked-up text for the render stage, on reportlab's font metrics.

Text is plain, or marked up with <b> and <i> (and the entities &amp; &lt; &gt; &quot; &#39;):
the markup the document templates may use. Breaking is greedy at spaces; a word wider than the
line is broken between characters so that nothing crosses into a neighbouring column. Results
are cached: most text on a statement (headings, notices, providers, services, notes, code
explanations) recurs from one statement to the next.
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass
from typing import NamedTuple

from reportlab.lib.colors import Color
from reportlab.pdfbase.pdfmetrics import stringWidth

# (bold, italic) -> the built-in Helvetica face; it needs no font file and covers Latin-1.
_FACES = {
    (False, False): "Helvetica",
    (True, False): "Helvetica-Bold",
    (False, True): "Helvetica-Oblique",
    (True, True): "Helvetica-BoldOblique",
}
_TAG = re.compile(r"<(/?)([a-z]+)>")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class TextStyle:
    """Font size and leading in points; `bold` sets the whole text in the bold face."""

    size: float
    leading: float
    color: Color
    bold: bool = False

    def lines(self, markup: str, width: float) -> tuple[TextLine, ...]:
        return wrap(markup, self.size, width, bold=self.bold)

    def line(self, text: str) -> tuple[TextLine]:
        """Plain text that is never broken (an amount, a date): one line, not cached."""
        font = _FACES[self.bold, False]
        return (TextLine(stringWidth(text, font, self.size), ((font, text),)),)


class TextLine(NamedTuple):
    """One line: its width in points and its pieces, (font, text) in reading order."""

    width: float
    pieces: tuple[tuple[str, str], ...]


def parse_markup(markup: str, *, bold: bool = False) -> list[tuple[str, str]]:
    """The text as (font, text) runs. Raises ValueError on a tag other than <b> or <i>."""
    runs = []
    bold_depth, italic_depth = int(bold), 0
    position = 0
    for tag in _TAG.finditer(markup):
        runs.append((_FACES[bold_depth > 0, italic_depth > 0], markup[position : tag.start()]))
        closing, name = tag.group(1) == "/", tag.group(2)
        step = -1 if closing else 1
        if name == "b":
            bold_depth += step
        elif name == "i":
            italic_depth += step
        else:
            raise ValueError(f"unsupported markup <{tag.group(1)}{name}>")
        position = tag.end()
    runs.append((_FACES[bold_depth > 0, italic_depth > 0], markup[position:]))
    if "<" in "".join(text for _, text in runs):
        raise ValueError("a '<' that is not <b> or <i>: write &lt;")
    return [(font, html.unescape(text)) for font, text in runs if text]


@functools.lru_cache(maxsize=16384)
def wrap(markup: str, size: float, width: float, *, bold: bool = False) -> tuple[TextLine, ...]:
    """The markup at `size` points broken into lines no wider than `width` points (at least
    one line, maybe empty)."""
    words: list[list[tuple[str, str]]] = [[]]
    for font, text in parse_markup(markup, bold=bold):
        first, *rest = _SPACE.split(text)
        if first:
            words[-1].append((font, first))
        for part in rest:
            words.append([(font, part)] if part else [])
    space = stringWidth(" ", "Helvetica", size)
    lines: list[TextLine] = []
    pieces: list[tuple[str, str]] = []
    line_width = 0.0
    for word in filter(None, words):
        word_width = sum(stringWidth(text, font, size) for font, text in word)
        if pieces and line_width + space + word_width <= width:
            _append(pieces, [(word[0][0], " "), *word])
            line_width += space + word_width
            continue
        if pieces:
            lines.append(TextLine(line_width, tuple(pieces)))
        pieces, line_width = [], 0.0
        if word_width > width:
            full, word = _break_word(word, size, width)
            lines.extend(full)
            word_width = sum(stringWidth(text, font, size) for font, text in word)
        _append(pieces, word)
        line_width = word_width
    lines.append(TextLine(line_width, tuple(pieces)))
    return tuple(lines)


def _append(pieces: list[tuple[str, str]], more: list[tuple[str, str]]) -> None:
    # Consecutive text in one font is one piece: one string to draw.
    for font, text in more:
        if pieces and pieces[-1][0] == font:
            pieces[-1] = (font, pieces[-1][1] + text)
        else:
            pieces.append((font, text))


def _break_word(
    word: list[tuple[str, str]], size: float, width: float
) -> tuple[list[TextLine], list[tuple[str, str]]]:
    """A word too wide for a line as full lines broken between characters, and the rest."""
    characters = [(font, char) for font, text in word for char in text]
    out: list[TextLine] = []
    pieces: list[tuple[str, str]] = []
    line_width = 0.0
    for font, char in characters:
        char_width = stringWidth(char, font, size)
        if pieces and line_width + char_width > width:
            out.append(TextLine(line_width, tuple(pieces)))
            pieces, line_width = [], 0.0
        _append(pieces, [(font, char)])
        line_width += char_width
    return out, pieces


__all__ = ["TextLine", "TextStyle", "parse_markup", "wrap"]
