"""polykv: per-layer KV-cache compression for Hugging Face transformers.

Each transformer layer gets its own eviction policy and its own token budget, written in a small
language (``layers 0-1: full; *: snapkv@256``) and compiled against a model into a cache that runs
inside ``model.generate``.

The names below are loaded on first use, so that tools needing only the language (``polykv fmt``,
``polykv validate``) start without importing transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: The public API, one name per line: name -> the module that defines it. ``__all__`` is its keys; a
#: test imports every one.
_EXPORTS = {
    "PolyCache": "polykv.cache",
    "Prepared": "polykv.cache",
    "is_prepared": "polykv.cache",
    "prepare_model": "polykv.cache",
    "prepared": "polykv.cache",
    "restore_model": "polykv.cache",
    "Sampling": "polykv.decoding",
    "Speculation": "polykv.decoding",
    "StaticDecoder": "polykv.decoding",
    "static_generate": "polykv.decoding",
    "speculative_generate": "polykv.decoding",
    "ArgumentError": "polykv.errors",
    "ArgumentTypeError": "polykv.errors",
    "CacheError": "polykv.errors",
    "ModelError": "polykv.errors",
    "PolicyError": "polykv.errors",
    "PolykvError": "polykv.errors",
    "FormatError": "polykv.serialization",
    "Tokens": "polykv.budget",
    "Share": "polykv.budget",
    "Choice": "polykv.choice",
    "hookimpl": "polykv.hooks",
    "PluginFailure": "polykv.registry",
    "Registry": "polykv.registry",
    "default_registry": "polykv.registry",
    "Param": "polykv.parameters",
    "ParameterError": "polykv.parameters",
    "parameter": "polykv.parameters",
    "LayerView": "polykv.policy",
    "Needs": "polykv.policy",
    "Phase": "polykv.policy",
    "Policy": "polykv.policy",
    "ScoringPolicy": "polykv.policy",
    "LayerObservation": "polykv.signals",
    "Signal": "polykv.signals",
    "BudgetProblem": "polykv.solver",
    "LayerChoice": "polykv.solver",
    "LayerOptions": "polykv.solver",
    "Solution": "polykv.solver",
    "Solver": "polykv.solver",
    "Spec": "polykv.language.ast",
    "CheckedSpec": "polykv.language.check",
    "LayerEntry": "polykv.language.check",
    "check": "polykv.language.check",
    "Diagnostic": "polykv.language.diagnostics",
    "SpecError": "polykv.language.diagnostics",
    "load": "polykv.language.parse",
    "parse": "polykv.language.parse",
    "print_spec": "polykv.language.printer",
    "cache_argument": "polykv.model",
    "load_default_model": "polykv.model",
    "load_model": "polykv.model",
    "LayerPlan": "polykv.plan",
    "Plan": "polykv.plan",
    "compile": "polykv.plan",
    "Profile": "polykv.profile",
    "ProfileError": "polykv.profile",
    "default_profile": "polykv.profile",
}

__all__ = sorted(_EXPORTS)

_SUBMODULES = {"budget", "cache", "calibration", "choice", "cli", "decoding", "errors", "evaluation", "harness",
               "hooks", "language", "limits", "model", "parameters", "plan", "policy", "profile", "registry",
               "resolution", "serialization", "signals", "solver", "tasks", "testing", "values"}  # fmt: skip


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"polykv.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'polykv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from polykv.budget import Share, Tokens
    from polykv.cache import (
        PolyCache,
        Prepared,
        is_prepared,
        prepare_model,
        prepared,
        restore_model,
    )
    from polykv.choice import Choice
    from polykv.decoding import Sampling, Speculation, StaticDecoder, speculative_generate, static_generate
    from polykv.errors import (
        ArgumentError,
        ArgumentTypeError,
        CacheError,
        ModelError,
        PolicyError,
        PolykvError,
    )
    from polykv.hooks import hookimpl
    from polykv.language.ast import Spec
    from polykv.language.check import CheckedSpec, LayerEntry, check
    from polykv.language.diagnostics import Diagnostic, SpecError
    from polykv.language.parse import load, parse
    from polykv.language.printer import print_spec
    from polykv.model import (
        cache_argument,
        load_default_model,
        load_model,
    )
    from polykv.parameters import Param, ParameterError, parameter
    from polykv.plan import LayerPlan, Plan, compile
    from polykv.policy import (
        LayerView,
        Needs,
        Phase,
        Policy,
        ScoringPolicy,
    )
    from polykv.profile import Profile, ProfileError, default_profile
    from polykv.registry import (
        PluginFailure,
        Registry,
        default_registry,
    )
    from polykv.serialization import FormatError
    from polykv.signals import LayerObservation, Signal
    from polykv.solver import (
        BudgetProblem,
        LayerChoice,
        LayerOptions,
        Solution,
        Solver,
    )
