"""The wheel carries the grammar and the built-in policies, and works installed, away from the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # pip builds in place: keep the checkout clean
    source = _copy_of_checkout(build)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (found,) = out.glob("polykv_core-*.whl")
    return found


def _copy_of_checkout(build: Path) -> Path:
    """The working tree's files that git would ship (tracked and untracked-not-ignored), copied."""
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    source = build / "polykv"
    for name in filter(None, listing.split("\0")):
        origin = ROOT / name
        if origin.is_file():
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(origin.read_bytes())
    return source


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "polykv/grammar/polykv.lark" in names
    assert "polykv/py.typed" in names
    assert {
        f"polykv_plugins/{n}.py" for n in ("full", "streaming", "snapkv", "h2o", "tova", "knorm", "random")
    } <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[polykv]\nbuiltin = polykv_plugins" in text
    assert "[console_scripts]\npolykv = polykv.cli:main" in text
    assert not any(n.startswith(("tests/", "examples/", "grammar/")) for n in names)


def test_the_installed_wheel_parses_and_lists_policies(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    script = (
        "import json, polykv\n"
        "spec = polykv.parse('layers 0-3: streaming@64; 4-27: snapkv@auto')\n"
        "checked = polykv.check(spec.with_budget(polykv.parse('budget 512').budget), layers=28)\n"
        "print(json.dumps({'file': polykv.__file__, 'policies': polykv.default_registry().policies.names(),"
        " 'layers': len(checked.layers)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["file"].startswith(str(target))
    assert found["layers"] == 28
    assert {"full", "snapkv", "streaming"} <= set(found["policies"])
