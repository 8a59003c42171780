"""How fast is ``compare``, and does its memory stay bounded as bundles grow?

Captures the larger random model (hidden 1024, 8 layers, vocab 32000, 2048-token prompts) with
every canonical tensor in full mode, once with 1 request and once with N requests (several GB),
replays each (teacher-forced, float32), then times ``compare`` of each pair in a fresh process
and reads that process's peak RSS. Prints throughput in GB of tensor data read per second, per
core (wall clock, and per CPU-second, which a machine shared with other work distorts less), and
the peak memory of both sizes side by side. ``--baseline DIR`` times another ptrace (a checkout
of an older commit) on the same bundles in the same run, row for row.

Targets: >= 1 GB/s per core; peak memory bounded by the chunk size, not the bundle size.

    python benchmarks/bench_compare.py [--requests 3] [--quick] [--baseline /tmp/old-checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import EXAMPLE, make_large_model  # noqa: E402

from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture  # noqa: E402
from ptrace.replay.plan import TEACHER, ReplayConfig  # noqa: E402
from ptrace.replay.session import replay  # noqa: E402

MEASURE = """
import json, re, sys, time
from ptrace.bundle_spec import open_bundle
from ptrace.compare import compare
a, b = open_bundle(sys.argv[1]), open_bundle(sys.argv[2])
volume = 0
for bundle in (a, b):
    for path, record in bundle.manifest.arrays.items():
        if path.startswith(("tensors/", "requests/")) and "tensors/" in path:  # spec v2 or v1, no segment tables
            n = 1
            for d in record.shape:
                n *= d
            volume += n * {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[record.dtype]
def high_water_kib():  # this process's own peak RSS (ru_maxrss would include the parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = high_water_kib()
start, cpu = time.perf_counter(), time.process_time()
result = compare(a, b)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
peak = high_water_kib()
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "bytes": volume, "peak_kib": peak, "baseline_kib": before,
                  "verdict": result.verdict}))
"""


def measure(a: Path, b: Path, ptrace_root: Path | None = None) -> dict:
    """One compare in a fresh process: of this ptrace, or of the one at ``ptrace_root``."""
    env = dict(os.environ, PYTHONPATH=str(ptrace_root)) if ptrace_root else None
    # ``python -c`` puts the working directory first on sys.path: run the baseline from its root.
    done = subprocess.run([sys.executable, "-c", MEASURE, str(a), str(b)], capture_output=True, text=True,
                          env=env, cwd=ptrace_root)
    if done.returncode:
        sys.exit(f"compare of {a} and {b} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_pair(model: Path, requests: int, prompt_len: int, new_tokens: int, scratch: Path) -> tuple[Path, Path]:
    source = capture(CaptureConfig(backend="torch", model=model, output=scratch / f"a{requests}.zarr", random_input_ids=prompt_len, num_requests=requests, overwrite=True, command=("bench",), sampling=SamplingParams(seed=1, max_new_tokens=new_tokens), settings=CaptureSettings(tensors=("*",))))
    other = replay(ReplayConfig(bundle=source, backend="torch", modes=(TEACHER,), overwrite=True,
                                output=scratch / f"b{requests}")).bundles[TEACHER]
    return source, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3, help="requests in the big bundle")
    parser.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    parser.add_argument("--baseline", type=Path, help="also time the ptrace at this directory (an older checkout)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ptrace-bench-") as tmp:
        scratch = Path(tmp)
        if args.quick:
            model = make_large_model(scratch / "model", EXAMPLE, layers=2, hidden=256, vocab=8000)
            prompt_len, new_tokens = 256, 8
        else:
            model = make_large_model(scratch / "model", EXAMPLE)
            prompt_len, new_tokens = 2048, 20
        rows = []
        versions = {"this": None, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        for requests in (1, args.requests):
            a, b = make_pair(model, requests, prompt_len, new_tokens, scratch)
            for version, root in versions.items():  # alternating, on the same bundles
                rows.append((requests, version, measure(a, b, root)))
        print(f"compare on {cores} cores; bundles of the random Qwen2 model, every canonical tensor, "
              f"{prompt_len}-token prompts")
        print(f"{'requests':>8} {'ptrace':>8} {'tensor data read':>17} {'seconds':>8} {'GB/s':>6} {'GB/s/core':>10} "
              f"{'GB/cpu-s':>9} {'peak RSS':>10} {'above start':>12}")
        for requests, version, r in rows:
            rate = r["bytes"] / r["seconds"] / 1e9
            print(f"{requests:>8} {version:>8} {r['bytes'] / 1e9:>15.2f}GB {r['seconds']:>8.1f} {rate:>6.2f} "
                  f"{rate / cores:>10.2f} {r['bytes'] / r['cpu_seconds'] / 1e9:>9.2f} "
                  f"{r['peak_kib'] / 1024:>8.0f}MiB {(r['peak_kib'] - r['baseline_kib']) / 1024:>10.0f}MiB")
        ours = [r for _, version, r in rows if version == "this"]
        small, big = ours[0], ours[-1]
        growth = (big["peak_kib"] - big["baseline_kib"]) / max(small["peak_kib"] - small["baseline_kib"], 1)
        print(f"bundle {big['bytes'] / max(small['bytes'], 1):.1f}x larger -> peak memory above start "
              f"{growth:.2f}x (target: bounded by chunk size, ~1x)")
        print("target: >= 1 GB/s per core")


if __name__ == "__main__":
    main()
