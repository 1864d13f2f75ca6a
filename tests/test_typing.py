"""polykv's annotations are its users' types: polykv ships ``py.typed``, so a user's type checker reads
them. The code users start from (the examples, and the Python blocks of the README and docs/) must
type-check against them as a user's mypy would, and polykv's own code against them (``mypy polykv``, with the
settings in pyproject.toml).

This caught ``polykv.compile`` typed as a module (``polykv.plan.compile`` was both a submodule and the
function the package exports), so every ``polykv.compile(...)`` in user code was "Module not callable".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import DOCS, ROOT, blocks

import polykv

pytestmark = pytest.mark.heavy

#: Modules the docs' code imports that only exist once a reader has built them (docs/testing-a-policy.md's
#: package) or installed them (the example package).
READERS_MODULES = ("my_package", "polykv_keydiff")


def _docs_code(folder: Path) -> list[Path]:
    """Each Markdown file's Python blocks as one module, in order (as tests/test_docs.py runs them); excerpts of
    files are left out, as those files are checked themselves."""
    written = []
    for doc in DOCS:
        code = [block for block in blocks(doc) if block.lang == "python" and not block.said("excerpt")]
        if code:
            module = doc.relative_to(ROOT).with_suffix("").as_posix().replace("/", "_").replace("-", "_")
            path = folder / f"{module}.py"
            path.write_text("".join(f"# {block.id}\n{block.text}\n" for block in code))
            written.append(path)
    return written


def assert_mypy_passes(arguments: list, cwd: Path, search_path: list[Path] | None = None) -> None:
    """Run mypy with ``arguments`` in ``cwd`` (``search_path``: its MYPYPATH) and show its report if it finds issues."""
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    environment = dict(os.environ)
    if search_path:
        environment["MYPYPATH"] = os.pathsep.join(map(str, search_path))
    command = [sys.executable, "-m", "mypy", *arguments]
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=cwd, env=environment)
    assert done.returncode == 0 and "Success: no issues found" in done.stdout, done.stdout + done.stderr


def test_the_examples_and_the_docs_code_type_check_against_polykvs_annotations(tmp_path):
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nfollow_imports = silent\ncheck_untyped_defs = True\n"
        f"[mypy-{','.join(f'{name},{name}.*' for name in READERS_MODULES)}]\nignore_missing_imports = True\n"
    )
    targets = [
        *_docs_code(tmp_path),
        ROOT / "examples" / "quickstart.py",
        ROOT / "examples" / "polykv-keydiff" / "polykv_keydiff",
    ]
    # polykv is found in the checkout (an editable install's import hook is invisible to mypy); a missing
    # polykv is an error here, not Any.
    assert_mypy_passes(["--config-file", config, "--cache-dir", tmp_path / "cache", *targets], tmp_path, [ROOT])


def test_polykv_type_checks_with_no_issues(tmp_path):
    """polykv ships py.typed, so its own annotations must be consistent: ``mypy polykv`` finds no issue."""
    assert_mypy_passes(["polykv", "--cache-dir", tmp_path / "cache"], ROOT)


def test_every_built_in_policy_and_solver_is_made_with_its_defaults_as_a_type_checker_sees_it(tmp_path):
    """A parameter's default reaches type checkers only through ``parameter(default=...)`` (PEP 681): written
    positionally, ``SnapKV()`` type-checks as a call missing ``window``. The built-ins are what authors copy."""
    registry = polykv.default_registry()
    classes = [entry.cls for catalogue in (registry.policies, registry.solvers) for entry in catalogue]
    module = tmp_path / "made_with_defaults.py"
    module.write_text("".join(f"from {c.__module__} import {c.__name__}\n{c.__name__}()\n" for c in classes))
    found = tmp_path / "found"
    found.mkdir()
    (found / "polykv_plugins").symlink_to(ROOT / "plugins")  # installed under that name
    assert_mypy_passes(
        ["--follow-imports", "silent", "--cache-dir", tmp_path / "cache", module], tmp_path, [ROOT, found]
    )
