"""Plans: a spec compiled against a model (``compile``), every layer's choice recorded (``plan``)."""

from polykv.plan.compiler import as_spec, compile, with_prefill_limit, with_total_budget
from polykv.plan.plan import HeadPlan, LayerPlan, Plan

__all__ = ["HeadPlan", "LayerPlan", "Plan", "as_spec", "compile", "with_prefill_limit", "with_total_budget"]
