"""What does capturing cost? Ratios measured side by side, in one run, on this machine.

For each model (the shipped example, and a larger random Qwen2: hidden 1024, 8 layers, vocab
32000, a 2048-token prompt), and 20 greedy new tokens:

- plain:        load the model with HF transformers and ``generate`` (no ptrace at all);
- stats / full: ``ptrace.capture`` end to end (fingerprint, load, generate, record, commit) in
                ``--mode stats`` and ``--mode full`` with the default tensors (every layer
                output, and the logits from the last prompt position on), in stats mode with
                layer outputs only, and in stats mode with ``--prompt-logprobs`` (the LM head
                over every prompt position, what the default was before November 2026);
- np.save:      writing the full capture's tensors with ``numpy.save`` (uncompressed, no checksum);
- writer:       writing the same tensors, streamed step by step as a capture does, with
                ``BundleWriter`` (chunked, compressed, checksummed).

Targets: stats <= 1.05x plain; full <= 1.2x (plain + np.save), with a bundle no
larger than the .npy files.
Runs are interleaved and repeated; the median wall time is reported, and the median CPU time of
this process beside it (steadier where other work shares the machine).

    python benchmarks/bench_capture.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

from ptrace.bundle_spec import BundleWriter, open_bundle
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-qwen2"
NEW_TOKENS = 20


def make_large_model(directory: Path, tokenizer_from: Path, *, layers: int = 8, hidden: int = 1024,
                     vocab: int = 32000) -> Path:
    config = transformers.Qwen2Config(
        hidden_size=hidden, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=layers,
        intermediate_size=hidden * 11 // 4, vocab_size=vocab, max_position_embeddings=32768,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, directory / name)
    return directory


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (every thread of this process): on a machine shared with other work
    the CPU time is the steadier of the two."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def plain_generate(model_dir: Path, prompt: np.ndarray) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        model.generate(torch.as_tensor(prompt)[None], max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False)


def run_capture(model_dir: Path, prompt_len: int, out: Path, mode: str, tensors: tuple[str, ...],
                prompt_logprobs: bool = False) -> None:
    capture(CaptureConfig(backend="torch", model=model_dir, output=out, random_input_ids=prompt_len, overwrite=True, command=("bench",), sampling=SamplingParams(seed=42, max_new_tokens=NEW_TOKENS, prompt_logprobs=prompt_logprobs), settings=CaptureSettings(mode=mode, tensors=tensors)))


def captured_tensors(bundle_path: Path) -> tuple[dict[str, np.ndarray], int]:
    with open_bundle(bundle_path) as bundle:
        prompt_len = bundle.requests.requests[0].prompt_len
        return {name: bundle.tensor(0, name) for name in bundle.tensor_names}, prompt_len


def write_numpy(tensors: dict[str, np.ndarray], directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    for name, array in tensors.items():
        np.save(directory / f"{name}.npy", array)


def write_bundle(tensors: dict[str, np.ndarray], prompt_len: int, path: Path) -> None:
    """Stream like a capture does: the prefill rows at once, then one row per decode step."""
    with BundleWriter(path, overwrite=True) as writer:
        rows = next(iter(tensors.values())).shape[0]
        bounds = [0, prompt_len, *range(prompt_len + 1, rows + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            for name, array in tensors.items():
                writer.append(f"tensors/{name}", 0, array[start:stop])
        writer.commit(ptrace_version="bench", command=["bench"], mode="full", tensor_names=list(tensors))


def bench_model(label: str, model_dir: Path, prompt_len: int, repeats: int, scratch: Path) -> None:
    prompt = np.random.RandomState(42).randint(100, 2000, size=prompt_len).astype(np.int64)
    default = ("layers.*.out", "logits")
    runs: dict[str, Callable[[], object]] = {
        "plain": lambda: plain_generate(model_dir, prompt),
        "stats": lambda: run_capture(model_dir, prompt_len, scratch / "stats.zarr", "stats", default),
        "stats (layers only)": lambda: run_capture(
            model_dir, prompt_len, scratch / "stats-layers.zarr", "stats", ("layers.*.out",)),
        "stats --prompt-logprobs": lambda: run_capture(
            model_dir, prompt_len, scratch / "stats-prompt.zarr", "stats", default, True),
        "full": lambda: run_capture(model_dir, prompt_len, scratch / "full.zarr", "full", default),
    }
    plain_generate(model_dir, prompt)  # warm-up: page cache, lazy imports, allocator
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    tensors, captured_prompt = captured_tensors(scratch / "full.zarr")
    volume = sum(a.nbytes for a in tensors.values())
    times["np.save"] = [timed(lambda: write_numpy(tensors, scratch / "npy")) for _ in range(repeats)]
    times["writer"] = [timed(lambda: write_bundle(tensors, captured_prompt, scratch / "w.zarr"))
                       for _ in range(repeats)]
    med = {name: statistics.median(wall for wall, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(used for _, used in values) for name, values in times.items()}

    print(f"\n## {label}: prompt {prompt_len} tokens, {NEW_TOKENS} new tokens, "
          f"full-mode tensors {volume / 2**20:.1f} MiB, median of {repeats}")
    print(f"{'run':44} {'seconds':>8}  {'ratio':>6}  {'cpu s':>8}  {'ratio':>6}")
    print(f"{'plain HF generate':44} {med['plain']:8.2f}  {1:5.2f}x  {cpu['plain']:8.2f}  {1:5.2f}x")
    for name in ("stats", "stats (layers only)", "stats --prompt-logprobs"):
        target = "  plain (target <= 1.05x)" if name == "stats" else "  plain"
        print(f"{'capture --mode ' + name:44} {med[name]:8.2f}  {med[name] / med['plain']:5.2f}x  "
              f"{cpu[name]:8.2f}  {cpu[name] / cpu['plain']:5.2f}x{target}")
    print(f"{'capture --mode full':44} {med['full']:8.2f}  {med['full'] / (med['plain'] + med['np.save']):5.2f}x  "
          f"{cpu['full']:8.2f}  {cpu['full'] / (cpu['plain'] + cpu['np.save']):5.2f}x"
          "  (plain + np.save) (target <= 1.20x)")
    print(f"{'np.save of the full-mode tensors':44} {med['np.save']:8.2f}  "
          f"{volume / med['np.save'] / 2**30:.2f} GiB/s")
    print(f"{'BundleWriter of the same tensors':44} {med['writer']:8.2f}  "
          f"{med['writer'] / med['np.save']:.2f}x np.save, {volume / med['writer'] / 2**30:.2f} GiB/s")
    for name in ("stats", "full"):
        size = sum(p.stat().st_size for p in (scratch / f"{name}.zarr").rglob("*") if p.is_file())
        print(f"{'bundle size, ' + name + ' mode':44} {size / 2**20:8.1f} MiB")
    npy = sum(p.stat().st_size for p in (scratch / "npy").glob("*.npy"))
    print(f"{'.npy files of the full-mode tensors':44} {npy / 2**20:8.1f} MiB  (target: full bundle <= this)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smaller 'large' model (smoke test)")
    parser.add_argument("--example", type=Path, default=EXAMPLE, help="the small model to measure")
    parser.add_argument("--large-only", action="store_true", help="skip the small model")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="ptrace-bench-") as tmp:
        scratch = Path(tmp)
        if not args.large_only:
            bench_model(f"example model ({args.example.name})", args.example, 128, args.repeats, scratch)
        if args.quick:
            large = make_large_model(scratch / "large", args.example, layers=2, hidden=256, vocab=8000)
            bench_model("smaller random model (--quick)", large, 256, args.repeats, scratch)
        else:
            large = make_large_model(scratch / "large", args.example)
            bench_model("large random Qwen2 (hidden 1024, 8 layers, vocab 32000)", large, 2048,
                        args.repeats, scratch)


if __name__ == "__main__":
    main()
