"""Whether a policy reaches its users: its package's entry point loads it into polykv's registry.

A contract run on the class alone would pass for a policy that no one can use: a package whose
entry point is missing, fails to import, or registers a name a built-in already has. This loads
the package's distribution the way ``polykv`` does, next to the built-ins, and says what went
wrong in the words every ``polykv`` command prints.
"""

from __future__ import annotations

import importlib.metadata

from packaging.utils import canonicalize_name

from polykv.policy import Policy
from polykv.registry import ENTRY_POINT_GROUP, OLD_ENTRY_POINT_GROUP, Registry


def installation_problem(policy: type[Policy]) -> str | None:
    """Why ``policy`` does not load from its installed distribution next to the built-ins, or None when it does."""
    module = policy.__module__.partition(".")[0]
    provided_by = _distributions_providing(module)
    if not provided_by:
        return (
            f"{policy.__qualname__} comes from the module {module!r}, which no installed distribution provides: "
            "install its package (pip install -e .) so that polykv finds the policy through its entry point"
        )
    distribution = provided_by[0]
    declared = [
        entry_point
        for entry_point in _polykv_entry_points()
        if entry_point.dist and canonicalize_name(entry_point.dist.name) == canonicalize_name(distribution)
    ]
    if not declared:
        return (
            f"{distribution} declares no entry point in the group {ENTRY_POINT_GROUP!r}, so polykv never loads "
            f"'{policy.name}'; add to its pyproject.toml, then reinstall it:\n"
            f'[project.entry-points.{ENTRY_POINT_GROUP}]\n{policy.name} = "{module}"'
        )
    registry = Registry()
    registry.load_entry_points(only={canonicalize_name(distribution)})
    skipped = [f for f in registry.failures if canonicalize_name(f.distribution) == canonicalize_name(distribution)]
    if skipped:  # what every polykv command prints, and polykv policies lists
        return "\n".join(f"polykv: skipped plugin {failure}" for failure in skipped)
    if policy.name not in registry.policies or registry.policies.get(policy.name).cls is not policy:
        hooks = ", ".join(entry_point.value for entry_point in declared)
        return (
            f"the entry point of {distribution} ({hooks}) registers no policy '{policy.name}' of class "
            f"{policy.__qualname__}: its register_policies hook should call register({policy.__qualname__})"
        )
    return None


def _distributions_providing(module: str) -> list[str]:
    """The distributions that install the top-level ``module``: by their lists of files, or else by an entry point
    of theirs that names it. An editable install by hatchling or flit lists only a path file, so only its entry
    point tells."""
    listed = importlib.metadata.packages_distributions().get(module)
    if listed:
        return listed
    return sorted(
        {
            entry_point.dist.name
            for entry_point in _polykv_entry_points()
            if entry_point.dist and entry_point.module.partition(".")[0] == module
        }
    )


def _polykv_entry_points() -> list[importlib.metadata.EntryPoint]:
    return [
        entry_point
        for group in (ENTRY_POINT_GROUP, OLD_ENTRY_POINT_GROUP)
        for entry_point in importlib.metadata.entry_points(group=group)
    ]
