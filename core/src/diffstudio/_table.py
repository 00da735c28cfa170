"""Plain-text tables for the command line: column widths come from the data, the last column is not padded."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 2) -> str:
    """Return ``rows`` under ``headers`` as aligned lines (no trailing spaces).

    Args:
        headers: Column titles.
        rows: One sequence of cells per row, as many cells as headers.
        gap: Spaces between columns.
    """
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = []
    for cells in [list(headers), *map(list, rows)]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])] + [cells[-1]]
        lines.append((" " * gap).join(padded).rstrip())
    return "\n".join(lines)
