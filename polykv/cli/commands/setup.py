"""What commands that load a model check first: the device, the model's place, the spec."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from polykv.errors import PolykvError


def device(args: argparse.Namespace) -> str:
    """The device asked for, checked before anything loads (default: cuda when present)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise PolykvError("--device cuda: no CUDA device is available here (torch sees none); use --device cpu")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def model_location(args: argparse.Namespace):
    """Where the model is (the bundled one by default, or ``--model default``), checked before it loads."""
    from polykv.model import DEFAULT, locate

    return locate(args.model or DEFAULT)


def spec_argument(args: argparse.Namespace, source: str):
    """The spec the command line gives: ``--spec-file FILE``, or spec text (named ``source`` in messages)."""
    from polykv.language.diagnostics import SpecError
    from polykv.language.parse import load, parse

    if args.spec_file is not None:
        return load(args.spec_file)
    try:
        return parse(args.spec, source=source)
    except SpecError:
        if ":" not in args.spec and (args.spec.endswith(".pkv") or "/" in args.spec or Path(args.spec).is_file()):
            raise PolykvError(
                f"{source} {args.spec}: not spec text (it reads like a file name): a spec file is given with "
                f"--spec-file {args.spec}"
            ) from None
        raise


def only_for_auto(checked, options: Mapping[str, object]) -> None:
    """Refuse options (``options``: each option's value, None where not given) that only routing and budget
    solving read, for a spec that leaves them nothing to decide: they would be dropped without a word."""
    given = [option for option, value in options.items() if value is not None]
    if given and not checked.has_auto:
        named = " and ".join(given)
        raise PolykvError(
            f"{named} {'say' if len(given) > 1 else 'says'} how `auto` routes and solves, and this spec has no "
            f"`auto` policy or budget: drop {named}, or leave a layer's policy or budget to auto"
        )


def writable(
    path: Path, option: str, *, folder: bool = False, example: str = "profile.json", suffix: str | None = None
) -> None:
    """Refuse, before any work, an output that cannot be written: a missing or read-only folder, a folder
    where a file is asked for (``example`` names a file there), a file where a folder is (``folder``: the
    output is a folder, made when missing), or a file whose name does not end in ``suffix``."""
    if folder and path.exists() and not path.is_dir():
        raise PolykvError(f"{option} {path}: exists and is not a folder; name a folder (it is made when missing)")
    if not folder and path.is_dir():
        raise PolykvError(f"{option} {path}: is a folder; name the file to write, such as {path / example}")
    if suffix and path.suffix.lower() != suffix:
        raise PolykvError(f"{option} {path}: writes a {suffix} file; name it so, such as {path.with_suffix(suffix)}")
    into = path if folder and path.is_dir() else path.parent
    if not into.exists():
        raise PolykvError(f"{option} {path}: the folder {into} does not exist")
    try:  # the one sure test: a file made and removed there (permissions alone miss read-only disks, /proc)
        with tempfile.TemporaryFile(dir=into):
            pass
    except OSError as error:
        raise PolykvError(f"{option} {path}: cannot write in {into}: {error.strerror or error}") from None


def within_positions(model, needed: int, what: str) -> None:
    """Refuse, before the work starts, ``needed`` positions past the model's (``what`` says what needs them)."""
    from polykv.model.describe import positions

    most = positions(model)
    if most is not None and needed > most:
        raise PolykvError(f"{what} need {needed:,} positions; the model has {most:,} (its max_position_embeddings)")


def command_line() -> str:
    """The command as typed, for the settings a result records (``python -m polykv`` reads as ``polykv``)."""
    import shlex
    import sys

    return shlex.join(["polykv", *sys.argv[1:]])


def task_formats(texts: Sequence[str], option: str = "--tasks") -> list[tuple[str, str]]:
    """``task`` or ``task:format`` words as (task, format) pairs, or a PolykvError naming the unknown one."""
    from polykv.tasks.tasks import FORMATS, TASKS

    parsed = []
    for text in texts:
        task, _, form = text.partition(":")
        if task not in TASKS or (form or "raw") not in FORMATS:
            raise PolykvError(f"{option} {text}: tasks are {', '.join(TASKS)}, optionally :chat (or :raw)")
        parsed.append((task, form or "raw"))
    return parsed
