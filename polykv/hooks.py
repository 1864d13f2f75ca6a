"""The pluggy hooks a plugin package implements.

A package declares an entry point in the group ``polykv.policies`` pointing at a module (or
object) with one or more hooks; each takes a ``register`` callback::

    from polykv.hooks import hookimpl

    @hookimpl
    def register_policies(register):
        register(MyPolicy)

    @hookimpl
    def register_signals(register):   # layer measurements for routing (polykv.signals.Signal)
        register(MySignal)

    @hookimpl
    def register_solvers(register):   # budget allocation rules (polykv.solver.Solver)
        register(MySolver)

The built-in policies, signals and solvers in ``plugins/`` register exactly this way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

from polykv.policy import Policy

if TYPE_CHECKING:
    from polykv.signals import Signal
    from polykv.solver import Solver

PROJECT = "polykv"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PolicyHooks:
    """Hook specifications of polykv."""

    @hookspec
    def register_policies(self, register: Callable[[type[Policy]], None]) -> None:
        """Call ``register(PolicyClass)`` once for each policy the plugin provides."""

    @hookspec
    def register_signals(self, register: Callable[[type[Signal]], None]) -> None:
        """Call ``register(SignalClass)`` once for each layer signal the plugin provides."""

    @hookspec
    def register_solvers(self, register: Callable[[type[Solver]], None]) -> None:
        """Call ``register(SolverClass)`` once for each budget solver the plugin provides."""
