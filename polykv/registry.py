"""What is installed: policies, signals and solvers, loaded from plugins with failures reported, not raised.

Entry points of the group ``polykv`` are loaded one by one, the built-in distribution first and
the others sorted by name, so a third party can never replace a built-in. Each plugin may
implement any of the hooks in ``polykv.hooks`` (policies, signals, solvers). A plugin that fails
to import, whose hook raises, that registers nothing, or that registers something malformed or a
name already taken is skipped and recorded with its distribution and the reason (``failures``);
the rest load. Each skip is also logged, one line, as a warning of the ``polykv.registry`` logger:
a library user sees it as Python's logging shows warnings, the command line prints
``polykv: skipped plugin DISTRIBUTION: REASON``.
The group's old name, ``polykv.policies``, is still read, with a note asking to rename it.

The three kinds are looked up alike: ``registry.policies``, ``registry.signals`` and
``registry.solvers`` are catalogues with ``names()``, ``get(name)`` and ``create(name, values)``.

``POLYKV_PLUGINS`` controls third-party loading: unset loads every plugin, ``none`` loads the
built-ins only, and a comma list of distribution names (``polykv-keydiff,other``) loads the
built-ins and those. ``Registry()`` in code is empty; add plugins to it with ``add_plugin``.
"""

from __future__ import annotations

import abc
import functools
import importlib.metadata
import inspect
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar, cast

import attrs
import pluggy
from packaging.utils import canonicalize_name

from polykv import hooks
from polykv.parameters import Configurable, Param, ParameterError
from polykv.policy import Needs, Policy
from polykv.values import KEYWORDS, Value

if TYPE_CHECKING:
    from polykv.signals import Signal
    from polykv.solver import Solver

ENTRY_POINT_GROUP = "polykv"
#: The group's name before signals and solvers existed; read too, with a note to rename it.
OLD_ENTRY_POINT_GROUP = "polykv.policies"
ENVIRONMENT_VARIABLE = "POLYKV_PLUGINS"
BUILTIN_DISTRIBUTION = "polykv-core"

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_LOG = logging.getLogger(__name__)


class Registrable(Protocol):
    """What every policy, signal and solver class declares: the name it is found by, and one line on it."""

    name: ClassVar[str]
    description: ClassVar[str]


T = TypeVar("T", bound=Registrable)


@attrs.frozen
class Entry(Generic[T]):
    """An installed policy, signal or solver class, and where it comes from."""

    cls: type[T]
    distribution: str
    version: str
    plugin: str

    @property
    def name(self) -> str:
        return self.cls.name


@attrs.frozen
class PluginFailure:
    """A plugin (or one thing it registers) that was skipped, and why."""

    distribution: str
    plugin: str
    reason: str
    #: The entry point that failed, where its distribution declares several (else "": the distribution says it).
    entry_point: str = ""

    def __str__(self) -> str:
        where = f" (entry point {self.entry_point!r})" if self.entry_point else ""
        return f"{self.distribution}{where}: {self.reason}"


@attrs.frozen
class Kind:
    """One kind of thing plugins register: its words, its hook, and how a registration is checked."""

    word: str
    plural: str
    hook: str
    problem: Callable[[object], str | None]


