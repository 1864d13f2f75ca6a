"""Inductor's compiled kernels kept in one file, so a run on a fresh GPU machine skips most of its compile.

A GPU machine lent for minutes is handed back when idle, and the next one starts bare: the first
compile of the bundled model's steps (every shape a speculation row needs) took about 7 of a
command's 10 minutes. ``torch.compiler.save_cache_artifacts`` packs what inductor compiled in this
process (its FX graphs and Triton kernels); loading them into a fresh process on the same kind of
device and the same torch lets those compiles be cache hits. Dynamo still traces the model.
The file is gzipped: the packed artifacts compress about 12x (40 MB to 3.3 MB for a quick CPU
run), and what a GPU command carries is limited to 64 MiB beside the model.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch


def load(path: Path | None) -> None:
    """Seed this process's compile caches from ``path`` where it exists (else nothing to do)."""
    if path is None or not path.exists():
        return
    info = torch.compiler.load_cache_artifacts(gzip.decompress(path.read_bytes()))
    counts = {kind: len(keys) for kind, keys in info.artifacts.items()} if info is not None else {}
    print(f"compile cache: {path.stat().st_size / 2**20:.1f} MiB loaded from {path}, entries {counts}", flush=True)


def save(path: Path | None) -> None:
    """Write what this process compiled so far to ``path`` (replacing it)."""
    if path is None:
        return
    found = torch.compiler.save_cache_artifacts()
    if found is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(found[0], compresslevel=6))
