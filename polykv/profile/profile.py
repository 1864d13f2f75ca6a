"""A calibration profile: what one model's layers lose under each policy and budget, kept on disk.

A profile stores the per-task loss tables (so task weights can change without measuring again), and
where calibration measured heads (``polykv calibrate --heads``) a table per KV head of every layer,
the budget grid, each policy's parameters, the layer signals, and the model and settings they came
from. Routing and budget solving read it; using it with another model is an error.

The bundled default model's profile ships with polykv (``default_profile()``), so ``auto`` works
there out of the box; ``polykv calibrate`` makes one for any model.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
import torch

from polykv import serialization
from polykv.converters import ints
from polykv.errors import PolykvError
from polykv.files import UnreadableFile, read_bytes, write_text
from polykv.limits import MAX_DOCUMENT_BYTES
from polykv.model import ModelInfo, describe_model
from polykv.serialization import Loss
from polykv.values import OBJECTIVES, SETTINGS, Value

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT = 1
#: Losses per [layer][policy][budget] (math.inf where a policy cannot take a budget).
LossTable = list[list[list[Loss]]]
#: Losses per [layer][KV head][policy][budget]: only that head of that layer compressed.
HeadLossTable = list[list[list[list[Loss]]]]
#: The profiles that ship for the bundled default model, per setting and objective (see docs/routing.md and
#: docs/speculation.md for their commands).
DEFAULT_PROFILES = {
    ("question", "kl"): "smollm2-135m-instruct.json",
    ("context", "kl"): "smollm2-135m-instruct-context.json",
    ("question", "acceptance"): "smollm2-135m-instruct-acceptance.json",
}
#: The bundled model's profiles that measured each KV head, for specs that route heads (``heads *``).
DEFAULT_HEAD_PROFILES = {("question", "kl"): "smollm2-135m-instruct-heads.json"}
DEFAULT_PROFILE = DEFAULT_PROFILES[("question", "kl")]

#: Embedding rows whose norms identify a model's weights, and the relative tolerance across dtypes.
FINGERPRINT_ROWS, FINGERPRINT_TOLERANCE = 16, 0.02


class ProfileError(PolykvError, ValueError):
    """A profile that cannot be read, is not well formed, or does not belong to the model it is used with."""


@attrs.frozen
class TunedRegime:
    """The solver settings calibration found best at one average budget: task weights and a floor."""

    budget: int
    weights: Mapping[str, float]
    floor: int
    measured: Mapping[str, float] = attrs.field(factory=dict)  # the composed losses it was chosen on


# A typed converter, as polykv.converters says why.
def _regimes(items: Iterable[TunedRegime]) -> tuple[TunedRegime, ...]:
    return tuple(items)


@attrs.frozen
class Profile:
    """Measured losses of one model's layers: ``losses[task][layer][policy][budget]`` over ``grid``."""

    model: ModelInfo
    fingerprint: tuple[float, ...]
    settings: Mapping[str, Any]
    grid: tuple[int, ...] = attrs.field(converter=ints)
    policies: Mapping[str, Mapping[str, Value]]
    losses: Mapping[str, LossTable]
    signals: Mapping[str, Mapping[str, list[float]]] = attrs.field(factory=dict)
    curves: Mapping[str, Mapping[str, LossTable]] = attrs.field(factory=dict)
    weights: Mapping[str, float] = attrs.field(factory=dict)
    regimes: tuple[TunedRegime, ...] = attrs.field(default=(), converter=_regimes)
    #: Prefill time with each policy on every layer over the full cache's, on the calibration prompts.
    costs: Mapping[str, float] = attrs.field(factory=dict)
    #: Per task, the losses with one KV head of one layer compressed (empty: heads were not measured).
    head_losses: Mapping[str, HeadLossTable] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        problem = _malformed(self)
        if problem:
            raise ProfileError(problem)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self.losses))

    @property
    def prompt_length(self) -> int:
        return int(self.settings["prompt_length"])

    @property
    def setting(self) -> str:
        """Where the question was when the losses were measured (profiles before settings: in the prompt)."""
        return self.settings.get("setting", "question")

    @property
    def objective(self) -> str:
        """What the losses measure (``polykv.values.OBJECTIVES``; profiles before objectives: KL)."""
        return self.settings.get("objective", "kl")

    def check_setting(self, setting: str, objective: str = "kl") -> None:
        """Raise ProfileError unless this profile was measured for ``setting`` and ``objective``."""
        if setting != self.setting:
            raise ProfileError(
                f"this profile was measured with {_SETTING_WORDS[self.setting]}, not with {_SETTING_WORDS[setting]}: "
                f"calibrate for it with `polykv calibrate --setting {setting}`"
            )
        if objective != self.objective:
            raise ProfileError(
                f"this profile measured {_OBJECTIVE_WORDS[self.objective]}, not {_OBJECTIVE_WORDS[objective]}: "
                f"calibrate for it with `polykv calibrate --objective {objective}`"
            )

    @property
    def measures_heads(self) -> bool:
        """Whether calibration measured each KV head on its own (``polykv calibrate --heads``)."""
        return bool(self.head_losses)

    def table(self, weights: Mapping[str, float] | None = None) -> list[list[list[float]]]:
        """Losses per [layer][policy][budget], averaged over tasks with ``weights`` (default: the profile's)."""
        weights = self._weights(weights)
        total = sum(weights.values())
        return [
            [
                [sum(weights[t] * self.losses[t][layer][p][g] for t in weights) / total for g in range(len(self.grid))]
                for p in range(len(self.policies))
            ]
            for layer in range(self.model.layers)
        ]

    def head_table(self, weights: Mapping[str, float] | None = None) -> list[list[list[list[float]]]]:
        """Losses per [layer][KV head][policy][budget], averaged over tasks as ``table`` averages them."""
        if not self.measures_heads:
            raise ProfileError("this profile measured whole layers only: calibrate with `polykv calibrate --heads`")
        weights = self._weights(weights)
        total, budgets = sum(weights.values()), range(len(self.grid))
        return [
            [
                [
                    [sum(weights[t] * self.head_losses[t][layer][head][p][g] for t in weights) / total for g in budgets]
                    for p in range(len(self.policies))
                ]
                for head in range(self.model.kv_heads)
            ]
            for layer in range(self.model.layers)
        ]

    def _weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        weights = dict(weights or self.weights or {task: 1.0 for task in self.tasks})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ProfileError(f"no task {unknown[0]!r} in this profile; its tasks: {', '.join(self.tasks)}")
        return weights

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

    def check_model(self, model: PreTrainedModel) -> None:
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
        """Write the profile to ``path``, whole or not at all (UnwritableFile names the path)."""
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        try:
            text = read_bytes(path, limit=MAX_DOCUMENT_BYTES, what="profile")
        except UnreadableFile as error:
            raise ProfileError(str(error).replace(": cannot read:", ": cannot read the profile:", 1)) from None
        return cls.from_json(text, source=str(path))