class Catalogue(Generic[T]):
    """The installed things of one kind (policies, signals or solvers), by name."""

    def __init__(self, kind: Kind):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def names(self) -> list[str]:
        """Their names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            installed = ", ".join(self.names()) or "none"
            raise KeyError(f"no {self.kind.word} named {name!r}; installed: {installed}") from None

    def create(self, name: str, values: Mapping[str, Value] | None = None) -> T:
        """An instance of ``name`` with ``values`` (checked; missing ones take their defaults)."""
        return self.get(name).cls(**(values or {}))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter([self._entries[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, entry: Entry[T]) -> None:
        self._entries[entry.name] = entry

    def _forget_plugin(self, plugin: str) -> None:
        self._entries = {name: entry for name, entry in self._entries.items() if entry.plugin != plugin}


class Registry:
    """The installed policies, signals and solvers (``policies``, ``signals``, ``solvers``: catalogues
    by name), the plugins that failed to load, and notes about plugins that still load but should change."""

    def __init__(self) -> None:
        self._manager = pluggy.PluginManager(hooks.PROJECT)
        self._manager.add_hookspecs(hooks)
        self.policies: Catalogue[Policy] = Catalogue(POLICY_KIND)
        self.signals: Catalogue[Signal] = Catalogue(SIGNAL_KIND)
        self.solvers: Catalogue[Solver] = Catalogue(SOLVER_KIND)
        self._failures: list[PluginFailure] = []
        self._notes: list[PluginFailure] = []
        #: Entry point names of plugins whose distribution declares several, by plugin name (for failures).
        self._entry_points: dict[str, str] = {}

    def catalogues(self) -> tuple[Catalogue, ...]:
        return (self.policies, self.signals, self.solvers)

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> Registry:
        """A registry loaded from entry points as ``POLYKV_PLUGINS`` says."""
        registry = cls()
        setting = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
        if setting.lower() == "none":
            registry.load_entry_points(only=set())
        else:
            only: set[str] = {canonicalize_name(name.strip()) for name in setting.split(",") if name.strip()}
            registry.load_entry_points(only=only or None)
        return registry

    def load_entry_points(self, only: set[str] | None = None) -> None:
        """Load the built-in plugins and every other plugin (or those of the distributions in ``only``)."""
        found: set[str] = set()
        entry_points = _sorted_entry_points()
        declared = Counter(
            entry_point.dist.name if entry_point.dist else "<unknown>" for entry_point, _ in entry_points
        )
        for entry_point, group in entry_points:
            distribution = entry_point.dist.name if entry_point.dist else "<unknown>"
            name = f"{distribution}:{entry_point.name}"
            if declared[distribution] > 1:
                self._entry_points[name] = entry_point.name
            version = entry_point.dist.version if entry_point.dist else ""
            normal = canonicalize_name(distribution)
            if only is not None and normal not in only and normal != BUILTIN_DISTRIBUTION:
                continue
            found.add(normal)
            if group == OLD_ENTRY_POINT_GROUP:
                self._notes.append(
                    PluginFailure(
                        distribution,
                        entry_point.name,
                        f"declares its entry point in the group {OLD_ENTRY_POINT_GROUP!r}, which polykv still reads "
                        f"but will stop reading: rename it [project.entry-points.{ENTRY_POINT_GROUP}]",
                    )
                )
            try:
                plugin = entry_point.load()
            except Exception as error:  # any failure to import a plugin is reported, never raised
                self._fail(distribution, name, f"import failed: {_reason(error)}")
                continue
            self.add_plugin(plugin, name=name, distribution=distribution, version=version)
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
        for catalogue in self.catalogues():
            kind = catalogue.kind
            for offer in offered[kind.plural]:
                problem = kind.problem(offer)
                # Read as a class only where problem is None, which says it is a well-formed one.
                thing = cast("type[Registrable]", offer)
                if problem is None and thing.name in catalogue:
                    first = catalogue.get(thing.name)
                    problem = f"{kind.word} '{thing.name}' is already provided by {first.distribution} {first.version}"
                if problem:
                    self._fail(distribution, name, problem.rstrip())
                    continue
                catalogue._add(Entry(thing, distribution, version, name))

    def remove_plugin(self, name: str) -> None:
        """Unregister the plugin added under ``name`` and forget what it provided."""
        plugin = self._manager.get_plugin(name)
        if plugin is None:
            raise KeyError(f"no plugin named {name!r}")
        self._manager.unregister(plugin)
        for catalogue in self.catalogues():
            catalogue._forget_plugin(name)

    def _fail(self, distribution: str, plugin: str, reason: str) -> None:
        failure = PluginFailure(distribution, plugin, reason, self._entry_points.get(plugin, ""))
        self._failures.append(failure)
        _LOG.warning("skipped plugin %s", failure)

    # --- what went wrong ------------------------------------------------------------------------

    @property
    def failures(self) -> tuple[PluginFailure, ...]:
        """The plugins (or things they registered) that were skipped, and why."""
        return tuple(self._failures)

    @property
    def notes(self) -> tuple[PluginFailure, ...]:
        """Plugins that loaded but should change (an entry point in the old group)."""
        return tuple(self._notes)

    def provider(self, cls: type) -> str:
        """The distribution that registered ``cls`` ("" when it was not registered), for messages."""
        for catalogue in self.catalogues():
            for entry in catalogue:
                if entry.cls is cls:
                    return entry.distribution
        return ""


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


def _class_problem(thing: object, base: type[abc.ABC], word: str) -> str | None:
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
        made = thing()
    except Exception as error:  # a class that cannot be built with its defaults is malformed
        return f"{word} '{name}' cannot be created with its defaults: {_reason(error)}"
    if isinstance(made, Policy):
        return _policy_answers(made, name)
    return None


def _policy_answers(policy: Policy, name: str) -> str | None:
    """Why the cache could not use what ``policy`` says of itself (needs and minimum budget), or None."""
    try:
        needs, minimum = policy.needs(), policy.min_budget()
    except Exception as error:
        return f"policy '{name}': needs() or min_budget() raised {_reason(error)}"
    if not isinstance(needs, Needs):
        return f"policy '{name}': needs() returned {needs!r}, expected a polykv.Needs"
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
        return f"policy '{name}': min_budget() returned {minimum!r}, expected a whole number of at least 1"
    return None


POLICY_KIND = Kind("policy", "policies", "register_policies", policy_problem)
SIGNAL_KIND = Kind("signal", "signals", "register_signals", signal_problem)
SOLVER_KIND = Kind("solver", "solvers", "register_solvers", solver_problem)
KINDS = (POLICY_KIND, SIGNAL_KIND, SOLVER_KIND)


def _sorted_entry_points() -> list[tuple[importlib.metadata.EntryPoint, str]]:
    """Every plugin entry point with its group: the built-in distribution first, then by distribution."""

    def order(found: tuple[importlib.metadata.EntryPoint, str]) -> tuple:
        entry_point = found[0]
        distribution = canonicalize_name(entry_point.dist.name) if entry_point.dist else ""
        return (distribution != BUILTIN_DISTRIBUTION, distribution, entry_point.name)

    # A distribution found twice on the path (an editable install, say) lists its entry points twice.
    unique: dict[tuple, tuple[importlib.metadata.EntryPoint, str]] = {}
    for group in (OLD_ENTRY_POINT_GROUP, ENTRY_POINT_GROUP):  # the new group wins where both name a plugin
        for ep in importlib.metadata.entry_points(group=group):
            unique[(ep.dist.name if ep.dist else "", ep.name, ep.value)] = (ep, group)
    return sorted(unique.values(), key=order)


def _reason(error: BaseException) -> str:
    """The error on one line (pluggy's validation errors span several): a skip is reported as one line."""
    return " ".join(f"{type(error).__name__}: {error}".split())
