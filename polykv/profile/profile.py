"""A calibration profile: what one model's layers lose under each policy and budget, kept on disk.

A profile stores the per-task loss tables (so task weights can change without measuring again),
the budget grid, each policy's parameters, the layer signals, and the model and settings they came
from. Routing and budget solving read it; using it with another model is an error.

The bundled default model's profile ships with polykv (``default_profile()``), so ``auto`` works
there out of the box; ``polykv calibrate`` makes one for any model.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from polykv import serialization
from polykv.errors import PolykvError
from polykv.model import ModelInfo, describe_model
from polykv.serialization import Loss
from polykv.values import Value

FORMAT = 1
#: Losses per [layer][policy][budget] (math.inf where a policy cannot take a budget).
LossTable = list[list[list[Loss]]]
#: The profile that ships for the bundled default model (see ``polykv calibrate --help`` for its command).
DEFAULT_PROFILE = "smollm2-135m-instruct.json"
#: Embedding rows whose norms identify a model's weights, and the relative tolerance across dtypes.
FINGERPRINT_ROWS, FINGERPRINT_TOLERANCE = 16, 0.02


class ProfileError(PolykvError):
    """A profile that cannot be read, or that does not belong to the model it is used with."""


@attrs.frozen
class TunedRegime:
    """The solver settings calibration found best at one average budget: task weights and a floor."""

    budget: int
    weights: Mapping[str, float]
    floor: int
    measured: Mapping[str, float] = attrs.field(factory=dict)  # the composed losses it was chosen on


@attrs.frozen
class Profile:
    """Measured losses of one model's layers: ``losses[task][layer][policy][budget]`` over ``grid``."""

    model: ModelInfo
    fingerprint: tuple[float, ...]
    settings: Mapping[str, Any]
    grid: tuple[int, ...] = attrs.field(converter=tuple)
    policies: Mapping[str, Mapping[str, Value]]
    losses: Mapping[str, LossTable]
    signals: Mapping[str, Mapping[str, list[float]]] = attrs.field(factory=dict)
    curves: Mapping[str, Mapping[str, LossTable]] = attrs.field(factory=dict)
    weights: Mapping[str, float] = attrs.field(factory=dict)
    regimes: tuple[TunedRegime, ...] = attrs.field(default=(), converter=tuple)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self.losses))

    @property
    def prompt_length(self) -> int:
        return int(self.settings["prompt_length"])

    def table(self, weights: Mapping[str, float] | None = None) -> list[list[list[float]]]:
        """Losses per [layer][policy][budget], averaged over tasks with ``weights`` (default: the profile's)."""
        weights = dict(weights or self.weights or {task: 1.0 for task in self.tasks})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ProfileError(f"no task {unknown[0]!r} in this profile; its tasks: {', '.join(self.tasks)}")
        total = sum(weights.values())
        first = self.losses[self.tasks[0]]
        return [
            [
                [sum(weights[t] * self.losses[t][layer][p][g] for t in weights) / total for g in range(len(self.grid))]
                for p in range(len(self.policies))
            ]
            for layer in range(len(first))
        ]

    def solved_regimes(self) -> tuple[TunedRegime, ...]:
        """The tuned regimes, or one default: the profile's weights (equal if none) and the smallest budget."""
        if self.regimes:
            return self.regimes
        weights = dict(self.weights or {task: 1.0 for task in self.tasks})
        return (TunedRegime(self.prompt_length, weights, self.grid[0]),)

    def signal(self, name: str) -> list[float]:
        """A scalar signal per layer, averaged over tasks."""
        per_task = self.signals[name]
        return [
            sum(values[layer] for values in per_task.values()) / len(per_task) for layer in range(self.model.layers)
        ]

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ProfileError unless ``model`` is the model this profile was measured on (any dtype)."""
        info, _ = describe_model(model)
        ours = (self.model.layers, self.model.query_heads, self.model.kv_heads, self.model.head_dim)
        theirs = (info.layers, info.query_heads, info.kv_heads, info.head_dim)
        if ours != theirs or not _close(fingerprint(model), self.fingerprint):
            raise ProfileError(
                f"this profile was measured on {self.model.name} ({self.model.geometry()}), not on "
                f"{info.name} ({info.geometry()}{', with other weights' if ours == theirs else ''}): "
                "calibrate this model with `polykv calibrate --model DIR --out PROFILE.json`"
            )

    # --- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The profile as a JSON-ready dict (what ``to_json`` writes)."""
        return serialization.document(self, format=FORMAT)

    def to_json(self) -> str:
        return serialization.dumps(self, format=FORMAT)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<profile>") -> Profile:
        """A profile from its JSON text; ProfileError names the source and the field that is wrong."""
        try:
            return serialization.loads(text, cls, format=FORMAT, what="profile", source=source)
        except serialization.FormatError as error:
            raise ProfileError(str(error)) from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        try:
            text = Path(path).read_bytes()
        except OSError as error:
            raise ProfileError(f"{path}: cannot read the profile: {error.strerror or error}") from None
        return cls.from_json(text, source=str(path))


def default_profile() -> Profile:
    """The profile measured on the bundled default model (SmolLM2-135M-Instruct), shipped with polykv."""
    resource = importlib.resources.files("polykv.profile").joinpath(DEFAULT_PROFILE)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"this polykv ships no {DEFAULT_PROFILE}: calibrate with `polykv calibrate`") from None
    return Profile.from_json(text, source=DEFAULT_PROFILE)


def as_profile(profile: Profile | str | os.PathLike | None) -> Profile:
    """A Profile from a Profile, a path, or None (the bundled default model's)."""
    if profile is None:
        return default_profile()
    if isinstance(profile, Profile):
        return profile
    return Profile.load(profile)


def fingerprint(model: torch.nn.Module) -> tuple[float, ...]:
    """Norms of a few embedding rows: the same for one model's weights in any dtype, different for another's."""
    weight = model.get_input_embeddings().weight
    rows = torch.linspace(0, weight.shape[0] - 1, FINGERPRINT_ROWS).long().to(weight.device)
    return tuple(round(float(n), 4) for n in weight[rows].detach().float().norm(dim=-1).cpu())


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= FINGERPRINT_TOLERANCE * max(abs(y), 1e-6) for x, y in zip(a, b))
