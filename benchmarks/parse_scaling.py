"""How parsing and checking scale with the size of a spec (they must stay linear).

    python benchmarks/parse_scaling.py

Specs of 1,000 and 10,000 statements (`layers i: snapkv@64(window=8)  # layer i`; a spec has at most
polykv.limits.MAX_STATEMENTS), parsed and checked (with the layer count, so every layer's table is
built), median of --repeats runs. Prints a table with the time per statement, which stays flat when
the cost is linear, and writes benchmarks/results/parse_scaling_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import polykv

RESULTS = Path(__file__).parent / "results"


def spec_text(statements: int) -> str:
    return "".join(f"layers {i}: snapkv@{64 + i % 7}(window=8)  # layer {i}\n" for i in range(statements))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    polykv.default_registry()  # plugins load once, outside the timings
    rows = []
    for size in args.sizes:
        text = spec_text(size)
        parse_times, check_times = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            spec = polykv.parse(text)
            parsed = time.perf_counter()
            polykv.check(spec, layers=size)
            parse_times.append(parsed - started)
            check_times.append(time.perf_counter() - parsed)
        rows.append(
            {
                "statements": size,
                "bytes": len(text.encode()),
                "parse_seconds": statistics.median(parse_times),
                "check_seconds": statistics.median(check_times),
            }
        )
    print(f"{'statements':>10} {'MB':>6} {'parse s':>8} {'check s':>8} {'us/statement':>13}")
    for row in rows:
        total = row["parse_seconds"] + row["check_seconds"]
        print(
            f"{row['statements']:>10} {row['bytes'] / 1e6:>6.2f} {row['parse_seconds']:>8.2f} "
            f"{row['check_seconds']:>8.2f} {1e6 * total / row['statements']:>13.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}-cpu"
    path = args.out / f"parse_scaling_{machine}.json"
    result = {"machine": machine, "python": platform.python_version(), "rows": rows}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
