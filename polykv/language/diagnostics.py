"""Diagnostics: one error or note about a spec, and the single exception type that carries them.

A diagnostic prints the way compilers do::

    spec.pkv:3:14: error: unknown policy 'snapvk'
        3 | layers 4-27: snapvk@auto
          |              ^^^^^^
      hint: did you mean 'snapkv'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import attrs

from polykv.errors import PolykvError
from polykv.language.source import Span
from polykv.limits import MAX_REPORTED_ERRORS

#: Characters of a source line an excerpt shows, and how many of them come before the span.
EXCERPT_WIDTH, EXCERPT_CONTEXT = 120, 40


@attrs.frozen
class Note:
    """A secondary location that explains a diagnostic ("first named here")."""

    message: str
    span: Span


# A typed converter, as polykv.converters says why.
def _notes(items: Iterable[Note]) -> tuple[Note, ...]:
    return tuple(items)


@attrs.frozen
class Diagnostic:
    """One finding about a spec. ``code`` names its kind for tools (``--json``) and tests."""

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    notes: tuple[Note, ...] = attrs.field(default=(), converter=_notes)

    def format(self) -> str:
        lines = [_located(self.span, "error", self.message)]
        lines += _excerpt(self.span)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        for note in self.notes:
            lines.append(_located(note.span, "note", note.message))
            lines += _excerpt(note.span)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-ready form: code, message, hint, and the span as file/line/column."""
        return {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            **_span_dict(self.span),
            "notes": [{"message": n.message, **_span_dict(n.span)} for n in self.notes],
        }


def _span_dict(span: Span | None) -> dict:
    if span is None:
        return {"file": None, "line": None, "column": None, "end_line": None, "end_column": None}
    return {
        "file": span.source.name,
        "line": span.line,
        "column": span.column,
        "end_line": span.end_line,
        "end_column": span.end_column,
    }


def _located(span: Span | None, severity: str, message: str) -> str:
    return f"{span.location()}: {severity}: {message}" if span else f"{severity}: {message}"


def _excerpt(span: Span | None) -> list[str]:
    """The span's first line with a caret row under the span (to the end of that line); of a long
    line, the EXCERPT_WIDTH characters from a little before the span."""
    if span is None:
        return []
    text = span.source.line(span.line).expandtabs(1)
    width = max(1, span.end_column - span.column) if span.end_line == span.line else max(1, len(text) - span.column + 1)
    column = span.column
    if len(text) > EXCERPT_WIDTH:
        first = max(0, column - 1 - EXCERPT_CONTEXT)
        shown = text[first : first + EXCERPT_WIDTH]
        prefix = "..." if first else ""
        text = prefix + shown + ("..." if first + EXCERPT_WIDTH < len(text) else "")
        column = column - first + len(prefix)
        width = min(width, len(shown) - (column - 1 - len(prefix)))
    gutter = str(span.line)
    pad = " " * len(gutter)
    return [
        f"    {gutter} | {text}",
        f"    {pad} | {' ' * (column - 1)}{'^' * max(1, width)}",
    ]


class SpecError(PolykvError):
    """Everything wrong with a spec, collected: nothing else escapes parsing or checking.

    The first MAX_REPORTED_ERRORS diagnostics are kept; ``unreported`` counts the others, so a spec
    that is all errors is reported in time and space linear in its size.
    """

    def __init__(self, diagnostics: Sequence[Diagnostic], unreported: int = 0):
        if not diagnostics:
            raise ValueError("a SpecError carries at least one diagnostic")
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics[:MAX_REPORTED_ERRORS])
        self.unreported = unreported + len(diagnostics) - len(self.diagnostics)
        super().__init__(self.format())

    def format(self) -> str:
        count = len(self.diagnostics) + self.unreported
        parts = [d.format() for d in self.diagnostics]
        if self.unreported:
            parts.append(f"... and {self.unreported:,} more error{'s' if self.unreported > 1 else ''} like these")
        parts.append(f"{count:,} error{'s' if count > 1 else ''} in spec")
        return "\n\n".join(parts)


def suggest(name: str, known: Iterable[str]) -> str | None:
    """A "did you mean" hint for a misspelt ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name.lower(), sorted(known), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None
