"""Source text and spans: where in which file a piece of a spec came from, and reading spec files.

Line and column numbers are found by bisecting an index of line starts built once per source, so
locating every node of a large spec stays linear in its size.
"""

from __future__ import annotations

import bisect
import functools
from pathlib import Path

import attrs

from polykv.files import STDIN, read_text
from polykv.limits import MAX_SPEC_BYTES


@attrs.frozen
class Source:
    """A named text (a file path, ``<string>`` or ``<stdin>``) that spans point into."""

    name: str
    text: str = attrs.field(repr=False)

    @functools.cached_property
    def _line_starts(self) -> list[int]:
        starts = [0]
        position = self.text.find("\n")
        while position != -1:
            starts.append(position + 1)
            position = self.text.find("\n", position + 1)
        return starts

    def line(self, number: int) -> str:
        """The 1-based line ``number`` without its newline ('' past the end)."""
        starts = self._line_starts
        if not 0 < number <= len(starts):
            return ""
        end = starts[number] - 1 if number < len(starts) else len(self.text)
        return self.text[starts[number - 1] : end].rstrip("\r")

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based line and column of character ``offset``."""
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1


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
        line, column = source.position(start)
        end_line, end_column = source.position(end)
        return cls(source, start, end, line, column, end_line, end_column)

    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.column}"


def read_source(name: str | Path) -> Source:
    """The spec in file ``name`` (``-`` for standard input), as UTF-8 text without a byte-order mark.

    Raises UnreadableFile, worded ``NAME: cannot read: REASON``, for a missing file, a folder, a
    closed standard input, bytes that are not UTF-8, or more than MAX_SPEC_BYTES (``/dev/zero`` included).
    """
    text = read_text(name, limit=MAX_SPEC_BYTES, what="spec")
    return Source(STDIN if str(name) == "-" else str(name), text)
