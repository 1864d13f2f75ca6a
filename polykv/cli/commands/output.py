"""How commands print: aligned tables and byte counts."""

from __future__ import annotations

from collections.abc import Sequence


def table(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Rows of cells as left-aligned columns (the first row is the header), without trailing spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
