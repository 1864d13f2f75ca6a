"""What is installed: policies, signals and solvers, loaded from plugins with failures reported, not raised.

Entry points of the group ``polykv.policies`` are loaded one by one, the built-in distribution
first and the others sorted by name, so a third party can never replace a built-in. Each plugin
may implement any of the hooks in ``polykv.hooks`` (policies, signals, solvers). A plugin that
fails to import, whose hook raises, that registers nothing, or that registers something malformed
or a name already taken is skipped and recorded with its distribution and the reason; the rest load.

``POLYKV_PLUGINS`` controls third-party loading: unset loads every plugin, ``none`` loads the
built-ins only, and a comma list of distribution names (``polykv-keydiff,other``) loads the
built-ins and those. ``Registry()`` in code is empty; add plugins to it with ``add_plugin``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import re
import warnings
from collections.abc import Callable, Iterator

import attrs
import pluggy
from packaging.utils import canonicalize_name

from polykv.hooks import PROJECT, PolicyHooks
from polykv.parameters import Configurable, Param, ParameterError
from polykv.policy import Policy
from polykv.values import KEYWORDS, Value

ENTRY_POINT_GROUP = "polykv.policies"
ENVIRONMENT_VARIABLE = "POLYKV_PLUGINS"
BUILTIN_DISTRIBUTION = "polykv-core"

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; polykv goes on without it."""


@attrs.frozen
class Entry:
    """An installed policy, signal or solver class, and where it comes from."""

    cls: type
    distribution: str
    version: str
    plugin: str

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def policy(self) -> type[Policy]:
        """The class, named for the common case of a policy entry."""
        return self.cls


PolicyEntry = Entry


@attrs.frozen
class PluginFailure:
    """A plugin (or one thing it registers) that was skipped, and why."""

    distribution: str
    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.distribution} ({self.plugin}): {self.reason}"


@attrs.frozen
class Kind:
    """One kind of thing plugins register: its words, its hook, and how a registration is checked."""

    word: str
    plural: str
    hook: str
    problem: Callable[[object], str | None]


