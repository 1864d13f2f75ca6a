"""Every built-in policy honours the contract that policy packages run on theirs (polykv.testing)."""

import importlib
import importlib.metadata
import sys
from typing import ClassVar

import pytest
import torch
from fake_plugins import KNORM_AGAIN, fake_distribution
from polykv_plugins import (
    H2O,
    TOVA,
    ExpectedAttention,
    Full,
    KeyNorm,
    KVzip,
    ObservedAttention,
    PyramidKV,
    RandomEviction,
    SnapKV,
    Streaming,
)

from polykv.policy import ScoringPolicy
from polykv.testing import PolicyContract


class TestFull(PolicyContract):
    policy = Full
    # Full keeps everything: it is never asked to choose, and has no budget to bound.
    expected_failures = (
        "test_keeps_its_budget_and_every_real_token_it_can",
        "test_choices_are_distinct_and_in_range",
        "test_a_padded_row_keeps_what_it_keeps_alone",
        "test_rows_are_chosen_independently",
        "test_is_deterministic_and_leaves_the_view_unchanged",
        "test_works_in_every_dtype_and_device",
        "test_works_at_decode_time_where_it_can",
    )


class TestStreaming(PolicyContract):
    policy = Streaming


class TestSnapKV(PolicyContract):
    policy = SnapKV
    parameters: ClassVar[dict] = {"window": 4}  # small windows keep the generated views small


class TestPyramidKV(PolicyContract):
    policy = PyramidKV


class TestH2O(PolicyContract):
    policy = H2O


class TestTOVA(PolicyContract):
    policy = TOVA


class TestTOVAPerHead(PolicyContract):
    policy = TOVA
    parameters: ClassVar[dict] = {"per_head": True}


class TestKeyNorm(PolicyContract):
    policy = KeyNorm


class TestRandom(PolicyContract):
    policy = RandomEviction


class TestObservedAttention(PolicyContract):
    policy = ObservedAttention


class TestKVzip(PolicyContract):
    policy = KVzip


class TestExpectedAttention(PolicyContract):
    policy = ExpectedAttention
    parameters: ClassVar[dict] = {"window": 4}


class _RanksBySlot(ScoringPolicy):
    """Declares static decoding but ranks by slot order, which static decoding does not keep."""

    name = "ranks-by-slot"
    description = "Keeps the last slots."
    static_decoding = True

    def score(self, view):
        return torch.arange(view.length, dtype=torch.float32).expand(view.positions.shape)


def test_the_contract_catches_a_static_policy_that_ranks_by_slot():
    contract = type("TestRanksBySlot", (PolicyContract,), {"policy": _RanksBySlot})()
    with pytest.raises(AssertionError, match="depend on the order of slots"):
        contract.test_static_scores_do_not_depend_on_slot_order()


class _ReadsPositionsAsSlots(ScoringPolicy):
    """Looks a token's key up by its position, as if positions were slot indices (they are only until a first
    eviction)."""

    name = "positions-as-slots"
    description = "Keeps the tokens whose key at their position is longest."

    def score(self, view):
        norms = view.keys.float().norm(dim=-1)
        return norms.gather(-1, view.positions)


class _FixedBuffer(ScoringPolicy):
    """Works in a buffer of 128 tokens, which a real prompt outgrows."""

    name = "fixed-buffer"
    description = "Keeps the newest tokens, if there are at most 128."

    def score(self, view):
        buffer = torch.zeros(*view.positions.shape[:-1], 128)
        buffer[..., : view.length] = view.positions.float()
        return buffer[..., : view.length]


@pytest.mark.parametrize(
    ("policy", "raised"),
    [(_ReadsPositionsAsSlots, "index .* out of bounds"), (_FixedBuffer, "size of tensor|expanded size")],
)
def test_the_contract_catches_a_policy_that_fails_on_evicted_or_long_views(policy, raised):
    """Random views have positions with gaps (as after evictions) and are at times hundreds of tokens long."""
    contract = type(f"Test{policy.__name__}", (PolicyContract,), {"policy": policy})()
    with pytest.raises(Exception, match=raised):
        contract.test_keeps_its_budget_and_every_real_token_it_can()


# --- the contract checks what users get: the package's entry point, next to the built-ins ---------------------

