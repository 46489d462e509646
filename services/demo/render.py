"""Readable terminal output for the demo: section headers and tables (rich)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the funnel tables even when stdout is a pipe (rich assumes 80 columns there).
console = Console(highlight=False, width=max(shutil.get_terminal_size((120, 40)).columns, 110))


def section(title: str, subtitle: str = "") -> None:
    console.print()
    console.rule(f"[bold]{title}[/bold]" + (f"  [dim]{subtitle}[/dim]" if subtitle else ""))


def note(text: str) -> None:
    console.print(f"  {text}")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, right: int = 1) -> None:
    """A table whose first ``right``-th and later columns are right-aligned numbers."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if i >= right else "left")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    console.print(t)


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def yuan(fen: int) -> str:
    return f"¥{fen / 100:,.2f}"
