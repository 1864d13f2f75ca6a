"""The decided record: what one layer keeps in one phase, from resolution through the plan to the cache.

A ``Choice`` names a policy, its parameters (every one, defaults included) and a budget. Resolution
makes one for every layer and phase, the plan records them (and writes them as JSON), and the
cache runs them. A budget of None keeps every token: such a layer never runs its policy (``full``
is the policy a spec names for that, and what resolution records for a layer it keeps whole).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from polykv.budget import Budget
from polykv.values import Value, format_use

#: The policy a choice names when the layer keeps every token (the built-in ``full`` policy).
WHOLE = "full"


# A typed converter, as polykv.converters says why.
def _params(params: Mapping[str, Value]) -> dict[str, Value]:
    return dict(params)


@attrs.frozen
class Choice:
    """A policy with its parameters and budget for one layer and phase (``budget`` None: keep everything)."""

    policy: str
    params: Mapping[str, Value] = attrs.field(factory=dict, converter=_params)
    budget: Budget | None = None

    @classmethod
    def whole(cls) -> Choice:
        """The choice of a layer kept whole."""
        return cls(WHOLE)

    def tokens(self, prompt_length: int) -> int | None:
        """The budget in tokens for a prompt of ``prompt_length`` tokens (None: no limit)."""
        return None if self.budget is None else self.budget.tokens(prompt_length)

    def describe(self) -> str:
        """``snapkv@256(window=32, kernel=7, pooling="max")``: the choice as the language writes it."""
        return format_use(self.policy, None if self.budget is None else str(self.budget), self.params)
