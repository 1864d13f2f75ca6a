"""Problems found on the device, and the errors they become.

Checks of what a policy returned (and of the padding of a prompt) run on the device and leave a
0-dim int tensor of problem bits instead of asking the host right away: on a GPU each question to
the host stalls the queue, and a cache has dozens of layers. The cache reads the bits once per
forward pass (``PolyCache.check``, at the start of the next pass), before any layer uses what the
checked step stored; on the CPU, where reading costs nothing, they are read at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from polykv.errors import CacheError, PolicyError

#: Problem bits a check can set.
OUT_OF_RANGE, DUPLICATE, PADDING, NAN_SCORE, RIGHT_PADDING = 1, 2, 4, 8, 16

_POLICY_PROBLEMS = {
    OUT_OF_RANGE: "select() returned indices outside the layer's tokens",
    DUPLICATE: "select() returned the same token twice in a row and head",
    PADDING: "select() kept padding although enough real tokens were there",
    NAN_SCORE: "score() gave NaN for a real token (give -inf to a token that must go, +inf to one that must stay)",
}


def raise_for(problems: torch.Tensor | int, where: str) -> None:
    """Raise the error ``problems`` (bits) stand for, naming ``where``; do nothing when there are none."""
    bits = int(problems)
    if not bits:
        return
    if bits & RIGHT_PADDING:
        raise CacheError(
            "a batch row has padding after its tokens; polykv needs left padding "
            "(tokenizer.padding_side = 'left'), as generation does"
        )
    # The first problem explains the rest (indices past the end are clamped, which makes duplicates).
    reason = next(text for bit, text in _POLICY_PROBLEMS.items() if bits & bit)
    raise PolicyError(f"{where}: {reason}")


def raise_pending(found: Iterable[tuple[torch.Tensor, str]]) -> None:
    """Read every pending problem flag (one host round trip per device) and raise the first."""
    found = list(found)
    if not found:
        return
    by_device: dict[torch.device, list[int]] = {}
    for number, (flag, _where) in enumerate(found):
        by_device.setdefault(flag.device, []).append(number)
    for numbers in by_device.values():
        flags = torch.stack([found[n][0] for n in numbers])
        if bool(flags.any()):
            for number, bits in zip(numbers, flags.tolist()):
                raise_for(bits, found[number][1])
