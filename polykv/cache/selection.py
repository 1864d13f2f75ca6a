"""Running a policy: the top-k of its scores, its answer checked, padding rows handled here.

Policies only ever see a layer where compression is needed. Rows (and heads) with no more real
tokens than the budget keep all of them, whatever the policy says, and the newest others (with
left padding: the last ``budget`` entries, every real token plus the latest padding, masked in
attention).

What a policy returns is checked without a host round trip: the checks run on the device and
leave a bit mask of problems (``Selection.problems``) that the cache reads at its next point of
synchronisation (the start of the next forward pass, or right away on the CPU, where reading it
costs nothing; see ``checks``). Shapes, dtypes and devices are host metadata and are checked at
once. A policy that raises (even SystemExit) fails the request with a PolicyError naming the
policy, its plugin and the layer. Views are read-only: a policy that writes into the keys, values,
positions or mask it was shown is caught by the tensors' version counters (no copy, no sync) and
fails the same way, before the cache keeps anything; a write through ``.data`` bypasses the counters
(the contract tests compare the tensors themselves).
"""

from __future__ import annotations

import attrs
import torch

from polykv.cache.checks import DUPLICATE, NAN_SCORE, OUT_OF_RANGE, PADDING
from polykv.errors import PolicyError, PolykvError
from polykv.policy import LayerView, Policy, ScoringPolicy


@attrs.frozen
class Selection:
    """The sorted indices of the tokens to keep (B, H, K), and a 0-dim int32 tensor of problem bits."""

    indices: torch.Tensor
    problems: torch.Tensor


#: The tensors of a view a policy must not change, by the name its messages use.
READ_ONLY = ("keys", "values", "positions", "token_mask")


def choose(policy: Policy, view: LayerView, *, where: str) -> Selection:
    """Run ``policy`` on ``view``; ``where`` names the policy and layer in errors."""
    versions = [getattr(view, name)._version for name in READ_ONLY]
    try:
        if isinstance(policy, ScoringPolicy):
            keep, problems = _top_scores(policy, view, where)
        else:
            keep, problems = _selected(policy, view, where)
    except PolykvError:
        raise
    except (Exception, SystemExit) as error:  # a policy's own failure is reported with its name and layer
        raise PolicyError(f"{where} raised {type(error).__name__}: {error}") from error
    changed = [name for name, version in zip(READ_ONLY, versions) if getattr(view, name)._version != version]
    if changed:
        raise PolicyError(
            f"{where} changed the view's {' and '.join(changed)} in place; a policy reads its view and returns "
            "scores or indices (copy a tensor before changing it)"
        )
    real = view.token_mask.sum(dim=-1)  # (B, H)
    short = real <= view.budget
    keep = torch.where(short[..., None], _every_real(view), keep).sort(dim=-1).values
    if not isinstance(policy, ScoringPolicy):  # top-k of scores can only give distinct real tokens
        repeated = (keep[..., 1:] == keep[..., :-1]).any()
        padding = ~(view.token_mask.gather(-1, keep) | short[..., None]).all()
        problems = problems | repeated.int() * DUPLICATE | padding.int() * PADDING
    return Selection(keep, problems)


def _top_scores(policy: ScoringPolicy, view: LayerView, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    scores = policy.score(view)
    expected = tuple(view.token_mask.shape)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        found = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PolicyError(f"{where}: score() returned {found}, expected a tensor of shape {expected} (B, H, L)")
    if scores.device != view.token_mask.device:
        raise PolicyError(f"{where}: score() returned a tensor on {scores.device}, expected {view.token_mask.device}")
    if scores.is_complex():
        raise PolicyError(f"{where}: score() returned {scores.dtype}, expected real numbers")
    scores = scores.float()
    nan = (scores.isnan() & view.token_mask).any()
    scores = scores.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    scores = scores.masked_fill(~view.token_mask, -torch.inf)
    keep = ordered_keys(scores).topk(view.budget, dim=-1, sorted=False).indices
    return keep, nan.int() * NAN_SCORE


def _selected(policy: Policy, view: LayerView, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    keep = policy.select(view)
    expected = (*view.token_mask.shape[:2], view.budget)
    if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != expected:
        found = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise PolicyError(f"{where}: select() returned {found}, expected a tensor of shape {expected}")
    if keep.dtype != torch.long:
        raise PolicyError(f"{where}: select() returned {keep.dtype} indices, expected torch.long")
    if keep.device != view.token_mask.device:
        raise PolicyError(f"{where}: select() returned indices on {keep.device}, expected {view.token_mask.device}")
    length = view.token_mask.shape[-1]
    outside = ((keep < 0) | (keep >= length)).any()
    return keep.clamp(0, length - 1), outside.int() * OUT_OF_RANGE


def _every_real(view: LayerView) -> torch.Tensor:
    """For rows with no more real tokens than the budget: every real token, then the newest others (B, H, budget).
    With left padding these are the last ``budget`` tokens."""
    length = view.token_mask.shape[-1]
    newest_real_first = view.token_mask.long() * length + torch.arange(length, device=view.token_mask.device)
    return newest_real_first.topk(view.budget, dim=-1, sorted=False).indices


def ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like ``scores`` (float32), ties broken towards the earlier token.

    top-k breaks ties in no documented order; folding the token index into the key makes the
    choice deterministic on every device, so a padded row keeps what it would keep alone.
    """
    bits = scores.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    negative = bits >= 0x80000000
    ordered = torch.where(negative, 0xFFFFFFFF - bits, bits + 0x80000000)  # monotone in the float's value
    length = scores.shape[-1]
    earlier_first = length - 1 - torch.arange(length, device=scores.device)
    return ordered * (1 << 31) + earlier_first
