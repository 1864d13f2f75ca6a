"""Reading and writing the files a user names, with the errors a user can act on.

Every file is read with a size cap (``/dev/zero`` or a huge file is refused after the cap, not read
to exhaustion), and a regular file over the cap is refused from its size before a byte is read.
Pipes and ``-`` (standard input) are read up to the cap like any file. Every error names the path
and says what went wrong in the system's words.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from polykv.errors import PolykvError

#: How the standard streams are named in messages.
STDIN = "<stdin>"
#: Moves the cache folder (``none`` turns it off).
CACHE_FOLDER_VARIABLE = "POLYKV_CACHE_DIR"


class UnreadableFile(PolykvError):
    """A file (or standard input) that cannot be read: missing, a folder, too large, not UTF-8 text."""


class UnwritableFile(PolykvError):
    """A file that cannot be written: no such folder, no permission, a full disk."""


def read_bytes(path: str | os.PathLike, *, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path`` (``-`` for standard input), at most ``limit`` of them.

    Raises UnreadableFile, worded ``PATH: cannot read: REASON``, for a missing file, a folder,
    a closed standard input, or more than ``limit`` bytes (``what`` says what the file is for).
    """
    shown = STDIN if str(path) == "-" else str(path)
    try:
        if str(path) == "-":
            stream = getattr(sys.stdin, "buffer", sys.stdin)
            if stream is None or getattr(stream, "closed", False):
                raise UnreadableFile(f"{shown}: cannot read: standard input is closed")
            data = stream.read(limit + 1)
            data = data.encode("utf-8") if isinstance(data, str) else data
        else:
            with Path(path).open("rb") as file:
                status = os.fstat(file.fileno())
                if status.st_size > limit:  # a regular file tells its size: refused before reading
                    raise UnreadableFile(_too_large(shown, limit, what))
                data = file.read(limit + 1)
    except OSError as error:
        raise UnreadableFile(f"{shown}: cannot read: {error.strerror or error}") from None
    except ValueError as error:  # reading a closed stream
        raise UnreadableFile(f"{shown}: cannot read: {error}") from None
    if len(data) > limit:
        raise UnreadableFile(_too_large(shown, limit, what))
    return data


def read_text(path: str | os.PathLike, *, limit: int, what: str = "file") -> str:
    """The UTF-8 text of ``path`` without a byte-order mark (see ``read_bytes``)."""
    data = read_bytes(path, limit=limit, what=what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        shown = STDIN if str(path) == "-" else str(path)
        raise UnreadableFile(f"{shown}: cannot read: not UTF-8 text (byte {error.start})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed over it), or raise
    UnwritableFile naming the path: a full disk never leaves half a file. A path that is not a regular
    file (``/dev/stdout``, a pipe) is written to in place."""
    path = Path(path)
    if path.is_dir():
        raise UnwritableFile(f"{path}: cannot write: it is a folder; name a file")
    if path.exists() and not path.is_file():
        with writing(path), path.open("w", encoding="utf-8") as file:
            file.write(text)
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside, an OSError (a full disk, no permission) is an UnwritableFile naming ``path``."""
    try:
        yield
    except OSError as error:
        raise UnwritableFile(f"{path}: cannot write: {error.strerror or error}") from None


def _too_large(shown: str, limit: int, what: str) -> str:
    return f"{shown}: cannot read: larger than {_size_words(limit)}, too large for a {what}"


def _size_words(nbytes: int) -> str:
    return f"{nbytes // 2**20:,} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def cache_folder() -> Path | None:
    """Where polykv keeps what it derives once per machine (converted models, the tasks' prose), or None
    when ``POLYKV_CACHE_DIR=none`` turns keeping them off."""
    setting = os.environ.get(CACHE_FOLDER_VARIABLE, "").strip()
    if setting.lower() == "none":
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "polykv"
