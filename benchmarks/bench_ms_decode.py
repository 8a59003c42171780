"""What does the MindSpore backend cost against torch on the same run? Issue #14 item 4.

A random-init Llama shaped like SmolLM-135M (30 layers, hidden 576, 9 heads, 3 KV heads,
vocabulary 49152, tied embeddings), a 40-token prompt and 32 greedy new tokens, with the logits
and every layer's output observed: the time of ``generate`` alone (model loaded), wall and CPU,
for the torch backend and the ms backend in one process. Target: ms <= 2x torch.

Run it in the ms environment (it has torch and transformers too):

    .venvs/ms/bin/python benchmarks/bench_ms_decode.py [--new-tokens 32] [--dtypes float32,float16]

The backend runs PyNative synchronously on CPU (``pynative_synchronize``): measured on 26
November 2026 on the 2-core machine, generate took 5.5 s so, against 76 s with PyNative's
asynchronous executor, which hands every op to another thread, torch 1.9 s, tokens identical.
"""

from __future__ import annotations

import argparse
import shutil
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


def timed_generate(backend: str, model: Path, dtype: str, prompt: np.ndarray,
                   new_tokens: int) -> tuple[float, float, list[int]]:
    from ptrace.backends.base import LoadOptions
    from ptrace.backends.registry import create_backend
    from ptrace.bundle_spec.schema import SamplingParams
    from ptrace.testing.conformance import Keep

    engine = create_backend(backend)
    try:
        engine.load(LoadOptions(model, dtype=dtype))
        keep = Keep({"logits", *(f"layers.{i}.out" for i in range(30))})
        wall, cpu = time.perf_counter(), time.process_time()
        out = engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, logprobs=20), [keep])[0]
        return time.perf_counter() - wall, time.process_time() - cpu, out.output_ids.tolist()
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: build the random one)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32")
    args = parser.parse_args()
    prompt = np.random.default_rng(1).integers(100, 2000, 40)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or make_model(Path(scratch) / "model")
        print(f"{'backend':8} {'dtype':8} {'wall s':>8} {'cpu s':>8}  (generate alone, {args.new_tokens} new tokens)")
        for dtype in args.dtypes.split(","):
            results = {}
            for backend in ("torch", "ms"):
                results[backend] = timed_generate(backend, model, dtype, prompt, args.new_tokens)
                wall, cpu, _ = results[backend]
                print(f"{backend:8} {dtype:8} {wall:8.1f} {cpu:8.1f}")
            same = results["ms"][2] == results["torch"][2]
            print(f"ms / torch: {results['ms'][0] / results['torch'][0]:.1f}x wall (target <= 2x); "
                  f"tokens {'identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
