"""Issue 19's hostile inputs, each run as a user would: how it ends, how long it takes, how much memory.

    python benchmarks/hostile_inputs.py [--only WORD] [--timeout 120]

Every reproducer of the issue (a spec, a command line, a model directory, a profile) runs in a fresh
process under /usr/bin/time; a row says its exit status, the last line it printed, its wall time and
its peak resident memory. Each must end in a clear error (or the right result) within seconds and
under 1 GB (the rows marked "bundled model" load SmolLM2-135M, most of their memory). A tiny random
model with 512 positions and the bundled tokenizer is built in a temporary folder for the commands
that need a model. Writes benchmarks/results/hostile_inputs.json.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
POLYKV = f"{shlex.quote(sys.executable)} -m polykv"


def tiny_model_folder(folder: Path) -> Path:
    """A 4-layer random Llama of 512 positions with the bundled model's tokenizer and chat template."""
    from polykv.testing.models import saved_small_model

    return saved_small_model(folder / "tiny", layers=4)


def config_folder(folder: Path, name: str, layers) -> Path:
    """A model folder whose config.json says ``layers`` decoder layers (and holds no weights)."""
    path = folder / name
    path.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": 64, "vocab_size": 100}
    (path / "config.json").write_text(json.dumps(config))
    return path


def profiles(folder: Path) -> dict[str, Path]:
    """The bundled profile damaged as the issue's reproducers damage it."""
    from polykv.profile import DEFAULT_PROFILE

    bundled = importlib.resources.files("polykv.profile").joinpath(DEFAULT_PROFILE)
    document = json.loads(bundled.read_text(encoding="utf-8"))
    made = {"bundled": folder / "bundled.json"}
    made["bundled"].write_text(json.dumps(document))

    def write(name: str, changed: dict) -> None:
        made[name] = folder / f"{name}.json"
        made[name].write_text(json.dumps(changed))

    write(
        "no_prompt_length",
        {**document, "settings": {k: v for k, v in document["settings"].items() if k != "prompt_length"}},
    )
    write("unsorted_grid", {**document, "grid": list(reversed(document["grid"]))})
    zero = json.loads(json.dumps(document))
    for regime in zero["regimes"]:
        regime["weights"] = {task: 0.0 for task in regime["weights"]}
    write("zero_weights", zero)
    return made


