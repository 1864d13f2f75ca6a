"""The code blocks of the documentation, and how each is checked (tests/test_docs.py runs them).

Every fenced block of README.md, docs/*.md and examples/*/README.md is checked by its language:

- ``python``: run as a script (after the file's earlier Python blocks), in a folder where the
  repository's files are at hand; a policy class it defines must not take a built-in's name.
- ``bash`` / ``sh``: each command runs and must succeed, except ``pip ...`` and ``pytest ...``,
  which must be commands that ``.ci/run`` runs (CI installs and tests exactly as the README says).
- ``toml``: parsed.
- a block whose first line is ``$ COMMAND``: a transcript; each command runs and what it prints must
  be the lines shown under it (its standard output, with its standard error when it fails).

A comment on the line before a block says more (several with ``;``)::

    <!-- doc-test: slow -->                the block loads the real model or runs long
    <!-- doc-test: heavy -->               runs for many seconds beside what lighter blocks check: ``pytest -m heavy``
    <!-- doc-test: skip: REASON -->        not run, for the reason given (shown by pytest -ra; it ends the comment)
    <!-- doc-test: output -->              the output of the previous block's last command
    <!-- doc-test: spec -->                spec text: ``polykv validate`` must accept it
    <!-- doc-test: file NAME -->           written to NAME in the folder later commands run in
    <!-- doc-test: excerpt PATH -->        runs of lines of PATH (relative to the Markdown file), ``...`` between runs
    <!-- doc-test: pytest -->              a test file: pytest runs it and it must pass

In shown output and excerpts a line ``...`` stands for any lines; without one at the start or the
end, the lines shown must be the first or the last.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<lang>[\w-]*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!-- doc-test: (?P<text>.*?) -->\s*$")
WORDS = {"slow", "heavy", "output", "spec", "pytest"}
NAMED = {"skip", "file", "excerpt"}
SHELLS = {"bash", "sh"}
ELISION = "..."


@attrs.frozen
class Block:
    """One fenced block: where it is, its language, its text (its fence's indentation removed), what is said of it."""

    path: Path
    line: int
    lang: str
    text: str
    words: frozenset[str] = frozenset()
    named: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def said(self, word: str) -> str | None:
        """The value of a ``word VALUE`` directive (``skip: why``, ``file NAME``, ``excerpt PATH``), or None."""
        return dict(self.named).get(word)

    @property
    def transcript(self) -> bool:
        return not self.lang and self.text.startswith("$ ")


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of the Markdown file ``path``, with the directive of the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = next(
            (i for i in range(index + 1, len(lines)) if lines[i].strip() == fence and lines[i].startswith(indent)),
            None,
        )
        if end is None:
            raise ValueError(f"{path}:{index + 1}: a code block that is never closed")
        body = [line.removeprefix(indent) for line in lines[index + 1 : end]]
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        words, named = _directive(before, f"{path}:{index}")
        found.append(Block(path, index + 1, opening["lang"], "\n".join(body) + "\n", words, named))
        index = end + 1
    return found


def _directive(line: str, where: str) -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    match = DIRECTIVE.match(line)
    if not match:
        return frozenset(), ()
    words, named = set(), []
    text, _, reason = match["text"].partition("skip:")  # a reason runs to the end of the comment
    parts = [p.strip() for p in text.split(";") if p.strip()] + ([f"skip {reason.strip()}"] if reason else [])
    for part in parts:
        word, _, value = part.partition(" ")
        word = word.removesuffix(":")
        if word in WORDS and not value:
            words.add(word)
        elif word in NAMED and value.strip():
            named.append((word, value.strip()))
        else:
            raise ValueError(f"{where}: unknown doc-test directive {part!r}")
    return frozenset(words), tuple(named)


def commands(text: str) -> list[str]:
    """The commands of a shell block, ``a && b`` split in two, comments and blank lines left out."""
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        command = []
        for word in [*words, "&&"]:
            if word == "&&":
                found.append(shlex.join(command))
                command = []
            else:
                command.append(word)
    return found


def transcript(text: str) -> list[tuple[str, str]]:
    """``(command, shown output)`` for each ``$ command`` of a transcript block."""
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
        else:
            raise ValueError(f"a transcript starts with '$ COMMAND', not {line!r}")
    return [(command, "\n".join(shown)) for command, shown in steps]


def mismatch(shown: str, actual: str, *, anchored: bool = True) -> str | None:
    """Why ``actual`` is not what ``shown`` shows (``...`` lines stand for any lines), or None when it is;
    ``anchored``: the first and last lines shown are the first and last of ``actual``, unless ``...``."""
    want = [line.rstrip() for line in shown.strip("\n").splitlines()]
    have = [line.rstrip() for line in actual.strip("\n").splitlines()]
    runs: list[list[str]] = [[]]
    for line in want:
        if line.strip() == ELISION:
            runs.append([])
        else:
            runs[-1].append(line)
    at = 0
    for number, run in enumerate(runs):
        if not run:
            continue
        first = anchored and number == 0
        starts = [at] if first else range(at, len(have) - len(run) + 1)
        found = next((i for i in starts if have[i : i + len(run)] == run), None)
        if found is None:
            return f"these lines are not {'where shown' if first else 'found in order'}:\n" + "\n".join(run)
        at = found + len(run)
    if anchored and runs[-1] and at != len(have):
        return "more lines follow the last one shown:\n" + "\n".join(have[at : at + 5])
    return None
