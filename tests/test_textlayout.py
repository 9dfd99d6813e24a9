"""Line breaking of the render stage's marked-up text, checked against reportlab's metrics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reportlab.lib import colors
from reportlab.pdfbase.pdfmetrics import stringWidth

from pipeline.documents.textlayout import TextLine, TextStyle, parse_markup, wrap


def measured(line: TextLine, size: float) -> float:
    return sum(stringWidth(text, font, size) for font, text in line.pieces)


def test_markup_becomes_runs_in_the_right_faces_with_entities_decoded() -> None:
    runs = parse_markup("A <b>bold &amp; <i>both</i></b> &lt;plain&gt;")

    assert runs == [
        ("Helvetica", "A "),
        ("Helvetica-Bold", "bold & "),
        ("Helvetica-BoldOblique", "both"),
        ("Helvetica", " <plain>"),
    ]
    assert parse_markup("x <i>y</i>", bold=True) == [
        ("Helvetica-Bold", "x "),
        ("Helvetica-BoldOblique", "y"),
    ]


@pytest.mark.parametrize("markup", ["<u>x</u>", "<font color=red>x</font>", "a < b"])
def test_markup_other_than_bold_and_italic_is_refused(markup: str) -> None:
    with pytest.raises(ValueError):
        parse_markup(markup)


def test_text_breaks_at_spaces_within_the_width_and_keeps_mixed_faces_together() -> None:
    lines = wrap("<b>CO-45</b>: The charge is more than the plan's allowed amount.", 9, 120)

    assert len(lines) == 3
    first_font, first_text = lines[0].pieces[0]
    assert (first_font, first_text) == ("Helvetica-Bold", "CO-45")
    assert lines[0].pieces[1][1].startswith(": The charge")
    for line in lines:
        assert line.width == pytest.approx(measured(line, 9))
        assert line.width <= 120


def test_a_word_wider_than_the_line_is_broken_between_characters() -> None:
    word = "Zzqq" * 20
    lines = wrap(f"Clinic {word} LLP", 8.5, 88)

    texts = ["".join(text for _, text in line.pieces) for line in lines]
    assert "".join(texts).replace(" ", "") == f"Clinic{word}LLP"
    # The word's pieces fill whole lines of their own.
    assert sum(1 for text in texts if " " not in text and text in word) >= 2
    assert len(lines) >= 4
    assert all(line.width <= 88 for line in lines)


def test_empty_text_is_one_empty_line_and_plain_lines_are_measured() -> None:
    assert wrap("", 9, 100) == (TextLine(0.0, ()),)
    style = TextStyle(size=8.5, leading=10.5, color=colors.black, bold=True)
    (line,) = style.line("$1,234.56")
    assert line == TextLine(stringWidth("$1,234.56", "Helvetica-Bold", 8.5),
                            (("Helvetica-Bold", "$1,234.56"),))  # fmt: skip


words = st.text(alphabet="abcdeéñWM&<>.,;-", min_size=1, max_size=30)


@given(st.lists(words, max_size=25), st.sampled_from([40.0, 90.0, 300.0]))
def test_breaking_keeps_every_character_in_order_and_every_line_within_the_width(
    text: list[str], width: float
) -> None:
    escaped = [w.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for w in text]

    lines = wrap(" ".join(escaped), 9, width)

    assert "".join(t for line in lines for _, t in line.pieces).replace(" ", "") == "".join(text)
    for line in lines:
        assert line.width <= width + 1e-9
        assert line.width == pytest.approx(measured(line, 9))
