"""Where the statements of a spec text are, found without parsing it.

Statements end at a newline or a ``;`` outside strings and comments. Knowing that much before
parsing lets the parser refuse a spec of too many statements at once (``MAX_STATEMENTS``), and
recover from a syntax error by blanking the one statement it is in. The text is scanned once, by
regular expressions, into a copy whose strings and comments are blanked: separators are then found
with plain string searches, so every question costs time linear in the text, at most.
"""

from __future__ import annotations

import re

import attrs

#: A string literal (closed or not: the line ends it) or a comment, whose characters separate nothing.
_QUOTED = re.compile(r'"(?:[^"\\\n]|\\[^\n])*"?|#[^\n]*')
#: A statement: from a character that is neither space nor separator, to the next separator.
_STATEMENT = re.compile(r"[^\s;][^;\n]*")
#: A token, as MAX_TOKENS counts them: a word or number, or one punctuation mark.
_TOKEN = re.compile(r"\w+|[^\w\s]")


@attrs.frozen
class Statements:
    """The statements of one text: ``code`` is the text with strings and comments blanked."""

    code: str

    @classmethod
    def of(cls, text: str) -> Statements:
        return cls(_QUOTED.sub(_blanked, text))

    def count(self) -> int:
        return sum(1 for _ in _STATEMENT.finditer(self.code))

    def tokens(self) -> int:
        """Words, numbers and punctuation marks outside comments (a string is one word)."""
        return sum(1 for _ in _TOKEN.finditer(self.code))

    def token_start(self, number: int) -> int:
        """The offset where token ``number`` (counting from 0) starts; the text's end when there are fewer."""
        for index, found in enumerate(_TOKEN.finditer(self.code)):
            if index == number:
                return found.start()
        return len(self.code)

    def start_of(self, number: int) -> int | None:
        """The offset where statement ``number`` (counting from 0) starts, or None when there are fewer."""
        for index, found in enumerate(_STATEMENT.finditer(self.code)):
            if index == number:
                return found.start()
        return None

    def bounds(self, offset: int) -> tuple[int, int]:
        """The statement containing ``offset``: from after the separator before it to the next separator.

        An offset on a separator belongs to the statement that the separator ends.
        """
        start = max(self.code.rfind(";", 0, offset), self.code.rfind("\n", 0, offset)) + 1
        ends = [end for end in (self.code.find(";", offset), self.code.find("\n", offset)) if end != -1]
        return start, min(ends, default=len(self.code))


def _blanked(found: re.Match) -> str:
    """A string as text that separates nothing, a comment as spaces (it is no statement)."""
    text = found.group()
    return ("x" if text.startswith('"') else " ") * len(text)
