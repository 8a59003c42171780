"""What does capturing a tensor-parallel vLLM run cost? Side by side on one started engine.

One vLLM engine at ``tensor_parallel_size=2`` (the example model, float32; its start-up, a minute
or more on a small machine, is the same with or without ptrace and is not timed), then, in
turns:

- plain:   ``LLM.generate`` with vLLM's own sampling parameters: no ptrace hooks at all;
- capture: ptrace's ``generate`` with every canonical tensor recorded in full into a bundle: the
           hooks in both ranks, each step's rows drained to the driver, unsharded, checked
           across replicas and written (``BundleWriter``: chunked, compressed, checksummed).

Both run the same prompts (random ids) and greedy new tokens. Runs are interleaved and repeated;
the median wall time is reported with the ratio. Run it in the vLLM environment:

    .venvs/vllm/bin/python benchmarks/bench_tp.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ptrace.backends.base import LoadOptions
from ptrace.backends.registry import create_backend
from ptrace.bundle_spec import BundleWriter
from ptrace.bundle_spec.names import all_names
from ptrace.bundle_spec.schema import SamplingParams
from ptrace.capture.recorder import StepSelection, TensorRecorder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-qwen2"


def plain(backend, prompts: list[np.ndarray], new_tokens: int) -> None:
    from vllm import SamplingParams as VllmSampling
    from vllm.inputs import TokensPrompt

    params = VllmSampling(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                          detokenize=False)
    backend.llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params, use_tqdm=False)


def captured(backend, prompts: list[np.ndarray], new_tokens: int, out: Path) -> int:
    """Record every tensor into a bundle; its size in bytes."""
    names = all_names(backend.num_layers, backend.moe_layers)
    with BundleWriter(out, overwrite=True) as writer:
        recorder = TensorRecorder(writer, names, "full", StepSelection.parse(None))
        backend.generate(prompts, SamplingParams(max_new_tokens=new_tokens, logprobs=0, prompt_logprobs=False),
                         [recorder])
        writer.commit(ptrace_version="bench", command=["bench"], mode="full", tensor_names=names)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="shorter prompts and runs")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    prompt_len, new_tokens = (32, 8) if args.quick else (256, 32)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(100, 2000, prompt_len) for _ in range(2)]
    backend = create_backend("vllm")
    started = time.perf_counter()
    backend.load(LoadOptions(EXAMPLE, "float32", "cpu", {"tensor_parallel_size": "2"}))
    print(f"engine start (TP=2, not timed below): {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {"plain": [], "capture": []}
    size = 0
    try:
        with tempfile.TemporaryDirectory() as scratch:
            plain(backend, prompts, new_tokens)  # warm-up
            for _ in range(args.repeats):
                wall = time.perf_counter()
                plain(backend, prompts, new_tokens)
                times["plain"].append(time.perf_counter() - wall)
                wall = time.perf_counter()
                size = captured(backend, prompts, new_tokens, Path(scratch) / "tp2.zarr")
                times["capture"].append(time.perf_counter() - wall)
    finally:
        backend.close()
    base, full = statistics.median(times["plain"]), statistics.median(times["capture"])
    print(f"tiny-qwen2 at TP=2, 2 requests x {prompt_len} prompt + {new_tokens} new tokens, "
          f"median of {args.repeats}:")
    print(f"  plain generate:        {base:7.3f} s")
    print(f"  capture, every tensor: {full:7.3f} s  ({full / base:.2f}x plain; bundle {size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
