"""The pluggy hooks a plugin package implements: one per kind of thing it can add to polykv.

A package declares an entry point in the group ``polykv`` pointing at a module (or object) that
implements one or more of these hooks; each takes a ``register`` callback::

    from polykv.hooks import hookimpl

    @hookimpl
    def register_policies(register):  # eviction policies (polykv.Policy)
        register(MyPolicy)

    @hookimpl
    def register_signals(register):  # layer measurements for routing (polykv.Signal)
        register(MySignal)

    @hookimpl
    def register_solvers(register):  # budget solvers (polykv.Solver)
        register(MySolver)

The built-in policies, signals and solvers in ``plugins/`` register exactly this way. The entry
group was ``polykv.policies`` before signals and solvers existed; it is still read (see
``polykv.registry``).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "polykv"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_policies(register: Callable[[type], None]) -> None:
    """Call ``register(PolicyClass)`` once for each eviction policy the plugin provides."""


@hookspec
def register_signals(register: Callable[[type], None]) -> None:
    """Call ``register(SignalClass)`` once for each layer signal the plugin provides."""


@hookspec
def register_solvers(register: Callable[[type], None]) -> None:
    """Call ``register(SolverClass)`` once for each budget solver the plugin provides."""
