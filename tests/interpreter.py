"""Running a test file's Triton tests in triton's interpreter, on the CPU.

triton picks interpreting or compiling once per process, when it is imported, and an interpreting
process would also send polykv's CPU work through the kernels; so a kernel's interpreted tests run
in a child pytest process started with TRITON_INTERPRET=1 (``run_interpreted``), marked
``interpreted``, and are skipped in the parent, whose own tests are marked ``parent_only``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from polykv.cache.kernels.triton_support import available

INTERPRETED = available(torch.device("cpu"))
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the child process of test_interpreted_tests_pass")
parent_only = pytest.mark.skipif(INTERPRETED, reason="the parent process's test")


def run_interpreted(test_file: str) -> None:
    """Run ``test_file``'s tests but the GPU ones in a child process whose triton interprets; fail if they do."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if _release("triton") < (3, 7) and _release("numpy") >= (2, 4):
        pytest.skip("triton < 3.7 cannot interpret loops under numpy >= 2.4 (triton-lang/triton#9171)")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-m", "not gpu", "-p", "no:cacheprovider"],
        cwd=Path(__file__).parents[1],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-5000:] + child.stderr[-2000:]


def _release(package: str) -> tuple[int, ...]:
    """A package's (major, minor) version."""
    return tuple(int(part) for part in version(package).split(".")[:2])
