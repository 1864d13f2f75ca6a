"""Which policies are installed: plugin loading through entry points, with failures reported, not raised.

Entry points of the group ``polykv.policies`` are loaded one by one, the built-in distribution
first and the others sorted by name, so a third party can never replace a built-in policy.
A plugin that fails to import, whose hook raises, or that registers a malformed policy or a name
already taken is skipped and recorded with its distribution and the reason; the rest load.

``POLYKV_PLUGINS`` controls loading: unset loads every plugin, ``none`` loads none, and a comma
list of distribution names (``polykv-core,polykv-keydiff``) loads only those.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import re
import warnings
from collections.abc import Iterator

import attrs
import pluggy

from polykv.hooks import PROJECT, PolicyHooks
from polykv.policy import Param, ParameterError, Policy
from polykv.values import KEYWORDS, Value

ENTRY_POINT_GROUP = "polykv.policies"
ENVIRONMENT_VARIABLE = "POLYKV_PLUGINS"
BUILTIN_DISTRIBUTION = "polykv-core"

_POLICY_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; polykv goes on without it."""


@attrs.frozen
class PolicyEntry:
    """An installed policy and where it comes from."""

    policy: type[Policy]
    distribution: str
    version: str
    plugin: str

    @property
    def name(self) -> str:
        return self.policy.name


@attrs.frozen
class PluginFailure:
    """A plugin (or one policy of it) that was skipped, and why."""

    distribution: str
    plugin: str
    reason: str

    def __str__(self) -> str:
        return f"{self.distribution} ({self.plugin}): {self.reason}"


