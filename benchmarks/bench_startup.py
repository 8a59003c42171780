"""How fast do ``ptrace --help`` and ``ptrace compare`` start, and where does the time go?

Times each command in a fresh process (the median of ``--repeats``), ``ptrace compare`` on two
tiny bundles (4 prompt tokens, 3 generated; start-up is all there is to it). Then splits compare's
start-up into its parts: each row imports one more layer of what the command loads, so the
difference to the row above is that layer's cost (the interpreter, the CLI with typer and rich,
the pydantic that typer's option parsing loads, numpy, ptrace's reader and comparison with
what they import (blosc, CRC-32C, msgpack; not zarr, which reading ptrace's own bundles does not
need, nor ml_dtypes, which compare does without), and finally the comparison itself with its
output). ``bench_msprobe.py`` prints the same rows beside msprobe's.

Last, it holds the dependencies to import budgets: each third-party package that these commands
import themselves (not through another one) is timed inside the real command, in fresh
processes, against :data:`IMPORT_BUDGETS`. A package over its budget, or loaded without one,
ends the benchmark with one line naming it and its time, and exit status 1: a dependency's new
release that imports slower (ml_dtypes 0.7 takes 0.7 s where 0.5 took 0.1 s) or a new import on
the start-up path is seen, not averaged into a slower total. The time is CPU time (like
``-X importtime``'s tree, but with ``time.process_time``) and the fastest of ``--repeats``
processes: wall time on a machine shared with other work reads several times too high, CPU time
less than twice, and load only ever adds to it.

Target: ``ptrace --help`` and ``ptrace compare`` < 0.3 s, with no engine imported.

    python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
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

#: CPU seconds each third-party package may take to import within the commands above (with what
#: it imports first), 2.5x or more (at least 20 ms) what it took on the 2-core machine shared with
#: other work (numpy 0.06 s, typer 0.11-0.15 s): the slack absorbs a busier machine, not a
#: release that imports several times slower. ml_dtypes (0.1 s in 0.5, 0.7 s in 0.7) has none: no command here needs it.
IMPORT_BUDGETS = {
    "typer": 0.35,  # with click, rich, and pydantic for its option parsing
    "rich": 0.10,  # what typer has not imported yet (its markdown, for help texts)
    "pydantic": 0.05,  # its plugin loader, run when typer builds its first option adapter
    "numpy": 0.20,
    "numcodecs": 0.05,  # blosc: ptrace's chunk codec
    "msgpack": 0.02,
    "google_crc32c": 0.02,
}
# Runs the real command (``python -m ptrace ARGS``) and writes every import statement it ran as
# its nesting depth, absolute module name and CPU seconds (with the imports it made), in the
# order they finished (as ``-X importtime`` lists them). Statements that find their module loaded
# count too, so that every import that loads one has its maker above it. stdout is the command's.
_IMPORT_PROBE = """
import builtins, importlib.util, json, runpy, sys, time
out, sys.argv = sys.argv[1], ["ptrace", *sys.argv[2:]]
load, depth, finished = builtins.__import__, [0], []
def timed(name, globals=None, locals=None, fromlist=(), level=0):
    module = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__")) if level else name
    depth[0] += 1
    start = time.process_time()
    try:
        return load(name, globals, locals, fromlist, level)
    finally:
        depth[0] -= 1
        finished.append((depth[0], module, time.process_time() - start))
builtins.__import__ = timed
try:
    runpy.run_module("ptrace", run_name="__main__")
except SystemExit:
    pass
open(out, "w").write(json.dumps(finished))
"""
_SITE_PACKAGES = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}


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


def print_startup(scratch: Path, repeats: int, extra: dict[str, tuple[str, ...]] | None = None) -> tuple[Path, Path]:
    """The commands (and ``extra`` ones, another tool's), then compare's start-up layer by
    layer; the two tiny bundles compared."""
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
    return a, b


def _third_party(module: str) -> bool:
    """Whether ``module`` belongs to an installed distribution other than ptrace."""
    root = module.split(".")[0]
    if root == "ptrace" or root.startswith("_") or root in sys.stdlib_module_names or root == "sitecustomize":
        return False
    spec = importlib.util.find_spec(root)
    return spec is not None and spec.origin is not None and any(spec.origin.startswith(p) for p in _SITE_PACKAGES)


def direct_import_seconds(imports: list[tuple[int, str, float]]) -> dict[str, float]:
    """Per third-party package, the seconds of its imports that no other third-party package
    made (with whatever they imported first), from ``(depth, module, seconds)`` in the order the
    imports finished: each after the ones it made (one deeper), so that read backwards every
    import comes after the imports that made it."""
    seconds: dict[str, float] = defaultdict(float)
    makers: list[str] = []
    for depth, module, spent in reversed(imports):
        del makers[depth:]
        if _third_party(module) and not any(_third_party(maker) for maker in makers):
            seconds[module.split(".")[0]] += spent
        makers.append(module)
    return seconds


def import_seconds(args: tuple[str, ...], scratch: Path) -> dict[str, float]:
    """:func:`direct_import_seconds` of one run of ``ptrace ARGS`` in a fresh process."""
    out = scratch / "imports.json"
    subprocess.run((sys.executable, "-c", _IMPORT_PROBE, str(out), *args), env={**os.environ, "PYTHONPATH": str(ROOT)},
                   cwd=ROOT, check=True, capture_output=True)
    return direct_import_seconds([tuple(record) for record in json.loads(out.read_text())])


def check_import_budgets(a: Path, b: Path, repeats: int) -> list[str]:
    """Each command's direct third-party imports against :data:`IMPORT_BUDGETS` (the fastest of
    ``repeats`` fresh processes): a line per package over its budget or without one."""
    measured: dict[str, list[float]] = defaultdict(list)
    print(f"\n## third-party imports of the commands above (CPU, fastest of {repeats})")
    for name, command in commands(a, b).items():
        runs = [import_seconds(command[3:], a.parent) for _ in range(repeats)]
        for package in sorted(set().union(*runs)):
            seconds = min(run.get(package, 0.0) for run in runs)
            measured[package].append(seconds)
            budget = IMPORT_BUDGETS.get(package)
            print(f"{name:36} {package:16} {seconds:6.3f}s  budget {'none' if budget is None else f'{budget:.2f}s'}")
    failures = []
    for package, times in sorted(measured.items()):
        worst, budget = max(times), IMPORT_BUDGETS.get(package)
        if budget is None:
            failures.append(f"import budget: {package} takes {worst:.3f} s at start-up and has no budget "
                            f"(add one to IMPORT_BUDGETS, or keep it off the start-up path)")
        elif worst > budget:
            failures.append(f"import budget: {package} takes {worst:.3f} s at start-up, over its {budget:.2f} s")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (the median is printed)")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="ptrace-bench-startup-") as tmp:
        failures = check_import_budgets(*print_startup(Path(tmp), args.repeats), args.repeats)
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
