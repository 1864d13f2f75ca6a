"""Running a policy's ``select`` safely: its answer is checked, padding rows are handled here.

Policies only ever see a layer where compression is needed. Rows (and heads) with no more real
tokens than the budget keep all of them, whatever the policy says: the last ``budget`` entries,
which with left padding are every real token plus the latest padding (masked in attention).
"""

from __future__ import annotations

import torch

from polykv.errors import PolicyError
from polykv.policy import LayerView, Policy


def choose(policy: Policy, view: LayerView) -> torch.Tensor:
    """The sorted indices of the tokens to keep, (B, H, budget)."""
    batch, heads, length = view.token_mask.shape
    budget = view.budget
    keep = policy.select(view)
    real = view.token_mask.sum(dim=-1)  # (B, H)
    short = real <= budget
    _check(policy, view, keep, short)
    if short.any():
        tail = torch.arange(length - budget, length, device=keep.device).expand(batch, heads, budget)
        keep = torch.where(short[..., None], tail, keep)
    return keep.sort(dim=-1).values


def _check(policy: Policy, view: LayerView, keep: torch.Tensor, short: torch.Tensor) -> None:
    batch, heads, length = view.token_mask.shape
    where = f"policy {policy!r} on layer {view.layer} ({view.phase.value})"
    expected = (batch, heads, view.budget)
    if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != expected:
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise PolicyError(f"{where}: select() returned {shape}, expected a tensor of shape {expected}")
    if keep.dtype != torch.long:
        raise PolicyError(f"{where}: select() returned {keep.dtype} indices, expected torch.long")
    if keep.numel() == 0:
        return
    if keep.min() < 0 or keep.max() >= length:
        raise PolicyError(f"{where}: select() returned indices outside 0..{length - 1}")
    ordered = keep.sort(dim=-1).values
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise PolicyError(f"{where}: select() returned the same token twice in a row and head")
    kept_real = view.token_mask.gather(-1, keep)
    if not (kept_real | short[..., None]).all():
        raise PolicyError(f"{where}: select() kept padding although enough real tokens were there")
