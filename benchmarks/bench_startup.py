"""How fast do ``ptrace --help`` and ``ptrace compare`` start, and where does the time go?

Times each command in a fresh process (the median of ``--repeats``), ``ptrace compare`` on two
tiny bundles (4 prompt tokens, 3 generated; start-up is all there is to it). Then splits compare's
start-up into its parts: each row imports one more layer of what the command loads, so the
difference to the row above is that layer's cost (the interpreter, the CLI with typer and rich,
the pydantic that typer's option parsing loads, numpy, ptrace's reader and comparison with
what they import (blosc, CRC-32C, msgpack, ml_dtypes; not zarr, which reading ptrace's own
bundles does not need), and finally the comparison itself with its output). ``bench_msprobe.py`` prints the same rows beside
msprobe's.

Target: ``ptrace --help`` and ``ptrace compare`` < 0.3 s, with no engine imported.

    python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Each layer of what ``ptrace compare`` loads, on top of the rows before it.
LAYERS = {
    "interpreter": "pass",
    "+ CLI (typer, rich, ptrace.cli)": "import ptrace.cli",
    "+ typer's option parsing (pydantic)": "import typer._adapters",
    "+ numpy": "import numpy",
    "+ ptrace reader and compare": "import ptrace.bundle_spec, ptrace.compare",
}


def tiny_bundles(scratch: Path) -> tuple[Path, Path]:
    from ptrace.testing.bundles import SyntheticRequest, write_bundle

    request = [SyntheticRequest(prompt=(1, 2, 3, 4), outputs=(5, 6, 7))]
    return (write_bundle(scratch / "tiny-a.zarr", request),
            write_bundle(scratch / "tiny-b.zarr", request, dtype="bfloat16"))


def commands(a: Path, b: Path) -> dict[str, tuple[str, ...]]:
    """The commands whose start-up the target is about, by name."""
    python = sys.executable
    return {
        "ptrace --help": (python, "-m", "ptrace", "--help"),
        "ptrace compare --help": (python, "-m", "ptrace", "compare", "--help"),
        "ptrace compare (tiny bundles)": (python, "-m", "ptrace", "compare", str(a), str(b)),
    }


def breakdown(a: Path, b: Path) -> dict[str, tuple[str, ...]]:
    """Commands that load one more layer each, ending with the whole ``ptrace compare``."""
    rows, imports = {}, []
    for name, statement in LAYERS.items():
        imports.append(statement)
        rows[name] = (sys.executable, "-c", "; ".join(imports))
    rows["+ the comparison and its output"] = commands(a, b)["ptrace compare (tiny bundles)"]
    return rows


def median_seconds(command: tuple[str, ...], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system) of the command. CPU time is what a
    machine shared with other work distorts less."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    walls, cpus = [], []
    for _ in range(repeats):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def print_startup(scratch: Path, repeats: int, extra: dict[str, tuple[str, ...]] | None = None) -> None:
    """The commands (and ``extra`` ones, another tool's), then compare's start-up layer by layer."""
    a, b = tiny_bundles(scratch)
    print(f"\n## start-up (median of {repeats} commands; target: ptrace --help and compare < 0.3 s)")
    print(f"{'':36} {'wall':>7} {'CPU':>7}")
    for name, command in {**commands(a, b), **(extra or {})}.items():
        wall, cpu = median_seconds(command, repeats)
        print(f"{name:36} {wall:6.2f}s {cpu:6.2f}s")
    print(f"\n## where ptrace compare's start-up goes (cumulative, then this layer's share; median of {repeats})")
    print(f"{'':36} {'wall':>7} {'CPU':>7} {'layer wall':>11} {'layer CPU':>10}")
    before = (0.0, 0.0)
    for name, command in breakdown(a, b).items():
        wall, cpu = median_seconds(command, repeats)
        print(f"{name:36} {wall:6.2f}s {cpu:6.2f}s {wall - before[0]:10.2f}s {cpu - before[1]:9.2f}s")
        before = (wall, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (the median is printed)")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="ptrace-bench-startup-") as tmp:
        print_startup(Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
