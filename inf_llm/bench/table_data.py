"""A result table as plain data, rendered as fixed-width text or Markdown without rich.

The terminal rendering (`display.to_rich`) needs rich; these two do not, so the GPU machine (no rich) prints its
table with `to_text`, and `python -m inf_llm.bench table FILE --markdown` writes tables for BENCHMARKS.md.
Cells may hold rich markup such as ``[green]5/5[/green]``; the plain renderings strip it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# rich markup tags: [green], [/green], [bold red], [/] (a literal "[" is written "\[")
_MARKUP = re.compile(r"(?<!\\)\[/?[a-z][a-z ]*\]|(?<!\\)\[/\]")


@dataclass(frozen=True)
class TableData:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    left_columns: int = 1  # the first columns are text (left-aligned), the rest numbers
    row_styles: tuple[str | None, ...] = ()  # rich styles per row, for the terminal only


def format_length(tokens: int) -> str:
    """4096 -> "4K", 1048576 -> "1M", 3000 -> "3000"."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def plain(cell: str) -> str:
    return _MARKUP.sub("", cell).replace("\\[", "[")


def to_text(data: TableData) -> str:
    rows = [data.columns, *[tuple(plain(cell) for cell in row) for row in data.rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(data.columns))]
    lines = [data.title]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i < data.left_columns else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def to_markdown(data: TableData) -> str:
    align = ["---" if i < data.left_columns else "---:" for i in range(len(data.columns))]
    lines = [f"**{data.title}**", "", "| " + " | ".join(data.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(plain(cell).replace("|", "\\|") for cell in row) + " |" for row in data.rows]
    return "\n".join(lines)
