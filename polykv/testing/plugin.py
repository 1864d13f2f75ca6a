"""polykv's pytest plugin (a ``pytest11`` entry point): markers and hypothesis profiles for policy tests.

Loaded in any pytest run where polykv is installed, so it imports nothing heavy: no torch, no
transformers. ``HYPOTHESIS_PROFILE=polykv-ci`` (bounded, derandomised) or ``polykv-thorough``
(many examples) chooses a profile; without it hypothesis keeps its own.

``@pytest.mark.memory_limit(MiB)`` runs a test with at most that much more memory than the process
holds when it starts: a test that would allocate without bound (a fuzzer drawing a huge size) fails
with MemoryError instead of taking the machine, and the whole run, down with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TypedDict

import pytest


class HypothesisProfile(TypedDict, total=False):
    """What a profile sets: keywords of hypothesis' ``settings``."""

    max_examples: int
    deadline: None
    derandomize: bool
    print_blob: bool


PROFILES: dict[str, HypothesisProfile] = {
    "polykv-ci": {"max_examples": 50, "deadline": None, "derandomize": True, "print_blob": True},
    "polykv-thorough": {"max_examples": 2000, "deadline": None},
}


def _register_profiles() -> None:
    """Registered on import, before hypothesis' own plugin reads ``--hypothesis-profile``."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    for name, options in PROFILES.items():
        settings.register_profile(name, suppress_health_check=[HealthCheck.too_slow], **options)


_register_profiles()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped where none is present)")
    config.addinivalue_line(
        "markers", "memory_limit(mib): fail with MemoryError past this many MiB more than the process holds (Linux)"
    )
    config.addinivalue_line("markers", "slow: loads a real model or runs long (deselect with -m 'not slow')")
    if os.environ.get("HYPOTHESIS_PROFILE") in PROFILES:
        from hypothesis import settings

        settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("memory_limit")
    if marker is None:
        return (yield)
    with memory_limit(marker.args[0]):
        return (yield)


@contextlib.contextmanager
def memory_limit(mib: int) -> Iterator[None]:
    """Let the process map at most ``mib`` MiB of data more than now (RLIMIT_DATA); a no-op off Linux."""
    try:
        import resource

        with open("/proc/self/status", encoding="ascii") as status:
            held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
    except (ImportError, OSError, StopIteration):
        yield
        return
    before = resource.getrlimit(resource.RLIMIT_DATA)
    limit = held + mib * 2**20
    if before[1] != resource.RLIM_INFINITY:
        limit = min(limit, before[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, before)


def pytest_collection_modifyitems(config, items) -> None:
    """Mark a contract's expected failures as strict xfails; skip gpu tests where CUDA is absent."""
    for item in items:
        expected = getattr(getattr(item, "cls", None), "expected_failures", ())
        if getattr(item, "originalname", None) in expected:
            item.add_marker(pytest.mark.xfail(strict=True, reason="listed in expected_failures"))
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
