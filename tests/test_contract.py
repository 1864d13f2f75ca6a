"""Every built-in policy honours the contract that policy packages run on theirs (polykv.testing)."""

from typing import ClassVar

import pytest
import torch
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
