"""The example plugin package, installed for real: polykv finds it and uses it.

The package is pip-installed into a temporary folder (``--target``), never into the running
environment, and the processes that look plugins up get that folder on PYTHONPATH: the user's
own installs are left alone, and the default registry (loaded once per process) starts fresh.

Also here: a broken plugin, faked as a bare dist-info folder, never breaks polykv.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from fake_plugins import KNORM_AGAIN, fake_distribution
from polykv_plugins import BUILTIN_POLICIES

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "polykv-keydiff"
DISTRIBUTION = "polykv-keydiff"
VERSION = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["version"]
BUILTIN_NAMES = {policy.name for policy in BUILTIN_POLICIES}


def run(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None, **kwargs):
    """Run ``args`` from the repository root and return the completed process."""
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or clean_environment(), **kwargs
    )


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without a POLYKV_PLUGINS that would hide plugins, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k != "POLYKV_PLUGINS"}
    return env | settings


def with_path(folder: Path, **settings: str) -> dict[str, str]:
    """A clean environment whose PYTHONPATH starts with ``folder``."""
    return clean_environment(
        PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])), **settings
    )


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, output_of(result)
    return result


def policies_json(env: dict[str, str] | None = None) -> dict:
    result = succeeded(run([sys.executable, "-m", "polykv.cli", "policies", "--json"], env=env))
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def installed(example_package) -> dict[str, str]:
    """The environment that sees the example package (installed into a temporary folder)."""
    return with_path(Path(example_package))


# --- a broken plugin (needs no install) ---------------------------------------------------------


@pytest.fixture
def broken_plugin_path(tmp_path) -> str:
    """A PYTHONPATH holding a fake distribution whose entry point names a module that does not exist."""
    dist_info = tmp_path / "polykv_broken-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: polykv-broken\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text("[polykv.policies]\nbroken = polykv_broken_missing_module\n")
    return os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))


def test_a_broken_plugin_is_reported_and_the_rest_still_load(broken_plugin_path):
    listing = policies_json(clean_environment(PYTHONPATH=broken_plugin_path))

    assert {p["name"] for p in listing["policies"]} >= BUILTIN_NAMES, listing
    broken = [f for f in listing["failures"] if f["distribution"] == "polykv-broken"]
    assert len(broken) == 1, listing["failures"]
    assert "import failed" in broken[0]["reason"], broken[0]
    assert "polykv_broken_missing_module" in broken[0]["reason"], broken[0]


def test_each_skipped_plugin_is_one_line_on_stderr_and_listed_with_why(broken_plugin_path, tmp_path):
    clash = fake_distribution(tmp_path, "polykv-mynorm", {"polykv_mynorm": KNORM_AGAIN}, {"knorm": "polykv_mynorm"})
    env = clean_environment(PYTHONPATH=os.pathsep.join([str(clash), broken_plugin_path]))
    version = importlib.metadata.version("polykv-core")
    expected = [
        "polykv: skipped plugin polykv-broken: import failed: ModuleNotFoundError: "
        "No module named 'polykv_broken_missing_module'",
        f"polykv: skipped plugin polykv-mynorm: policy 'knorm' is already provided by polykv-core {version}",
    ]
    validate = succeeded(
        run([sys.executable, "-m", "polykv.cli", "validate", "--layers", "4", "-"], input="*: full\n", env=env)
    )
    assert validate.stderr.splitlines() == expected, output_of(validate)

    listing = succeeded(run([sys.executable, "-m", "polykv.cli", "policies"], env=env))
    assert listing.stderr.splitlines() == expected, output_of(listing)
    skipped = listing.stdout.split("\nskipped plugins:\n", 1)[1].split("\n\n")[0].splitlines()
    assert skipped == [f"    {line.removeprefix('polykv: skipped plugin ')}" for line in expected], listing.stdout


def test_a_plugin_in_the_old_entry_group_loads_with_a_note_to_rename_it(tmp_path):
    dist_info = tmp_path / "polykv_oldgroup-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: polykv-oldgroup\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text("[polykv.policies]\noldgroup = polykv_oldgroup\n")
    (tmp_path / "polykv_oldgroup.py").write_text(
        "import polykv\n\n"
        "class Newest(polykv.ScoringPolicy):\n"
        "    name = 'newest'\n"
        "    description = 'Keeps the newest tokens.'\n\n"
        "    def score(self, view):\n"
        "        return view.positions.float()\n\n"
        "@polykv.hookimpl\n"
        "def register_policies(register):\n"
        "    register(Newest)\n"
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    listing = policies_json(clean_environment(PYTHONPATH=path))
    assert "newest" in {p["name"] for p in listing["policies"]}, listing
    assert listing["failures"] == [], listing
    [note] = [n for n in listing["notes"] if n["distribution"] == "polykv-oldgroup"]
    assert "rename it [project.entry-points.polykv]" in note["reason"], note


def test_polykv_plugins_selects_which_distributions_load(broken_plugin_path):
    only_builtins = policies_json(clean_environment(PYTHONPATH=broken_plugin_path, POLYKV_PLUGINS="polykv-core"))
    assert {p["name"] for p in only_builtins["policies"]} == BUILTIN_NAMES, only_builtins
    assert only_builtins["failures"] == [], only_builtins

    builtins = policies_json(clean_environment(PYTHONPATH=broken_plugin_path, POLYKV_PLUGINS="none"))
    assert {p["name"] for p in builtins["policies"]} == BUILTIN_NAMES, builtins
    assert builtins["failures"] == [], builtins  # the broken third-party plugin is not even tried


# --- the example package, installed -------------------------------------------------------------


def test_policies_lists_keydiff_with_its_distribution_and_parameter(installed):
    text = succeeded(run([sys.executable, "-m", "polykv.cli", "policies"], env=installed)).stdout
    assert f"keydiff  ({DISTRIBUTION} {VERSION})" in text, text
    assert "window: int = 8, between 0 and 1024" in text, text

    listing = policies_json(installed)
    keydiff = next((p for p in listing["policies"] if p["name"] == "keydiff"), None)
    assert keydiff is not None, listing
    assert (keydiff["distribution"], keydiff["version"]) == (DISTRIBUTION, VERSION)
    assert keydiff["parameters"] == [
        {
            "name": "window",
            "type": "int",
            "default": 8,
            "min": 0,
            "max": 1024,
            "choices": [],
            "description": "most recent tokens always kept",
        }
    ]
    assert listing["failures"] == [], listing["failures"]


def test_validate_accepts_keydiff_and_suggests_it_for_a_typo(installed):
    validate = [sys.executable, "-m", "polykv.cli", "validate", "--layers", "4", "-"]

    accepted = succeeded(run(validate, input="layers 0: full; *: keydiff@64(window=4)\n", env=installed))
    assert "keydiff" in accepted.stdout and "window=4" in accepted.stdout, output_of(accepted)

    typo = run(validate, input="layers 0: full; *: keydif@64(window=4)\n", env=installed)
    assert typo.returncode == 1, output_of(typo)
    assert "did you mean 'keydiff'?" in typo.stderr, output_of(typo)


GENERATE_WITH_KEYDIFF = textwrap.dedent(
    """
    import json

    import polykv
    from polykv.testing import prompt, tiny_model

    model = tiny_model("llama", layers=3)
    plan = polykv.compile("layers 0: full; *: keydiff@16", model)
    cache = plan.make_cache()
    ids = prompt(40)
    output = model.generate(
        ids, **polykv.cache_argument(model, cache), max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    print(json.dumps({
        "prompt": ids.shape[1],
        "generated": output.shape[1] - ids.shape[1],
        "policies": [repr(layer.prefill.policy) for layer in cache.layers],
        "layer_lengths": cache.layer_lengths(),
    }))
    """
)


@pytest.mark.heavy  # 9 s in a fresh process; loading and validating keydiff run in the quick tier
def test_keydiff_compresses_layers_during_generation(installed):
    result = succeeded(run([sys.executable, "-c", GENERATE_WITH_KEYDIFF], timeout=300, env=installed))
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["generated"] == 4, report
    assert report["policies"] == ["full", "keydiff(window=8)", "keydiff(window=8)"], report
    # Every generated token but the last went through the cache, and no decode policy evicts:
    # the keydiff layers hold 16 tokens after prefill plus those appended while decoding.
    appended = report["generated"] - 1
    assert report["layer_lengths"] == [report["prompt"] + appended, 16 + appended, 16 + appended], report


@pytest.mark.slow
@pytest.mark.heavy
def test_the_example_package_passes_its_own_tests(installed):
    succeeded(
        run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/polykv-keydiff/tests"],
            timeout=600,
            env={**installed, "HYPOTHESIS_PROFILE": "polykv-ci"},  # as docs/testing-a-policy.md advises for CI
        )
    )


def test_without_the_folder_on_the_path_keydiff_is_not_listed(installed):
    """Nothing was installed into this environment: only the temporary folder holds keydiff."""
    listing = policies_json()
    assert "keydiff" not in {p["name"] for p in listing["policies"]}, listing
    assert {p["name"] for p in listing["policies"]} >= BUILTIN_NAMES, listing