class Registry:
    """The installed policies by name, and the plugins that failed to load."""

    def __init__(self) -> None:
        self._manager = pluggy.PluginManager(PROJECT)
        self._manager.add_hookspecs(PolicyHooks)
        self._entries: dict[str, PolicyEntry] = {}
        self._failures: list[PluginFailure] = []

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> Registry:
        """A registry loaded from entry points as ``POLYKV_PLUGINS`` says."""
        registry = cls()
        setting = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
        if setting.lower() != "none":
            only = {_normal(name) for name in setting.split(",") if name.strip()} or None
            registry.load_entry_points(only=only)
        return registry

    def load_entry_points(self, only: set[str] | None = None) -> None:
        """Load every plugin of the entry-point group (or of the distributions in ``only``)."""
        found: set[str] = set()
        for entry_point in _sorted_entry_points():
            distribution = entry_point.dist.name if entry_point.dist else "<unknown>"
            version = entry_point.dist.version if entry_point.dist else ""
            if only is not None and _normal(distribution) not in only:
                continue
            found.add(_normal(distribution))
            try:
                plugin = entry_point.load()
            except Exception as error:  # any failure to import a plugin is reported, never raised
                self._fail(distribution, entry_point.name, f"import failed: {_reason(error)}")
                continue
            self.add_plugin(
                plugin, name=f"{distribution}:{entry_point.name}", distribution=distribution, version=version
            )
        for missing in sorted((only or set()) - found):
            self._fail(
                missing,
                ENVIRONMENT_VARIABLE,
                f"{ENVIRONMENT_VARIABLE} names '{missing}', which provides no polykv policies (is it installed?)",
            )

    def add_plugin(self, plugin: object, *, name: str, distribution: str = "<local>", version: str = "") -> None:
        """Register ``plugin`` (a module or object with a ``register_policies`` hook) and its policies."""
        try:
            self._manager.register(plugin, name=name)
        except Exception as error:  # pluggy rejects malformed hook implementations
            self._fail(distribution, name, f"not a valid plugin: {_reason(error)}")
            return
        offered: list[type[Policy]] = []
        others = [p for p in self._manager.get_plugins() if p is not plugin]
        caller = self._manager.subset_hook_caller("register_policies", remove_plugins=others)
        try:
            caller(register=offered.append)
        except Exception as error:  # a raising hook skips the whole plugin
            self._manager.unregister(plugin)
            self._fail(distribution, name, f"register_policies raised {_reason(error)}")
            return
        if not offered:
            self._manager.unregister(plugin)
            self._fail(
                distribution,
                name,
                "registered no policies (is register_policies spelt so and marked @polykv.hookimpl?)",
            )
            return
        for policy in offered:
            problem = policy_problem(policy)
            if problem is None and policy.name in self._entries:
                first = self._entries[policy.name]
                problem = f"policy '{policy.name}' is already provided by {first.distribution} {first.version}".rstrip()
            if problem:
                self._fail(distribution, name, problem)
                continue
            self._entries[policy.name] = PolicyEntry(policy, distribution, version, name)

    def remove_plugin(self, name: str) -> None:
        """Unregister the plugin added under ``name`` and forget its policies."""
        plugin = self._manager.get_plugin(name)
        if plugin is None:
            raise KeyError(f"no plugin named {name!r}")
        self._manager.unregister(plugin)
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != name}

    def _fail(self, distribution: str, plugin: str, reason: str) -> None:
        failure = PluginFailure(distribution, plugin, reason)
        self._failures.append(failure)
        warnings.warn(f"polykv skipped a plugin: {failure}", PluginWarning, stacklevel=3)

    # --- lookup -----------------------------------------------------------------------------

    @property
    def failures(self) -> tuple[PluginFailure, ...]:
        return tuple(self._failures)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[PolicyEntry]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> PolicyEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no policy named {name!r}; installed: {', '.join(self.names())}") from None

    def create(self, name: str, values: dict[str, Value] | None = None) -> Policy:
        """An instance of policy ``name`` with ``values`` (checked; missing ones take defaults)."""
        return self.get(name).policy(**(values or {}))


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry, loaded once from entry points on first use."""
    return Registry.from_environment()


def policy_problem(policy: object) -> str | None:
    """Why ``policy`` cannot be registered, or None when it is a well-formed Policy class."""
    if not (inspect.isclass(policy) and issubclass(policy, Policy)):
        return f"register() takes a Policy subclass, got {policy!r}"
    label = f"policy class {policy.__qualname__}"
    name = getattr(policy, "name", None)
    if not isinstance(name, str) or not _POLICY_NAME.match(name) or name in KEYWORDS:
        return f"{label}: name must be lower-case letters, digits and _ (not a keyword), got {name!r}"
    if inspect.isabstract(policy):
        missing = ", ".join(sorted(policy.__abstractmethods__))
        return f"policy '{name}' does not implement {missing}"
    description = getattr(policy, "description", None)
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        return f"policy '{name}': description must be one non-empty line"
    params = policy.parameters
    if not isinstance(params, tuple) or not all(isinstance(p, Param) for p in params):
        return f"policy '{name}': parameters must be a tuple of polykv.Param"
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        return f"policy '{name}': parameter names repeat"
    for param in params:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", param.name) or hasattr(Policy, param.name):
            return f"policy '{name}': parameter name {param.name!r} is not allowed"
        try:
            param.coerce(param.default)
        except ParameterError as error:
            return f"policy '{name}': default of {error}"
    try:
        policy()
    except Exception as error:  # a policy that cannot be built with its defaults is malformed
        return f"policy '{name}' cannot be created with its defaults: {_reason(error)}"
    return None


def _sorted_entry_points() -> list[importlib.metadata.EntryPoint]:
    def order(entry_point: importlib.metadata.EntryPoint) -> tuple:
        distribution = _normal(entry_point.dist.name) if entry_point.dist else ""
        return (distribution != BUILTIN_DISTRIBUTION, distribution, entry_point.name)

    # A distribution found twice on the path (an editable install, say) lists its entry points twice.
    unique = {
        (ep.dist.name if ep.dist else "", ep.name, ep.value): ep
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    return sorted(unique.values(), key=order)


def _normal(distribution: str) -> str:
    """A distribution name in normal form (PEP 503), so `Polykv_KeyDiff` matches `polykv-keydiff`."""
    return re.sub(r"[-_.]+", "-", distribution.strip()).lower()


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
