"""Plain-text tables that never cut a value, at any width.

Given the fields, the rows and the width, `layout` chooses one of three shapes:

1. every row on one line, each column as wide as its widest value;
2. the same, with the wrapping columns (reasons, paths, ranges of names) continued on further
   lines of the row, each at least as wide as its longest word if it may not break words
   (checkpoint names), else at least WRAP_MIN;
3. when even that does not fit (80 columns), the *moving* columns (reasons, roots) go on a
   line of their own under the row, indented, wrapped at the width.

No value is ever shortened: a name longer than its column makes the line longer, and the
terminal wraps it. The layout is computed once, so rows printed later (`history --follow`)
line up with the header printed first.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

GAP = "  "
# A wrapping column narrower than this reads worse than its text on a line of its own.
WRAP_MIN = 24


@dataclass(frozen=True)
class Field:
    """One column: `right` aligned (numbers, sizes); `wraps` may continue on further lines;
    `breaks_words` may fold a word longer than the column (never for names); `moves` goes on a
    line of its own under the row when the table is too wide (shape 3)."""

    header: str
    right: bool = False
    wraps: bool = False
    breaks_words: bool = True
    moves: bool = False


@dataclass(frozen=True)
class Layout:
    """The chosen shape: each column's width, whether moving columns are on their own line
    (`stacked`), the total width and the indent of that line."""

    fields: tuple[Field, ...]
    widths: tuple[int, ...]
    width: int
    stacked: bool
    indent: int


def _natural(
    fields: Sequence[Field], rows: Sequence[Sequence[str]], least: Sequence[int]
) -> list[int]:
    widths = [
        max(len(field.header), least[i] if i < len(least) else 0) for i, field in enumerate(fields)
    ]
    for row in rows:
        widths = [max(size, len(value)) for size, value in zip(widths, row, strict=True)]
    return widths


def _minimum(field: Field, natural: int, values: Iterable[str]) -> int:
    if not field.wraps:
        return natural
    if not field.breaks_words:
        return max([len(field.header), *(len(word) for value in values for word in value.split())])
    return min(natural, WRAP_MIN)


def _fit(
    fields: Sequence[Field],
    natural: Sequence[int],
    minimum: Sequence[int],
    width: int,
    columns: Sequence[int],
) -> list[int] | None:
    """Given the columns to place on one line, return their widths within `width`, or None."""
    room = width - len(GAP) * (len(columns) - 1)
    room -= sum(natural[i] for i in columns if not fields[i].wraps)
    wrapping = [i for i in columns if fields[i].wraps]
    room -= sum(minimum[i] for i in wrapping)
    if room < 0:
        return None
    widths = list(natural)
    for i in wrapping:
        widths[i] = minimum[i]
    # What is left goes first to the columns that stay (a range of names reads best whole),
    # then to those that need least more, so most of them fit whole.
    by_need = sorted(wrapping, key=lambda i: (fields[i].moves, natural[i] - minimum[i]))
    for done, i in enumerate(by_need):
        share = room // (len(by_need) - done) if fields[i].moves else room
        given = min(natural[i] - minimum[i], share)
        widths[i] += given
        room -= given
    return widths


def layout(
    fields: Sequence[Field],
    rows: Iterable[Sequence[str]],
    width: int,
    *,
    least: Sequence[int] = (),
    indent: int = 4,
) -> Layout:
    """Given the fields, the rows (or a sample of them), the width, the least width of each
    column (room for values still to come) and the indent of a moved line, return the layout."""
    rows = [tuple(row) for row in rows]
    natural = _natural(fields, rows, least)
    minimum = [
        _minimum(field, natural[i], (row[i] for row in rows)) for i, field in enumerate(fields)
    ]
    everything = list(range(len(fields)))
    widths = _fit(fields, natural, minimum, width, everything)
    if widths is not None:
        return Layout(tuple(fields), tuple(widths), width, False, indent)
    staying = [i for i in everything if not fields[i].moves]
    moving = len(staying) < len(fields)
    if moving:
        widths = _fit(fields, natural, minimum, width, staying)
    if widths is None:
        widths = [minimum[i] if not fields[i].moves else natural[i] for i in everything]
    return Layout(tuple(fields), tuple(widths), width, moving, indent)


def wrap(text: str, width: int, *, indent: str = "", breaks_words: bool = True) -> list[str]:
    """Given text and a width, return its lines, broken at spaces (and, if `breaks_words`,
    inside a word longer than the width): never shortened."""
    return textwrap.wrap(
        text,
        width=max(1, width),
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=breaks_words,
    ) or [indent.rstrip()]


def _cell(value: str, width: int, field: Field) -> str:
    return value.rjust(width) if field.right else value.ljust(width)


def _line_of(layout: Layout, row: Sequence[str], columns: Sequence[int]) -> list[str]:
    cells = {
        i: (
            wrap(row[i], layout.widths[i], breaks_words=layout.fields[i].breaks_words)
            if layout.fields[i].wraps
            else [row[i]]
        )
        for i in columns
    }
    height = max(len(lines) for lines in cells.values())
    return [
        GAP.join(
            _cell(
                cells[i][line] if line < len(cells[i]) else "", layout.widths[i], layout.fields[i]
            )
            for i in columns
        ).rstrip()
        for line in range(height)
    ]


def rows(layout: Layout, row: Sequence[str]) -> list[str]:
    """Given the layout and one row's values, return its lines."""
    everything = range(len(layout.fields))
    if not layout.stacked:
        return _line_of(layout, row, list(everything))
    lines = _line_of(layout, row, [i for i in everything if not layout.fields[i].moves])
    moved = " · ".join(row[i] for i in everything if layout.fields[i].moves and row[i])
    if moved:
        lines += wrap(moved, layout.width, indent=" " * layout.indent)
    return lines


def header(layout: Layout) -> list[str]:
    """Given the layout, return the header's lines (two when the moving columns are stacked)."""
    names = [field.header for field in layout.fields]
    if not layout.stacked:
        return rows(layout, names)
    everything = range(len(layout.fields))
    first = _line_of(layout, names, [i for i in everything if not layout.fields[i].moves])
    moved = " · ".join(field.header for field in layout.fields if field.moves)
    return [*first, " " * layout.indent + moved]


def start_of(layout: Layout, index: int) -> int:
    """Given the layout and a column, return where that column starts on a row's first line."""
    shown = [i for i in range(index) if not (layout.stacked and layout.fields[i].moves)]
    return sum(layout.widths[i] + len(GAP) for i in shown)
