"""polykv's pytest plugin (a ``pytest11`` entry point): markers and hypothesis profiles for policy tests.

Loaded in any pytest run where polykv is installed, so it imports nothing heavy: no torch, no
transformers. ``HYPOTHESIS_PROFILE=polykv-ci`` (bounded, derandomised) or ``polykv-thorough``
(many examples) chooses a profile; without it hypothesis keeps its own.
"""

from __future__ import annotations

import os

PROFILES = {
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
    config.addinivalue_line("markers", "slow: loads a real model or runs long (deselect with -m 'not slow')")
    if os.environ.get("HYPOTHESIS_PROFILE") in PROFILES:
        from hypothesis import settings

        settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


def pytest_collection_modifyitems(config, items) -> None:
    """Mark a contract's expected failures as strict xfails; skip gpu tests where CUDA is absent."""
    import pytest

    for item in items:
        expected = getattr(getattr(item, "cls", None), "expected_failures", ())
        if getattr(item, "originalname", None) in expected:
            item.add_marker(pytest.mark.xfail(strict=True, reason="listed in expected_failures"))
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
