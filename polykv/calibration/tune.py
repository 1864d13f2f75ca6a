"""Tuning the solver per budget regime on held-out prompts, after the tables are measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
from tqdm import tqdm

from polykv.cache.preparation import prepared
from polykv.cache.reconstruction import Reconstruction
from polykv.harness.processes import ONE, Processes
from polykv.harness.scorer import Scorer, by_group, needs_of
from polykv.plan import compile
from polykv.profile import Profile, TunedRegime
from polykv.registry import Registry, default_registry
from polykv.resolution.resolve import interpolate
from polykv.tasks.tasks import Sample

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Average budgets (tokens per layer at the calibration prompt length) at which the solver is tuned.
TUNE_BUDGETS = (32, 64, 128, 256)


def tune(
    model: PreTrainedModel,
    profile: Profile,
    samples: Sequence[Sample],
    *,
    budgets: Sequence[int] = TUNE_BUDGETS,
    registry: Registry | None = None,
    batch_size: int = 4,
    pad_token_id: int = 0,
    progress: bool = True,
    setting: str = "question",
    tokenizer=None,
    processes: Processes = ONE,
) -> Profile:
    """Choose, for each average budget, the task weights and floor whose solution loses least on ``samples``.

    Single-layer losses add up well for plain continuation, but much worse for retrieval: a needle
    that survives in other layers makes each layer alone look cheap, and compressing them together
    loses it; and how much worse depends on how hard the model is compressed. So at each budget
    every task gets a composition factor, its measured loss under uniform compression over the sum
    its table predicts. The candidates are equal weights and these factors, each with the smallest
    budgets of the grid as a floor, and the one with the least measured loss (task-balanced, on
    ``samples``, which the tables never saw, in the profile's ``setting``, of its ``objective``) is
    kept per budget. Several
    ``processes`` (torchrun) score a share of the batches each and all return the same profile.
    """
    tuning = _Tuning(
        model, profile, samples, default_registry() if registry is None else registry, batch_size, pad_token_id,
        progress, setting, tokenizer, processes,
    )  # fmt: skip
    with prepared(model):  # compiling the candidates prepares the model: give it back as it was
        return tuning.run([b for b in budgets if b < profile.prompt_length])  # a budget over the prompt: nothing


@attrs.define
class _Tuning:
    model: PreTrainedModel
    profile: Profile
    samples: Sequence[Sample]
    registry: Registry
    batch_size: int
    pad_token_id: int
    progress: bool
    setting: str
    tokenizer: object
    processes: Processes
    losses: dict[tuple, list[float]] = attrs.field(factory=dict)

    def run(self, budgets: list[int]) -> Profile:
        profile = self.profile
        if not budgets:
            return profile
        baseline = "pyramidkv" if "pyramidkv" in profile.policies else next(iter(profile.policies))
        self.score({("uniform", b): self.compile(f"layers *: {baseline}@{b}") for b in budgets})
        equal = {task: 1.0 for task in profile.tasks}
        factors = {
            budget: {
                task: max(_mean(self.losses[(("uniform", budget), task)]), 1e-6)
                / max(_predicted(profile, task, baseline, budget), 1e-6)
                for task in profile.tasks
            }
            for budget in budgets
        }
        candidates = {}
        for budget in budgets:
            for name, chosen in (("equal", equal), ("composition", factors[budget])):
                plan = self.compile(
                    f"budget {budget}\nlayers *: auto@auto", attrs.evolve(profile, weights=chosen, regimes=())
                )
                for floor in [b for b in profile.grid[:3] if b <= budget]:
                    regimes = [attrs.evolve(regime, floor=floor) for regime in plan.resolver.regimes]
                    resolver = attrs.evolve(plan.resolver, regimes=regimes)
                    candidates[(name, budget, floor)] = attrs.evolve(plan, resolver=resolver)
        self.score(candidates)
        tuned = []
        for budget in budgets:
            keys = [key for key in candidates if key[1] == budget]
            measured = {f"{name} weights, floor {floor}": self.balanced((name, b, floor)) for name, b, floor in keys}
            measured[f"uniform {baseline}"] = self.balanced(("uniform", budget))
            best = min(keys, key=self.balanced)
            tuned.append(TunedRegime(budget, equal if best[0] == "equal" else factors[budget], best[2], measured))
        return attrs.evolve(profile, regimes=tuned, settings={**profile.settings, "composition_factors": factors})

    def compile(self, spec: str, profile: Profile | None = None):
        return compile(spec, self.model, profile=profile, registry=self.registry,
                       tokenizer=self.tokenizer, setting=self.setting, objective=self.profile.objective)  # fmt: skip

    def score(self, plans: dict) -> None:
        needs = needs_of(plans.values())
        reconstruction = Reconstruction.for_tokenizer(self.tokenizer) if needs.reconstruction else None
        batches = list(by_group(self.samples, self.batch_size))
        mine = self.processes.share(len(batches))
        scored: dict[int, list[tuple[tuple, float]]] = {}  # batch -> its ((plan, task), loss), in the order scored
        objective = self.profile.objective
        shown = self.progress and self.processes.main
        for index in tqdm(mine, desc="tuning", unit="batch", disable=not shown, leave=False):
            scorer = Scorer(
                self.model, batches[index], needs, pad_token_id=self.pad_token_id, setting=self.setting,
                reconstruction=reconstruction,
            )  # fmt: skip
            scored[index] = [
                ((key, f"{record.task}:{record.format}"), record.loss(objective))
                for key, plan in plans.items()
                for record in scorer.records(str(key), 0, plan)
            ]
        merged = {index: entries for part in self.processes.gather(scored) for index, entries in part.items()}
        for index in range(len(batches)):  # in batch order, as one process appends them
            for key, loss in merged[index]:
                self.losses.setdefault(key, []).append(loss)

    def balanced(self, key) -> float:
        tasks = self.profile.tasks
        return sum(_mean(self.losses[(key, task)]) for task in tasks) / len(tasks)


def _predicted(profile: Profile, task: str, policy: str, budget: int) -> float:
    """The task's loss the single-layer table predicts for every layer at ``policy`` and ``budget``."""
    column = list(profile.policies).index(policy)
    return sum(interpolate(profile.grid, layer[column], [budget])[0] for layer in profile.losses[task])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
