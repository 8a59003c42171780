"""What does the MindSpore backend cost against torch on the same run?

A random-init Llama shaped like SmolLM-135M (30 layers, hidden 576, 9 heads, 3 KV heads,
vocabulary 49152, tied embeddings), a 40-token prompt and 32 greedy new tokens, with the logits
and every layer's output observed: the time of ``generate`` alone (model loaded), wall and CPU,
for the torch backend and the ms backend in one process. Target: ms <= 2x torch.

Run it in the ms environment (it has torch and transformers too):

    .venvs/ms/bin/python benchmarks/bench_ms_decode.py [--new-tokens 32] [--dtypes float32,float16] [--repeat 3]

Both models stay loaded and the two backends take turns, ``--repeat`` times each: on a shared
machine the fastest of each is the fairest ratio (the median is printed too). ``--threads N``
gives both engines N intra-op threads (default: each engine's own choice, 2 on 2 cores).

The backend runs PyNative synchronously on CPU (``pynative_synchronize``): measured on 26
November 2026 on the 2-core machine, generate took 5.5 s so, against 76 s with PyNative's
asynchronous executor, which hands every op to another thread, torch 1.9 s, tokens identical.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-qwen2"


def make_model(directory: Path) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # prompts are token ids: any tokenizer loads
        shutil.copy(EXAMPLE / name, directory / name)
    return directory


def timed_generate(engine, prompt: np.ndarray, new_tokens: int) -> tuple[float, float, list[int]]:
    from ptrace.bundle_spec.schema import SamplingParams
    from ptrace.testing.conformance import Keep

    keep = Keep({"logits", *(f"layers.{i}.out" for i in range(30))})
    wall, cpu = time.perf_counter(), time.process_time()
    out = engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, logprobs=20), [keep])[0]
    return time.perf_counter() - wall, time.process_time() - cpu, out.output_ids.tolist()


def compare(model: Path, dtype: str, prompt: np.ndarray, new_tokens: int, repeat: int) -> None:
    from ptrace.backends.base import LoadOptions
    from ptrace.backends.registry import create_backend

    engines = {name: create_backend(name) for name in ("torch", "ms")}
    for engine in engines.values():
        engine.load(LoadOptions(model, dtype=dtype))
    runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in engines}
    for _ in range(repeat):
        for name, engine in engines.items():
            runs[name].append(timed_generate(engine, prompt, new_tokens))
    for engine in engines.values():
        engine.close()
    for name, timings in runs.items():
        walls = sorted(wall for wall, _, _ in timings)
        print(f"{name:8} {dtype:8} {walls[0]:8.1f} {statistics.median(walls):8.1f} "
              f"{min(cpu for _, cpu, _ in timings):8.1f}")
    fastest = {name: min(wall for wall, _, _ in timings) for name, timings in runs.items()}
    same = all(run[2] == runs["torch"][0][2] for run in runs["ms"])
    print(f"ms / torch: {fastest['ms'] / fastest['torch']:.1f}x wall, fastest of {repeat} each "
          f"(target <= 2x); tokens {'identical' if same else 'differ'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: build the random one)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--repeat", type=int, default=3, help="timed generates per backend, taking turns")
    parser.add_argument("--threads", type=int, help="intra-op threads of both engines (default: theirs)")
    args = parser.parse_args()
    if args.threads:
        import mindspore
        import torch

        torch.set_num_threads(args.threads)
        mindspore.set_context(runtime_num_threads=args.threads)  # before the backend sets the device
    prompt = np.random.default_rng(1).integers(100, 2000, 40)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or make_model(Path(scratch) / "model")
        print(f"{'backend':8} {'dtype':8} {'wall s':>8} {'median':>8} {'cpu s':>8}  "
              f"(generate alone, {args.new_tokens} new tokens; fastest, median wall, fastest cpu)")
        for dtype in args.dtypes.split(","):
            compare(model, dtype, prompt, args.new_tokens, args.repeat)


if __name__ == "__main__":
    main()
