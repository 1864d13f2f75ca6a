"""Real prose present on every machine: the documentation strings of Python's own standard library.

Nothing is downloaded. The modules' source files are read (never imported) and their docstrings
taken as paragraphs of English. Files are split in two halves by a stable hash of their path, so
that calibration and evaluation never share a sentence: ``paragraphs("calibration")`` and
``paragraphs("evaluation")`` are disjoint. The text depends on the Python version, which results
record.

Reading the library takes some 9 s on two cores, so the paragraphs are kept in the cache folder
(``polykv.files.cache_folder``) as JSON, keyed by the Python build, the library's folder and this
file's own text (a change to the rules below reads the library again).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
import tempfile
from pathlib import Path

from polykv.files import cache_folder

SPLITS = ("calibration", "evaluation")
#: Paragraphs shorter than this (characters) are headings or fragments, and are left out.
SHORTEST = 160
#: Folders of the standard library that hold tests, data or generated code rather than documentation.
SKIPPED = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "tkinter", "turtledemo",
    "encodings", "pydoc_data",
}  # fmt: skip


def paragraphs(split: str) -> tuple[str, ...]:
    """Every prose paragraph of the standard library's docstrings in ``split``, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split is one of {', '.join(SPLITS)}, not {split!r}")
    return _both()[SPLITS.index(split)]


@functools.cache
def _both() -> tuple[tuple[str, ...], ...]:
    kept = _kept_file()
    if kept is not None and kept.is_file():
        try:
            return tuple(tuple(split) for split in json.loads(kept.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass  # damaged or half-written by an older polykv: read the library again
    both = _read_the_library()
    if kept is not None:
        _keep(kept, both)
    return both


def _kept_file() -> Path | None:
    """Where the paragraphs of this Python's library are kept, or None when nothing is kept."""
    root = cache_folder()
    if root is None:
        return None
    key = hashlib.sha256()
    for part in (sys.version, sysconfig.get_paths()["stdlib"], Path(__file__).read_text(encoding="utf-8")):
        key.update(part.encode())
    return root / "prose" / f"{key.hexdigest()[:16]}.json"


def _keep(path: Path, both: tuple[tuple[str, ...], ...]) -> None:
    """Write the paragraphs whole or not at all; a folder that cannot be written only costs the next run time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as file:
            json.dump(both, file)
        os.replace(file.name, path)
    except OSError:
        pass


def _read_the_library() -> tuple[tuple[str, ...], ...]:
    found: dict[str, list[str]] = {split: [] for split in SPLITS}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not SKIPPED & set(relative.parts) and not relative.parts[0].startswith("config-"):
            found[_split_of(relative)].extend(_prose(path))
    shared = set(found[SPLITS[0]]) & set(found[SPLITS[1]])  # a docstring copied between modules
    return tuple(tuple(dict.fromkeys(p for p in found[split] if p not in shared)) for split in SPLITS)


def _split_of(relative: Path) -> str:
    digest = hashlib.sha256(relative.as_posix().encode()).digest()
    return SPLITS[digest[0] % 2]


def _prose(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                found.extend(_paragraphs(inspect.cleandoc(docstring)))
    return found


def _paragraphs(text: str) -> list[str]:
    """Paragraphs that read as prose: no code, tables or option lists."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines()]
        if any(line.startswith((">>>", "...", "-", "*", "+", "|", "=")) for line in lines):
            continue
        paragraph = " ".join(lines)
        words = paragraph.split()
        if len(paragraph) < SHORTEST or not paragraph[0].isupper() or not paragraph.rstrip().endswith("."):
            continue
        if sum(word.isalpha() for word in words) < 0.7 * len(words):  # mostly words, not symbols
            continue
        kept.append(paragraph)
    return kept