class Registry:
    """The installed policies (and signals and solvers) by name, and the plugins that failed to load.

    Iterating, ``names``, ``get`` and ``create`` are about policies; ``signals()``, ``solvers()``,
    ``get_signal``/``get_solver`` and ``create_solver`` about the other kinds.
    """

    def __init__(self) -> None:
        self._manager = pluggy.PluginManager(PROJECT)
        self._manager.add_hookspecs(PolicyHooks)
        self._entries: dict[str, dict[str, Entry]] = {kind.plural: {} for kind in KINDS}
        self._failures: list[PluginFailure] = []

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> Registry:
        """A registry loaded from entry points as ``POLYKV_PLUGINS`` says."""
        registry = cls()
        setting = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
        if setting.lower() == "none":
            registry.load_entry_points(only=set())
        else:
            only = {canonicalize_name(name.strip()) for name in setting.split(",") if name.strip()} or None
            registry.load_entry_points(only=only)
        return registry

    def load_entry_points(self, only: set[str] | None = None) -> None:
        """Load the built-in plugins and every other plugin (or those of the distributions in ``only``)."""
        found: set[str] = set()
        for entry_point in _sorted_entry_points():
            distribution = entry_point.dist.name if entry_point.dist else "<unknown>"
            version = entry_point.dist.version if entry_point.dist else ""
            normal = canonicalize_name(distribution)
            if only is not None and normal not in only and normal != BUILTIN_DISTRIBUTION:
                continue
            found.add(normal)
            try:
                plugin = entry_point.load()
            except Exception as error:  # any failure to import a plugin is reported, never raised
                self._fail(distribution, entry_point.name, f"import failed: {_reason(error)}")
                continue
            self.add_plugin(
                plugin, name=f"{distribution}:{entry_point.name}", distribution=distribution, version=version
            )
        for missing in sorted((only or set()) - found - {BUILTIN_DISTRIBUTION}):
            self._fail(
                missing,
                ENVIRONMENT_VARIABLE,
                f"{ENVIRONMENT_VARIABLE} names '{missing}', which provides no polykv plugins (is it installed?)",
            )

    def add_plugin(self, plugin: object, *, name: str, distribution: str = "<local>", version: str = "") -> None:
        """Register ``plugin`` (a module or object with hooks from ``polykv.hooks``) and what it provides."""
        try:
            self._manager.register(plugin, name=name)
        except Exception as error:  # pluggy rejects malformed hook implementations
            self._fail(distribution, name, f"not a valid plugin: {_reason(error)}")
            return
        others = [p for p in self._manager.get_plugins() if p is not plugin]
        offered: dict[str, list[object]] = {}
        for kind in KINDS:
            offered[kind.plural] = []
            caller = self._manager.subset_hook_caller(kind.hook, remove_plugins=others)
            try:
                caller(register=offered[kind.plural].append)
            except Exception as error:  # a raising hook skips the whole plugin
                self._manager.unregister(plugin)
                self._fail(distribution, name, f"{kind.hook} raised {_reason(error)}")
                return
        if not any(offered.values()):
            self._manager.unregister(plugin)
            self._fail(
                distribution,
                name,
                "registered no policies, signals or solvers "
                "(are its hooks spelt register_policies, ... and marked @hookimpl?)",
            )
            return
        for kind in KINDS:
            taken = self._entries[kind.plural]
            for thing in offered[kind.plural]:
                problem = kind.problem(thing)
                if problem is None and thing.name in taken:
                    first = taken[thing.name]
                    problem = f"{kind.word} '{thing.name}' is already provided by {first.distribution} {first.version}"
                if problem:
                    self._fail(distribution, name, problem.rstrip())
                    continue
                taken[thing.name] = Entry(thing, distribution, version, name)

    def remove_plugin(self, name: str) -> None:
        """Unregister the plugin added under ``name`` and forget what it provided."""
        plugin = self._manager.get_plugin(name)
        if plugin is None:
            raise KeyError(f"no plugin named {name!r}")
        self._manager.unregister(plugin)
        for plural, entries in self._entries.items():
            self._entries[plural] = {k: e for k, e in entries.items() if e.plugin != name}

    def _fail(self, distribution: str, plugin: str, reason: str) -> None:
        failure = PluginFailure(distribution, plugin, reason)
        self._failures.append(failure)
        warnings.warn(f"polykv skipped a plugin: {failure}", PluginWarning, stacklevel=3)

    # --- lookup -----------------------------------------------------------------------------

    @property
    def failures(self) -> tuple[PluginFailure, ...]:
        return tuple(self._failures)

    def names(self) -> list[str]:
        """The installed policies' names, sorted."""
        return sorted(self._entries["policies"])

    def __contains__(self, name: object) -> bool:
        return name in self._entries["policies"]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries["policies"][name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries["policies"])

    def get(self, name: str) -> Entry:
        return self._get("policies", "policy", name)

    def create(self, name: str, values: dict[str, Value] | None = None) -> Policy:
        """An instance of policy ``name`` with ``values`` (checked; missing ones take defaults)."""
        return self.get(name).cls(**(values or {}))

    def signals(self) -> list[Entry]:
        return [self._entries["signals"][name] for name in sorted(self._entries["signals"])]

    def solvers(self) -> list[Entry]:
        return [self._entries["solvers"][name] for name in sorted(self._entries["solvers"])]

    def get_signal(self, name: str) -> Entry:
        return self._get("signals", "signal", name)

    def get_solver(self, name: str) -> Entry:
        return self._get("solvers", "solver", name)

    def create_solver(self, name: str, values: dict[str, Value] | None = None):
        """An instance of solver ``name`` with ``values`` (checked; missing ones take defaults)."""
        return self.get_solver(name).cls(**(values or {}))

    def _get(self, plural: str, word: str, name: str) -> Entry:
        try:
            return self._entries[plural][name]
        except KeyError:
            installed = ", ".join(sorted(self._entries[plural])) or "none"
            raise KeyError(f"no {word} named {name!r}; installed: {installed}") from None


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry, loaded once from entry points on first use."""
    return Registry.from_environment()


def policy_problem(policy: object) -> str | None:
    """Why ``policy`` cannot be registered, or None when it is a well-formed Policy class."""
    if inspect.isclass(policy) and issubclass(policy, Policy):
        name = getattr(policy, "name", None)
        if not isinstance(name, str) or not _NAME.match(name) or name in KEYWORDS:
            return (
                f"policy class {policy.__qualname__}: name must be lower-case letters, digits and _ "
                f"(not a keyword), got {name!r}"
            )
    return _class_problem(policy, Policy, "policy")


def signal_problem(signal: object) -> str | None:
    """Why ``signal`` cannot be registered, or None when it is a well-formed Signal class."""
    from polykv.signals import Signal

    return _class_problem(signal, Signal, "signal")


def solver_problem(solver: object) -> str | None:
    """Why ``solver`` cannot be registered, or None when it is a well-formed Solver class."""
    from polykv.solver import Solver

    return _class_problem(solver, Solver, "solver")


def _class_problem(thing: object, base: type, word: str) -> str | None:
    if not (inspect.isclass(thing) and issubclass(thing, base)):
        return f"register() takes a {base.__name__} subclass, got {thing!r}"
    label = f"{word} class {thing.__qualname__}"
    name = getattr(thing, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        return f"{label}: name must be lower-case letters, digits and _, got {name!r}"
    if inspect.isabstract(thing):
        missing = ", ".join(sorted(thing.__abstractmethods__))
        return f"{word} '{name}' does not implement {missing}"
    description = getattr(thing, "description", None)
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        return f"{word} '{name}': description must be one non-empty line"
    if issubclass(thing, Configurable):
        for param in thing.parameters:
            if not isinstance(param, Param) or hasattr(base, param.name):
                return f"{word} '{name}': parameter {getattr(param, 'name', param)!r} is not allowed"
            try:
                param.coerce(param.default)
            except ParameterError as error:
                return f"{word} '{name}': default of {error}"
    try:
        thing()
    except Exception as error:  # a class that cannot be built with its defaults is malformed
        return f"{word} '{name}' cannot be created with its defaults: {_reason(error)}"
    return None


KINDS = (
    Kind("policy", "policies", "register_policies", policy_problem),
    Kind("signal", "signals", "register_signals", signal_problem),
    Kind("solver", "solvers", "register_solvers", solver_problem),
)


def _sorted_entry_points() -> list[importlib.metadata.EntryPoint]:
    def order(entry_point: importlib.metadata.EntryPoint) -> tuple:
        distribution = canonicalize_name(entry_point.dist.name) if entry_point.dist else ""
        return (distribution != BUILTIN_DISTRIBUTION, distribution, entry_point.name)

    # A distribution found twice on the path (an editable install, say) lists its entry points twice.
    unique = {
        (ep.dist.name if ep.dist else "", ep.name, ep.value): ep
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    return sorted(unique.values(), key=order)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
