"""What commands that load a model check first: the device, the model's place, the spec."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from polykv.errors import PolykvError


def device(args: argparse.Namespace) -> str:
    """The device asked for, checked before anything loads (default: cuda when present)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise PolykvError("--device cuda: no CUDA device is available here (torch sees none); use --device cpu")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def model_location(args: argparse.Namespace):
    """Where the model is (the bundled one by default), checked before it loads."""
    from polykv.model import default_model_location, locate

    return locate(args.model) if args.model else default_model_location()


def spec_argument(text: str, source: str):
    """A spec from an argument that names a file or holds spec text."""
    from polykv.plan import as_spec

    path = Path(text)
    if os.sep in text or text.endswith(".pkv") or path.is_file():
        if not path.is_file():
            raise PolykvError(f"{source} {text}: no such file (give a spec file, or spec text such as '*: snapkv@256')")
        return as_spec(path)
    return as_spec(text, source=source)


def writable(path: Path, option: str) -> None:
    if not path.parent.exists():
        raise PolykvError(f"{option} {path}: the folder {path.parent} does not exist")


def command_line() -> str:
    """The command as typed, for the settings a result records (``python -m polykv`` reads as ``polykv``)."""
    import shlex
    import sys

    return shlex.join(["polykv", *sys.argv[1:]])
