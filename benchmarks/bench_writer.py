"""Does the bundle writer's memory stay flat however many requests a batched engine runs at once?

A batched engine (vLLM) runs every request in flight together: the recorder first gets each
request's prefill rows, then one row per request per decode step, for every captured tensor.
This feeds a ``BundleWriter`` exactly that way with stats rows (``[rows, 7]`` float64, what
``TensorRecorder`` writes in both modes), for N requests x 30 tensors x 4000 positions, each size
in a fresh process, and prints that process's peak RSS above what it held before writing, the
volume of stats written, the wall time and the write amplification (bytes the process wrote /
bytes of the finished bundle: partial chunks written under the memory bound are rewritten).

Target: peak memory flat in the number of requests, bounded by the writer's budget
(``PENDING_BYTES``) and chunk sizes; it was linear (all pending stats held until commit).

    python benchmarks/bench_writer.py [--requests 100,400] [--positions 4000] [--decode-steps 64]

To measure another version of the writer, put its checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MEASURE = """
import json, re, sys, tempfile, time, tracemalloc
from pathlib import Path
import numpy as np
from ptrace.bundle_spec import BundleWriter

requests, tensors, prompt, steps, traced = map(int, sys.argv[1:6])
def high_water_kib():  # this process's own peak RSS
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
def written_bytes():  # bytes passed to write(), whether or not they reached the disk yet
    return int(re.search(r"wchar:\\s+(\\d+)", Path("/proc/self/io").read_text()).group(1))
pool = np.random.default_rng(0).standard_normal((prompt + 1, 7))
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "b.zarr"
    if traced:
        tracemalloc.start()
    before, wrote = high_water_kib(), written_bytes()
    start = time.perf_counter()
    with BundleWriter(out) as writer:
        for request in range(requests):  # the prefill, one request after another
            for tensor in range(tensors):
                writer.append(f"stats/t{tensor}", request, pool[:prompt].copy())
        for step in range(steps):  # then every request in flight advances one position
            for request in range(requests):
                for tensor in range(tensors):
                    writer.append(f"stats/t{tensor}", request, pool[step:step + 1].copy())
        writer.commit(ptrace_version="bench", command=["bench"], mode="stats", tensor_names=[])
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"peak_kib": high_water_kib() - before, "seconds": seconds,
                      "traced": tracemalloc.get_traced_memory()[1] if traced else None,
                      "written": written_bytes() - wrote, "stored": stored}))
"""

TENSORS = 30  # a typical selection; every canonical tensor of the example model would be 4 x 8 + 3 = 35


def measure(requests: int, prompt: int, steps: int, traced: bool) -> dict:
    arguments = [str(n) for n in (requests, TENSORS, prompt, steps, int(traced))]
    # -P: ptrace comes from PYTHONPATH (or the environment), not from the current directory
    done = subprocess.run([sys.executable, "-P", "-c", MEASURE, *arguments],
                          capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="100,400", help="comma-separated request counts")
    parser.add_argument("--positions", type=int, default=4000, help="positions per request (prompt + decode)")
    parser.add_argument("--decode-steps", type=int, default=64,
                        help="of which decode steps, one row per request each (64 new tokens by default)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also the peak of Python's allocations (slower; RSS adds the allocator's slack)")
    args = parser.parse_args()
    prompt = args.positions - args.decode_steps
    print(f"{TENSORS} tensors x {args.positions} positions per request ({prompt} prefill + "
          f"{args.decode_steps} decode steps), stats rows of 56 bytes, requests interleaved")
    print(f"{'requests':>9} {'stats MB':>9} {'peak RSS MB':>12} {'traced MB':>10} {'seconds':>8} "
          f"{'write ampl.':>12}")
    for requests in (int(n) for n in args.requests.split(",")):
        result = measure(requests, prompt, args.decode_steps, args.tracemalloc)
        traced = f"{result['traced'] / 1e6:.1f}" if result["traced"] is not None else "-"
        volume = requests * TENSORS * args.positions * 7 * 8
        print(f"{requests:>9} {volume / 1e6:>9.0f} {result['peak_kib'] * 1024 / 1e6:>12.1f} {traced:>10} "
              f"{result['seconds']:>8.1f} {result['written'] / result['stored']:>12.2f}")


if __name__ == "__main__":
    main()