NEWEST = """
import polykv


class Newest(polykv.ScoringPolicy):
    name = "newest"
    description = "Keeps the newest tokens."

    def score(self, view):
        return view.positions.float()
"""
HOOK = """
import polykv
from {module} import {cls}


@polykv.hookimpl
def register_policies(register):
    register({cls})
"""


@pytest.fixture
def on_the_path(tmp_path, monkeypatch):
    """Put a made-up distribution on the path; return the contract for a policy class of one of its modules."""

    def install(modules: dict[str, str], entry_points: dict[str, str] | None, policy: str, lists_its_modules=True):
        for name in modules:
            monkeypatch.delitem(sys.modules, name, raising=False)
            monkeypatch.delitem(sys.modules, name.partition(".")[0], raising=False)
        made = fake_distribution(tmp_path, "polykv-mine", modules, entry_points, lists_its_modules)
        monkeypatch.syspath_prepend(str(made))
        module, _, name = policy.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return type(f"Test{name}", (PolicyContract,), {"policy": cls})()

    yield install
    for name in [name for name in sys.modules if name.startswith("polykv_mine")]:
        del sys.modules[name]


def failure_of(contract) -> str:
    with pytest.raises(pytest.fail.Exception) as failed:
        contract.test_its_entry_point_loads_it_next_to_the_builtins()
    return str(failed.value)


@pytest.mark.parametrize("lists_its_modules", [True, False], ids=["setuptools", "editable-by-hatchling"])
def test_the_contract_passes_a_policy_its_entry_point_loads(on_the_path, lists_its_modules):
    """Also when the distribution does not list its modules (an editable install by hatchling or flit): its entry
    point names them."""
    contract = on_the_path(
        {"polykv_mine": NEWEST + HOOK.format(module="polykv_mine", cls="Newest")},
        {"mine": "polykv_mine"},
        "polykv_mine.Newest",
        lists_its_modules,
    )
    contract.test_its_entry_point_loads_it_next_to_the_builtins()


def test_the_contract_fails_a_name_taken_by_a_builtin_as_polykv_says_it(on_the_path):
    contract = on_the_path({"polykv_mine": KNORM_AGAIN}, {"mine": "polykv_mine"}, "polykv_mine.KeyNorm")
    version = importlib.metadata.version("polykv-core")
    assert failure_of(contract) == (
        f"polykv: skipped plugin polykv-mine: policy 'knorm' is already provided by polykv-core {version}"
    )


def test_the_contract_fails_an_entry_point_that_cannot_be_imported(on_the_path):
    contract = on_the_path(
        {
            "polykv_mine.policy": NEWEST,
            "polykv_mine.hooks": "import polykv_mine_missing_dependency\n"
            + HOOK.format(module="polykv_mine.policy", cls="Newest"),
        },
        {"mine": "polykv_mine.hooks"},
        "polykv_mine.policy.Newest",
    )
    assert failure_of(contract) == (
        "polykv: skipped plugin polykv-mine: import failed: ModuleNotFoundError: "
        "No module named 'polykv_mine_missing_dependency'"
    )


def test_the_contract_fails_a_package_without_an_entry_point(on_the_path):
    contract = on_the_path({"polykv_mine": NEWEST}, None, "polykv_mine.Newest")
    assert failure_of(contract).startswith(
        "polykv-mine declares no entry point in the group 'polykv', so polykv never loads 'newest'; add to its "
        'pyproject.toml, then reinstall it:\n[project.entry-points.polykv]\nnewest = "polykv_mine"'
    )


def test_the_contract_fails_an_entry_point_that_registers_another_class(on_the_path):
    oldest = NEWEST.replace("Newest", "Oldest").replace("newest", "oldest").replace("view.positions", "-view.positions")
    contract = on_the_path(
        {"polykv_mine": NEWEST + oldest + HOOK.format(module="polykv_mine", cls="Oldest")},
        {"mine": "polykv_mine"},
        "polykv_mine.Newest",
    )
    assert "registers no policy 'newest' of class Newest" in failure_of(contract)


def test_the_contract_fails_a_policy_no_installed_package_provides():
    contract = type("TestRanksBySlot", (PolicyContract,), {"policy": _RanksBySlot})()
    assert failure_of(contract).startswith(
        "_RanksBySlot comes from the module 'test_contract', which no installed distribution provides"
    )