#: How messages name each setting.
_SETTING_WORDS = {
    "question": "the question inside the compressed prompt",
    "context": "the context compressed before the question",
}


#: How messages name each objective.
_OBJECTIVE_WORDS = {"kl": "KL divergence", "acceptance": "a draft's rejected proposals (objective acceptance)"}


def default_profile(setting: str = "question", objective: str = "kl", *, heads: bool = False) -> Profile:
    """The profile measured on the bundled default model (SmolLM2-135M-Instruct) for ``setting`` and
    ``objective``, shipped with polykv; with ``heads``, one that measured each KV head too."""
    if setting not in SETTINGS:
        raise ProfileError(f"setting is one of {', '.join(SETTINGS)}, not {setting!r}")
    if objective not in OBJECTIVES:
        raise ProfileError(f"objective is one of {', '.join(OBJECTIVES)}, not {objective!r}")
    name = (DEFAULT_HEAD_PROFILES if heads else DEFAULT_PROFILES).get((setting, objective), "")
    try:
        text = importlib.resources.files("polykv.profile").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        measured = " that measured each KV head" if heads else ""
        raise ProfileError(
            f"this polykv ships no profile{measured} of its bundled model for {_SETTING_WORDS[setting]} and "
            f"{_OBJECTIVE_WORDS[objective]}: calibrate one with `polykv calibrate --setting {setting} --objective "
            f"{objective}{' --heads' if heads else ''}`"
        ) from None
    return Profile.from_json(text, source=name)


def as_profile(profile: Profile | str | os.PathLike | None) -> Profile:
    """A Profile from a Profile, a path, or None (the bundled default model's)."""
    if profile is None:
        return default_profile()
    if isinstance(profile, Profile):
        return profile
    return Profile.load(profile)


def fingerprint(model: PreTrainedModel) -> tuple[float, ...]:
    """Norms of a few embedding rows: the same for one model's weights in any dtype, different for another's."""
    # transformers types the input embeddings as a Module; a language model's are an Embedding (or a subclass).
    weight = cast(torch.nn.Embedding, model.get_input_embeddings()).weight
    rows = torch.linspace(0, weight.shape[0] - 1, FINGERPRINT_ROWS).long().to(weight.device)
    return tuple(round(float(n), 4) for n in weight[rows].detach().float().norm(dim=-1).cpu())


