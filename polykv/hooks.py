"""The pluggy hook a policy package implements.

A package declares an entry point in the group ``polykv.policies`` pointing at a module (or
object) with a ``register_policies`` hook::

    import polykv

    @polykv.hookimpl
    def register_policies(register):
        register(MyPolicy)

The built-in policies in ``plugins/`` register exactly this way.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from polykv.policy import Policy

PROJECT = "polykv"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PolicyHooks:
    """Hook specifications of polykv."""

    @hookspec
    def register_policies(self, register: Callable[[type[Policy]], None]) -> None:
        """Call ``register(PolicyClass)`` once for each policy the plugin provides."""
