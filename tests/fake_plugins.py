"""Plugin packages made on the spot: a bare dist-info folder and modules in a folder that goes on the path.

importlib.metadata finds them like installed distributions (entry points, the modules they provide),
in this process once the folder is on ``sys.path`` or in a process started with it on ``PYTHONPATH``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

#: A plugin module as docs/writing-a-policy.md once had it: a policy named like a built-in.
KNORM_AGAIN = """
import polykv


class KeyNorm(polykv.ScoringPolicy):
    name = "knorm"
    description = "Keeps the keys of lowest norm."

    def score(self, view):
        return -view.keys.float().norm(dim=-1)


@polykv.hookimpl
def register_policies(register):
    register(KeyNorm)
"""


def fake_distribution(
    folder: Path,
    distribution: str,
    modules: dict[str, str],
    entry_points: dict[str, str] | None = None,
    lists_its_modules: bool = True,
) -> Path:
    """``distribution`` 0.1.0 providing ``modules`` (name -> source) with ``entry_points`` (name -> module) in
    the group ``polykv`` (None: no entry point at all); returns ``folder``. ``lists_its_modules=False`` leaves
    out what names its modules (``top_level.txt``), as an editable install by hatchling or flit does."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = folder / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    tops = sorted({name.partition(".")[0] for name in modules})
    if lists_its_modules:
        (dist_info / "top_level.txt").write_text("".join(f"{top}\n" for top in tops))
    if entry_points is not None:
        lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
        (dist_info / "entry_points.txt").write_text(f"[polykv]\n{lines}")
    for name, source in modules.items():
        path = folder.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for package in path.relative_to(folder).parents:
            if package != Path("."):
                (folder / package / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return folder