def _malformed(profile: Profile) -> str | None:
    """What makes ``profile`` unusable, as ``$.field: problem`` (None when it is well formed)."""
    grid, layers, policies = profile.grid, profile.model.layers, list(profile.policies)
    if not grid or any(isinstance(b, bool) or b < 1 for b in grid) or list(grid) != sorted(set(grid)):
        return f"$.grid: budgets are strictly ascending whole numbers of at least 1, got {list(grid)}"
    length = profile.settings.get("prompt_length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        return f"$.settings.prompt_length: the calibration prompts' length in tokens (at least 1), got {length!r}"
    for key, known in (("setting", SETTINGS), ("objective", OBJECTIVES)):
        if key in profile.settings and profile.settings[key] not in known:
            return f"$.settings.{key}: one of {', '.join(known)}, got {profile.settings[key]!r}"
    if not profile.losses:
        return "$.losses: no task was measured"
    if not policies:
        return "$.policies: no policy was measured"
    shape = (layers, len(policies), len(grid))
    tables = [("losses", profile.losses), *((f"curves['{curve}']", t) for curve, t in profile.curves.items())]
    for name, per_task in tables:
        for task, table in per_task.items():
            problem = _table_problem(table, shape)
            if problem:
                return f"$.{name}['{task}']{problem}"
    if profile.head_losses and set(profile.head_losses) != set(profile.losses):
        wanted, got = ", ".join(sorted(profile.losses)), ", ".join(sorted(profile.head_losses))
        return f"$.head_losses: the tasks of $.losses ({wanted}), got {got}"
    for task, per_layer in profile.head_losses.items():
        if len(per_layer) != layers:
            return f"$.head_losses['{task}']: {len(per_layer)} layers of losses for a model of {layers}"
        for layer, heads in enumerate(per_layer):
            if len(heads) != profile.model.kv_heads:
                model_heads = profile.model.kv_heads
                return f"$.head_losses['{task}'][{layer}]: {len(heads)} KV heads for a model of {model_heads}"
            for head, per_head in enumerate(heads):
                problem = _table_problem([per_head], (1, len(policies), len(grid)))
                if problem:
                    return f"$.head_losses['{task}'][{layer}][{head}]{problem.removeprefix('[0]')}"
    for signal, measured in profile.signals.items():
        for task, values in measured.items():
            if len(values) != layers or not all(math.isfinite(v) for v in values):
                return f"$.signals['{signal}']['{task}']: {layers} finite numbers (one per layer), got {len(values)}"
    tasks = set(profile.losses)
    weighted = [("$.weights", profile.weights)]
    weighted += [(f"$.regimes[{n}].weights", regime.weights) for n, regime in enumerate(profile.regimes)]
    for path, weights in weighted:
        problem = _weights_problem(weights, tasks)
        if problem:
            return f"{path}: {problem}"
    for policy, cost in profile.costs.items():
        if policy not in profile.policies:
            return f"$.costs['{policy}']: a cost of a policy that was not measured"
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost <= 0:
            return f"$.costs['{policy}']: prefill time over the full cache's, a positive number, got {cost!r}"
    for number, regime in enumerate(profile.regimes):
        if regime.budget < 1 or regime.floor < 1:
            return f"$.regimes[{number}]: budget and floor are at least 1 token, got {regime.budget} and {regime.floor}"
    return None


def _table_problem(table: list, shape: tuple[int, int, int]) -> str | None:
    """Where a loss table (layers x policies x budgets) breaks its shape or holds a NaN or a negative loss."""
    layers, policies, budgets = shape
    if len(table) != layers:
        return f": {len(table)} layers of losses for a model of {layers}"
    for layer, rows in enumerate(table):
        if len(rows) != policies:
            return f"[{layer}]: {len(rows)} policies' losses for {policies} policies"
        for policy, row in enumerate(rows):
            if len(row) != budgets:
                return f"[{layer}][{policy}]: {len(row)} losses for {budgets} budgets of the grid"
            if any(math.isnan(x) or x < 0 for x in row):
                return f"[{layer}][{policy}]: losses are non-negative numbers (or null: not measurable), got {row}"
    return None


def _weights_problem(weights: Mapping[str, float], tasks: set[str]) -> str | None:
    if not weights:
        return None
    unknown = sorted(set(weights) - tasks)
    if unknown:
        return f"no task {unknown[0]!r} was measured"
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        return f"task weights are non-negative numbers, not all zero, got {dict(weights)}"
    return None


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= FINGERPRINT_TOLERANCE * max(abs(y), 1e-6) for x, y in zip(a, b))