def cases(folder: Path) -> list[tuple[str, str]]:
    """(reproducer, shell command) for every group of the issue."""
    tiny = tiny_model_folder(folder)
    damaged = profiles(folder)
    spec = folder / "spec.pkv"
    spec.write_text("layers 0-1: full\nlayers *: snapkv@256\n")
    every_layer = ",".join(str(i) for i in range(30))
    texts = {
        "layers_1e9": "model layers 1000000000\n*: full\n",
        "range_1e8": "layers 0-100000000: full\n",
        "count_30_digits": "model layers 123456789012345678901234567890\n*: full\n",
        "digits_5000": f"layers 0: snapkv@{'9' * 5000}\n",
        "prefill_5000_digits": f"prefill <= {'9' * 5000}x\n*: full\n",
        "overlap_8k": "model layers 30\n" + f"layers {every_layer}: full\n" * 8_000,
        "one_line_500k": "layers 0: full; " * 500_000,
        "list_2m": "layers " + "0," * 2_000_000 + "0: full\n",
        "errors_20k": "layers 0: nosuchpolicy@8\n" * 20_000,
        "errors_100k": "layers 0: @@\n" * 100_000,
    }
    for name, text in texts.items():
        (folder / f"{name}.pkv").write_text(text)
    (folder / "existing").mkdir()
    (folder / "existing" / "results.jsonl").write_text("")
    (folder / "file_out").write_text("keep me\n")
    prompt = folder / "prompt_20mb.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog. " * (20 * 2**20 // 45))
    model = f"--model {tiny} --device cpu"
    return [
        ("spec: model layers 1000000000", f"{POLYKV} validate {folder}/layers_1e9.pkv"),
        ("spec: a range to 1e8", f"{POLYKV} validate --layers 30 {folder}/range_1e8.pkv"),
        ("spec: a 30-digit layer count", f"{POLYKV} validate {folder}/count_30_digits.pkv"),
        ("spec: a 5,000-digit budget", f"{POLYKV} validate {folder}/digits_5000.pkv"),
        ("spec: prefill <= (5,000 digits)x", f"{POLYKV} validate {folder}/prefill_5000_digits.pkv"),
        ("spec: prefill <= 1e400x", f"echo 'prefill <= 1e400x; *: full' | {POLYKV} validate -"),
        ("spec: 8k statements naming every layer", f"{POLYKV} validate {folder}/overlap_8k.pkv"),
        ("spec: 500k statements on one line", f"{POLYKV} validate {folder}/one_line_500k.pkv"),
        ("spec: one statement naming layer 0 2M times", f"{POLYKV} validate {folder}/list_2m.pkv"),
        ("spec: 20k statements, all errors", f"{POLYKV} validate {folder}/errors_20k.pkv"),
        ("spec: 100k syntax errors", f"{POLYKV} validate {folder}/errors_100k.pkv"),
        ("validate | head -1", f"{POLYKV} validate --layers 30 {spec} | head -1"),
        ("validate --json | head -c 10", f"{POLYKV} validate --json --layers 30 {spec} | head -c 10"),
        ("validate > /dev/full", f"{POLYKV} validate --layers 30 {spec} > /dev/full"),
        ("validate - with stdin closed", f"{POLYKV} validate - <&-"),
        ("config: 1e9 layers", f"{POLYKV} validate --model {config_folder(folder, 'c1e9', 10**9)} {spec}"),
        ("config: 0 layers", f"{POLYKV} validate --model {config_folder(folder, 'c0', 0)} {spec}"),
        ("config: -3 layers", f"{POLYKV} validate --model {config_folder(folder, 'cneg', -3)} {spec}"),
        ("config: '30' layers", f"{POLYKV} validate --model {config_folder(folder, 'cstr', '30')} {spec}"),
        ("config: null layers", f"{POLYKV} validate --model {config_folder(folder, 'cnull', None)} {spec}"),
        ("generate --prompt-file /dev/zero", f"{POLYKV} generate {model} --spec '*: full' --prompt-file /dev/zero"),
        ("generate: 20 MB prompt, 512 positions", f"{POLYKV} generate {model} --spec '*: full' --prompt-file {prompt}"),
        (
            "generate: a / in a comment of --spec",
            f"{POLYKV} generate {model} --spec '*: snapkv@16(window=4) # 1/2 of it' --prompt hello --max-new-tokens 2",
        ),
        (
            "generate --static --max-new-tokens 100000",
            f"{POLYKV} generate {model} --spec '*: full' --prompt hello --static --max-new-tokens 100000",
        ),
        (
            "generate --static --max-new-tokens 400",
            f"{POLYKV} generate {model} --spec '*: full' --prompt hello --static --max-new-tokens 400",
        ),
        (
            "plan: budget 10000 on a 1k prompt (bundled model)",
            f"{POLYKV} plan --device cpu --context 1000 'budget 10000; *: auto@auto'",
        ),
        (
            "plan: budget total 1000000 (bundled model)",
            f"{POLYKV} plan --device cpu --context 1000 'budget total 1000000; *: auto@auto'",
        ),
        (
            "plan: budget 100, for comparison (bundled model)",
            f"{POLYKV} plan --device cpu --context 1000 'budget 100; *: auto@auto'",
        ),
        (
            "plan: a 30-layer profile, a 4-layer model",
            f"{POLYKV} plan {model} --profile {damaged['bundled']} '*: auto@64'",
        ),
        (
            "profile without prompt_length",
            f"{POLYKV} plan {model} --profile {damaged['no_prompt_length']} '*: auto@64'",
        ),
        ("profile with an unsorted grid", f"{POLYKV} plan {model} --profile {damaged['unsorted_grid']} '*: auto@64'"),
        ("profile with all weights zero", f"{POLYKV} plan {model} --profile {damaged['zero_weights']} '*: auto@64'"),
        ("calibrate --out a folder", f"{POLYKV} calibrate {model} --out {folder}"),
        (
            "calibrate --length 1000000, 512 positions",
            f"{POLYKV} calibrate {model} --out {folder}/p.json --length 1000000",
        ),
        ("eval --out an existing file", f"{POLYKV} eval {model} --quick --out {folder}/file_out"),
        (
            "eval --data /dev/zero",
            f"{POLYKV} eval {model} --methods full --length 64 --data /dev/zero --out {folder}/e",
        ),
    ]


def measure(command: str, timeout: float, folder: Path) -> dict:
    """Run ``command`` under /usr/bin/time (the first polykv process of it), its status, last line, seconds, MiB."""
    report = folder / "time.txt"
    timed = command.replace(POLYKV, f"/usr/bin/time -o {report} -f '%e %M' {POLYKV}", 1)
    try:
        done = subprocess.run(["bash", "-c", timed], capture_output=True, text=True, timeout=timeout)
        status, output = done.returncode, (done.stderr.strip() or done.stdout.strip())
    except subprocess.TimeoutExpired:
        status, output = "timeout", ""
    timed_lines = report.read_text().splitlines() if report.exists() else []
    report.unlink(missing_ok=True)
    fields = timed_lines[-1].split() if timed_lines else []
    seconds, kib = fields if len(fields) == 2 else ("nan", "0")
    lines = output.splitlines()
    errors = [line for line in lines if "error" in line and "errors in spec" not in line]
    last = (errors or lines or [""])[0] if status else (lines or [""])[-1]
    return {"status": status, "last_line": last[:160], "seconds": float(seconds), "peak_mib": int(kib) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the reproducers whose name holds this word")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, command in cases(Path(folder)):
            if args.only and args.only not in name:
                continue
            row = {"reproducer": name, **measure(command, args.timeout, Path(folder))}
            rows.append(row)
            cells = [name, row["status"], row["last_line"], f"{row['seconds']:.1f} s", f"{row['peak_mib']:.0f} MiB"]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile_inputs.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
