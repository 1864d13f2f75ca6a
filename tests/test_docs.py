"""Docs that cannot drift: every code block of README.md, docs/*.md and examples/*/README.md runs here.

How each kind of block is checked, and the comments that say more, are in tests/doc_blocks.py.
Commands run in a folder of their own where the repository's files are at hand (``examples/...``
reads as in a checkout) and what they write stays; ``polykv`` is the one installed beside this
Python. Blocks of an example package's README run with that package installed (into a temporary
folder, as tests/test_example_plugin.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from doc_blocks import DOCS, ROOT, SHELLS, Block, blocks, commands, mismatch, transcript
from fake_plugins import fake_distribution

ALL = [block for path in DOCS for block in blocks(path)]
CI = commands((ROOT / ".ci" / "run").read_text())
#: Where the package that docs/writing-a-policy.md builds is needed.
NEEDS_THE_DOCS_PACKAGE = {ROOT / "docs" / "testing-a-policy.md"}
#: What a Python block runs after itself: a policy it defines must not take a built-in's name.
NAMES_CHECK = """
import polykv.policy as _policy
from polykv_plugins import BUILTIN_POLICIES as _BUILTINS

_TAKEN = {_p.name for _p in _BUILTINS}
for _value in list(globals().values()):
    if isinstance(_value, type) and issubclass(_value, _policy.Policy) and _value.__module__ == "__main__":
        assert _value.name not in _TAKEN, f"{_value.__name__} takes the name of a built-in policy: {_value.name!r}"
"""


def _param(block: Block):
    marks = [getattr(pytest.mark, word) for word in ("slow", "heavy") if word in block.words]
    return pytest.param(block, id=block.id, marks=marks)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[Path, Path]:
    """One working folder per Markdown file, holding links to the repository's top-level files."""
    made = {}
    for path in DOCS:
        folder = tmp_path_factory.mktemp(path.stem)
        for entry in ROOT.iterdir():
            if entry.name != ".git":
                (folder / entry.name).symlink_to(entry)
        made[path] = folder
    return made


@pytest.fixture(scope="module")
def docs_package(tmp_path_factory) -> Path:
    """The package docs/writing-a-policy.md describes, made as a reader would: its Python blocks are the module
    its TOML block's entry point names, in a distribution named as it advises (polykv-NAME)."""
    doc = blocks(ROOT / "docs" / "writing-a-policy.md")
    [toml] = [block for block in doc if block.lang == "toml"]
    entry_points = tomllib.loads(toml.text)["project"]["entry-points"]["polykv"]
    [module] = set(entry_points.values())
    source = "\n".join(block.text for block in doc if block.lang == "python" and not (block.words or block.named))
    name = next(iter(entry_points))
    return fake_distribution(tmp_path_factory.mktemp("docs-package"), f"polykv-{name}", {module: source}, entry_points)


@pytest.fixture
def session(block: Block, folders, request) -> dict:
    """Where the block's commands run and with what environment (the files of earlier ``file`` blocks written)."""
    folder = folders[block.path]
    if "slow" in block.words:  # it loads the bundled model: converted first, by the suite's own process
        request.getfixturevalue("converted_model")
    for earlier in blocks(block.path):
        if earlier.line < block.line and earlier.said("file"):
            (folder / earlier.said("file")).write_text(earlier.text)
    paths, plugins = [os.environ.get("PYTHONPATH", "")], {}
    if block.path.parent.parent == ROOT / "examples":  # its package installed, and loaded with the built-ins alone
        assert block.path.parent.name == "polykv-keydiff", f"no fixture installs {block.path.parent}: add one"
        paths.insert(0, request.getfixturevalue("example_package"))
        plugins["POLYKV_PLUGINS"] = tomllib.loads((block.path.parent / "pyproject.toml").read_text())["project"]["name"]
    if block.path in NEEDS_THE_DOCS_PACKAGE:
        paths.insert(0, str(request.getfixturevalue("docs_package")))
    environment = (
        os.environ
        | plugins
        | {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHONPATH": os.pathsep.join(filter(None, paths)),
        }
    )
    return {"cwd": folder, "env": environment}


def run(command: list[str] | str, session: dict, **options) -> subprocess.CompletedProcess:
    shell = isinstance(command, str)
    return subprocess.run(
        command, shell=shell, executable="/bin/bash" if shell else None, capture_output=True, text=True,
        timeout=600, **session, **options,
    )  # fmt: skip


