"""ptrace side by side with msprobe (``mindstudio-probe``), in one run, on one model and one input.

The tool users would otherwise run on these cases is msprobe, Ascend's precision debugger. This
benchmark runs both on the same random Qwen2 (hidden 1024, 8 layers, vocab 32000; ``--quick``: a
small one), the same prompt token ids, 20 greedy new tokens, and the same tensors: the output of
every decoder layer at every position (ptrace ``--tensors 'layers.*.out'``; msprobe level L0, its
``list`` restricted to the decoder layers' forward, ``data_mode`` output). msprobe lives in its own
environment (``.venvs/msprobe``, made by ``make bench``); every run is a fresh process started in
its tool's environment by ``capture_run.py``, and each tool is compared with plain ``generate``
timed the same way in the same environment.

What each side computes:

- capture, statistics: ptrace ``--mode stats`` keeps min, max, mean, std, abs-mean, NaN and inf
  counts per *row* (per layer, per position); msprobe ``task=statistics`` keeps Max, Min, Mean and
  L2 norm per module *call* (one row for the whole prefill, one per decode step).
- capture, tensors: ptrace ``--mode full`` writes the rows into a chunked, compressed, checksummed
  Zarr bundle; msprobe ``task=tensor`` writes one ``.pt`` file per module call.
- compare, fp32 against bfloat16 (both runs free-running greedy): ``ptrace compare`` aligns the
  runs by position and computes per tensor and position cosine similarity, max/mean absolute and
  relative error, and a verdict against bf16 rounding noise; ``msprobe compare`` matches module
  calls by name and computes per call Cosine, EucDist, MaxAbsErr, MaxRelativeErr, the share of
  elements with relative error above 1/1000 and 5/1000, and both sides' statistics. Each compare
  is timed as a command (its process start-up included; the start-up of each CLI is printed too)
  with its peak RSS. Throughput: the two runs' layer outputs (fp32 + bf16 bytes) per second.

Then how capture and compare grow with the prompt length (1K, 2K, 4K and 8K tokens), and how fast
``ptrace --help`` and ``ptrace compare`` start.

    python benchmarks/bench_msprobe.py --msprobe-python .venvs/msprobe/bin/python [--quick] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_startup  # noqa: E402
from bench_capture import EXAMPLE, make_large_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "capture_run.py"

# Runs a command and reports its wall time and peak RSS: ru_maxrss of the children of a process
# that has only that one child.
_TIMED_COMMAND = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"seconds": time.perf_counter() - start, "returncode": done.returncode,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "output": (done.stdout + done.stderr)[-3000:]}))
"""


