"""polykv: per-layer KV-cache compression for Hugging Face transformers.

Each transformer layer gets its own eviction policy and its own token budget, written in a small
language (``layers 0-1: full; *: snapkv@256``) and compiled against a model into a cache that runs
inside ``model.generate``.
"""

from polykv.cache import PolyCache, prepare_model, restore_model
from polykv.errors import CacheError, ModelError, PolicyError, PolykvError
from polykv.hooks import hookimpl
from polykv.lang.ast import Spec
from polykv.lang.check import CheckedSpec, LayerEntry, check
from polykv.lang.diagnostics import Diagnostic, SpecError
from polykv.lang.parse import load, parse
from polykv.lang.printer import print_spec
from polykv.model import load_default_model, load_model
from polykv.plan import LayerPlan, Plan, compile
from polykv.policy import LayerView, Needs, Param, ParameterError, Phase, Policy, ScoringPolicy
from polykv.registry import PluginFailure, PolicyEntry, Registry, default_registry

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CheckedSpec",
    "Diagnostic",
    "LayerPlan",
    "LayerEntry",
    "LayerView",
    "ModelError",
    "Needs",
    "Param",
    "ParameterError",
    "Phase",
    "Plan",
    "PluginFailure",
    "Policy",
    "PolyCache",
    "PolicyEntry",
    "PolicyError",
    "PolykvError",
    "Registry",
    "ScoringPolicy",
    "Spec",
    "SpecError",
    "check",
    "compile",
    "default_registry",
    "hookimpl",
    "load",
    "load_default_model",
    "load_model",
    "parse",
    "prepare_model",
    "restore_model",
    "print_spec",
]