def printed(result: subprocess.CompletedProcess) -> str:
    """What a command shows: its output, and its errors too when it fails."""
    return result.stdout if result.returncode == 0 else result.stdout + result.stderr


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("block", [_param(block) for block in ALL])
def test_doc_block(block: Block, session):
    reason = block.said("skip")
    if reason:
        pytest.skip(reason)
    if block.said("excerpt"):
        problem = mismatch(block.text, (block.path.parent / block.said("excerpt")).read_text(), anchored=False)
        assert problem is None, f"{block.id} is no longer an excerpt of {block.said('excerpt')}: {problem}"
    elif block.said("file") or "output" in block.words:
        pass  # written by the session of later blocks; compared by the block whose output it is
    elif "spec" in block.words:
        result = run(["polykv", "validate", "-"], session, input=block.text)
        assert result.returncode == 0, report(result)
    elif "pytest" in block.words:
        (session["cwd"] / "test_doc_block.py").write_text(block.text)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_doc_block.py"]
        ci = {**session, "env": {**session["env"], "HYPOTHESIS_PROFILE": "polykv-ci"}}  # as the docs advise for CI
        result = run(command, ci)
        assert result.returncode == 0, report(result)
    elif block.lang == "python":
        _run_python(block, session)
    elif block.lang in SHELLS:
        _run_shell(block, session)
    elif block.lang == "toml":
        tomllib.loads(block.text)
    elif block.transcript:
        for command, shown in transcript(block.text):
            result = run(command, session)
            problem = mismatch(shown, printed(result))
            assert problem is None, f"$ {command}\n{problem}\n{report(result)}"
    else:
        pytest.fail(f"{block.id}: no way to check this block: give it a language or a doc-test comment")


def _run_python(block: Block, session) -> None:
    """The block after the file's earlier Python blocks, as one script, then the check of policy names."""
    earlier = [
        b.text
        for b in blocks(block.path)
        if b.line < block.line and b.lang == "python" and not (b.said("skip") or b.said("excerpt") or b.words)
    ]
    script = session["cwd"] / "doc_block.py"
    script.write_text("\n".join([*earlier, block.text, NAMES_CHECK]))
    result = run([sys.executable, str(script)], session)
    assert result.returncode == 0, report(result)


def _run_shell(block: Block, session) -> None:
    """Each command, but ``pip`` and ``pytest``, which must be what .ci/run runs; the next block may be its output."""
    ran = []
    for command in commands(block.text):
        if command.startswith(("pip ", "pytest")):
            assert command in CI, f"{block.id}: {command!r} is not run by .ci/run ({CI})"
            continue
        result = run(command, session)
        assert result.returncode == 0, f"$ {command}\n{report(result)}"
        ran.append(result)
    following = next((b for b in blocks(block.path) if b.line > block.line), None)
    if following is not None and "output" in following.words:
        assert ran, f"{following.id} is the output of {block.id}, which runs nothing here"
        problem = mismatch(following.text, printed(ran[-1]))
        assert problem is None, f"{following.id} is not what {block.id} prints: {problem}\n{report(ran[-1])}"


def test_every_doc_file_is_read():
    assert {path.relative_to(ROOT).as_posix() for path in DOCS} >= {
        "README.md", "docs/writing-a-policy.md", "docs/testing-a-policy.md", "examples/polykv-keydiff/README.md",
    }  # fmt: skip
    assert len(ALL) > 30


def test_the_readme_gives_the_two_commands_ci_runs():
    """The README's install step and test command are .ci/run's, in that order."""
    readme = [b for b in blocks(ROOT / "README.md") if b.lang in SHELLS]
    install, tests = commands(readme[0].text), commands(readme[1].text)
    assert [c for c in install if c.startswith("pip ")] + tests == [c for c in CI if c.startswith(("pip ", "pytest"))]


def test_the_package_writing_a_policy_describes_loads_next_to_the_builtins(docs_package):
    environment = {k: v for k, v in os.environ.items() if k != "POLYKV_PLUGINS"} | {"PYTHONPATH": str(docs_package)}
    result = subprocess.run(
        [sys.executable, "-m", "polykv.cli", "policies", "--json"], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0 and result.stderr == "", report(result)
    listing = json.loads(result.stdout)
    assert listing["failures"] == []
    theirs = [
        p["name"]
        for p in listing["policies"]
        if p["distribution"].startswith("polykv-") and p["distribution"] != "polykv-core"
    ]
    assert theirs, listing["policies"]