class Bench:
    def __init__(self, msprobe_python: Path, model: Path, scratch: Path, new_tokens: int, repeats: int):
        self.python = {"ptrace": Path(sys.executable), "msprobe": msprobe_python}
        self.model, self.scratch, self.new_tokens, self.repeats = model, scratch, new_tokens, repeats
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's ptrace, in any environment

    def run_tool(self, env: str, tool: str, prompt: Path, dtype: str, *rest: str) -> dict:
        done = subprocess.run([str(self.python[env]), str(RUNNER), tool, str(self.model), str(prompt),
                               str(self.new_tokens), dtype, *rest], capture_output=True, text=True, env=self.env,
                              cwd=self.scratch)
        if done.returncode:
            raise SystemExit(f"{tool} run failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def timed_command(self, *command: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _TIMED_COMMAND, *command], capture_output=True, text=True,
                              env=self.env, cwd=self.scratch, check=True)
        result = json.loads(done.stdout)
        if result["returncode"]:
            raise SystemExit(f"{command[:4]} failed:\n{result['output']}")
        return result

    def length(self, prompt_len: int) -> dict:
        """Every capture and both compares at one prompt length; medians of the timed runs."""
        ids = np.random.RandomState(42).randint(100, 2000, size=prompt_len).tolist()
        prompt = self.scratch / f"prompt-{prompt_len}.json"
        prompt.write_text(json.dumps(ids))
        out = self.scratch / str(prompt_len)
        out.mkdir()
        runs = {
            "plain, ptrace env": ("ptrace", "plain", "float32"),
            "ptrace stats": ("ptrace", "ptrace", "float32", str(out / "stats.zarr"), "stats"),
            "ptrace full": ("ptrace", "ptrace", "float32", str(out / "full.zarr"), "full"),
            "plain, msprobe env": ("msprobe", "plain", "float32"),
            "msprobe statistics": ("msprobe", "msprobe", "float32", str(out / "statistics"), "statistics"),
            "msprobe tensor": ("msprobe", "msprobe", "float32", str(out / "tensor"), "tensor"),
        }
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(self.repeats):  # interleaved: load drifts hit every run alike
            for name, (env, tool, dtype, *rest) in runs.items():
                results[name].append(self.run_tool(env, tool, prompt, dtype, *rest))
        # the other side of each compare: the same capture in bfloat16
        self.run_tool("ptrace", "ptrace", prompt, "bfloat16", str(out / "full-bf16.zarr"), "full")
        self.run_tool("msprobe", "msprobe", prompt, "bfloat16", str(out / "tensor-bf16"), "tensor")
        compares = {
            "ptrace compare": self.timed_command(str(self.python["ptrace"]), "-m", "ptrace", "compare",
                                                 str(out / "full.zarr"), str(out / "full-bf16.zarr")),
            "msprobe compare": self.timed_command(str(self.python["msprobe"].parent / "msprobe"), "compare",
                                                  "-tp", str(out / "tensor-bf16" / "step0"),
                                                  "-gp", str(out / "tensor" / "step0"),
                                                  "-o", str(out / "msprobe-compare")),
        }
        return {"prompt_len": prompt_len, "out": out,
                "capture": {name: {"seconds": statistics.median(r["seconds"] for r in rs),
                                   "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
                            for name, rs in results.items()},
                "compare": compares}


def disk_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def layer_output_bytes(model: Path, prompt_len: int, new_tokens: int, itemsize: int) -> int:
    """Both tools record each decoder layer's output at every fed position: the prompt, then
    each generated token but the last."""
    config = json.loads((model / "config.json").read_text())
    return config["num_hidden_layers"] * (prompt_len + new_tokens - 1) * config["hidden_size"] * itemsize


def print_length(result: dict, model: Path, new_tokens: int, repeats: int, cores: int) -> None:
    prompt_len, out, cap = result["prompt_len"], result["out"], result["capture"]
    fp32 = layer_output_bytes(model, prompt_len, new_tokens, 4)
    print(f"\n## prompt {prompt_len} tokens, {new_tokens} new tokens: decoder-layer outputs "
          f"{fp32 / 2**20:.1f} MiB in float32 (median of {repeats})")
    print(f"{'capture':28} {'seconds':>8} {'vs plain':>9} {'peak RSS':>9} {'on disk':>11}")
    on_disk = {"ptrace stats": out / "stats.zarr", "ptrace full": out / "full.zarr",
               "msprobe statistics": out / "statistics", "msprobe tensor": out / "tensor"}
    for name, r in cap.items():
        plain = cap["plain, ptrace env" if name.startswith(("ptrace", "plain, ptrace")) else "plain, msprobe env"]
        size = f"{disk_mib(on_disk[name]):8.2f}MiB" if name in on_disk else ""
        print(f"{name:28} {r['seconds']:8.2f} {r['seconds'] / plain['seconds']:8.2f}x "
              f"{r['peak_rss_mib']:6.0f}MiB {size:>11}")
    volume = fp32 + fp32 // 2
    print(f"{'compare fp32 vs bf16':28} {'seconds':>8} {'MB/s':>9} {'MB/s/core':>9} {'peak RSS':>10}")
    for name, r in result["compare"].items():
        rate = volume / r["seconds"] / 1e6
        print(f"{name:28} {r['seconds']:8.2f} {rate:9.1f} {rate / cores:9.1f} {r['peak_rss_mib']:7.0f}MiB")


def print_growth(results: list[dict]) -> None:
    names = [*results[0]["capture"], *results[0]["compare"]]
    print("\n## growth with the prompt length (seconds)")
    print(f"{'prompt tokens':28}" + "".join(f"{r['prompt_len']:>9}" for r in results))
    for name in names:
        row = [r["capture"].get(name) or r["compare"][name] for r in results]
        print(f"{name:28}" + "".join(f"{x['seconds']:9.2f}" for x in row))


def print_startup(bench: Bench) -> None:
    """``ptrace --help`` and ``ptrace compare`` of two tiny bundles, layer by layer
    (``bench_startup.py``), beside msprobe's ``--help``."""
    msprobe = str(bench.python["msprobe"].parent / "msprobe")
    bench_startup.print_startup(bench.scratch, 3, extra={"msprobe --help": (msprobe, "--help")})


def _write_prompt(scratch: Path, prompt_len: int) -> Path:
    path = scratch / "warm-up.json"
    path.write_text(json.dumps(list(range(100, 100 + prompt_len))))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--msprobe-python", type=Path, default=ROOT / ".venvs" / "msprobe" / "bin" / "python",
                        help="the Python of the environment with mindstudio-probe (make bench makes it)")
    parser.add_argument("--repeats", type=int, default=1, help="timed captures per tool and length")
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 1024 2048 4096 8192)")
    parser.add_argument("--quick", action="store_true", help="a small model and short prompts (smoke test)")
    args = parser.parse_args()
    if not args.msprobe_python.is_file():
        raise SystemExit(f"{args.msprobe_python} does not exist: `make bench` creates the msprobe environment")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ptrace-bench-msprobe-") as tmp:
        scratch = Path(tmp)
        if args.quick:
            model = make_large_model(scratch / "model", EXAMPLE, layers=2, hidden=256, vocab=8000)
            lengths, new_tokens = args.lengths or [128, 256, 512], 8
        else:
            model = make_large_model(scratch / "model", EXAMPLE)
            lengths, new_tokens = args.lengths or [1024, 2048, 4096, 8192], 20
        # absolute (runs happen in other directories), not resolved (a venv's python is a link)
        bench = Bench(Path(os.path.abspath(args.msprobe_python)), model, scratch, new_tokens, args.repeats)
        version = subprocess.run([str(args.msprobe_python), "-c", "from importlib.metadata import version as v; "
                                  "print('mindstudio-probe', v('mindstudio-probe'), 'torch', v('torch'), "
                                  "'transformers', v('transformers'))"], capture_output=True, text=True).stdout
        print(f"{time.strftime('%Y-%m-%d')}, {cores} cores; msprobe environment: {version.strip()}")
        print(f"model: {json.loads((model / 'config.json').read_text())['num_hidden_layers']} layers, random "
              "Qwen2; every run a fresh process, imports not timed")
        for env in ("ptrace", "msprobe"):  # warm-up: page cache for the weights, compiled bytecode
            bench.run_tool(env, "plain", _write_prompt(scratch, lengths[0]), "float32")
        results = []
        for prompt_len in lengths:
            results.append(bench.length(prompt_len))
            print_length(results[-1], model, new_tokens, args.repeats, cores)
        print_growth(results)
        print_startup(bench)


if __name__ == "__main__":
    main()
