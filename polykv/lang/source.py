"""Source text and spans: where in which file a piece of a spec came from."""

from __future__ import annotations

import attrs


@attrs.frozen
class Source:
    """A named text (a file path, ``<string>`` or ``<stdin>``) that spans point into."""

    name: str
    text: str = attrs.field(repr=False)

    def line(self, number: int) -> str:
        """The 1-based line ``number`` without its newline ('' past the end)."""
        lines = self.text.split("\n")
        return lines[number - 1].rstrip("\r") if 0 < number <= len(lines) else ""


@attrs.frozen
class Span:
    """A half-open character range of a source, with 1-based line and column of both ends."""

    source: Source = attrs.field(repr=False)
    start: int
    end: int
    line: int
    column: int
    end_line: int
    end_column: int

    @classmethod
    def at(cls, source: Source, start: int, end: int) -> Span:
        """The span of ``source.text[start:end]``, computing lines and columns."""
        line, column = _line_and_column(source.text, start)
        end_line, end_column = _line_and_column(source.text, end)
        return cls(source, start, end, line, column, end_line, end_column)

    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.column}"


def _line_and_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, column
