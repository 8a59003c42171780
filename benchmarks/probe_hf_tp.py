"""Does HF transformers run a model tensor-parallel on CPU, and how close is it to TP=1?

ptrace's reference engine (``--backend torch``) runs a model in one process. This probe checks
whether the same transformers can run it tensor-parallel the way its documentation says
(``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`` in every rank of
a ``torch.distributed`` job), here on CPU with the gloo backend, one process per rank spawned by
``torch.multiprocessing`` (``torchrun`` sets the same RANK / WORLD_SIZE variables). It then holds
the TP=N run against a TP=1 run of the same model in float32:

* greedy tokens (``generate``, ``--new-tokens``) identical or not;
* the final logits (one forward pass over prompt + generated tokens), max abs difference;
* what a forward hook sees in a TP=N run, the facts a capture under TP would rest on: which
  module outputs are whole on every rank (after transformers' all-reduce, and whether the ranks
  agree bit for bit) and which are each rank's shard (the q/k/v projections: their shards,
  concatenated in rank order, against the TP=1 projection).

``--heads H --kv-heads K`` builds a random Qwen2 with those head counts in a temporary directory
instead of loading ``--model``: the way to see what transformers does when the TP size does not
divide the heads.

It prints what it measured and a last line starting ``result:``; it exits 0 whatever it finds
(a failure of transformers is a finding), and 2 on bad arguments.

    python benchmarks/probe_hf_tp.py [--model examples/tiny-qwen2 | --heads 4 --kv-heads 1]
                                     [--tp 2] [--new-tokens 16]

transformers needs ``accelerate`` for any tensor-parallel plan.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: The modules of the first decoder layer whose outputs the probe records in every run.
PROBED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn", "mlp")
#: Of those, the projections transformers shards by output column (each rank holds its heads).
SHARDED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
PROMPT_LENGTH = 8


def _random_qwen2(heads: int, kv_heads: int, directory: Path) -> Path:
    """A random 2-layer Qwen2 with these head counts (head_dim 32), saved for from_pretrained."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=4096, hidden_size=32 * heads, intermediate_size=96 * heads,
                                      num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def _run(model_dir: Path, tp_size: int, new_tokens: int) -> dict[str, Any]:
    """Load, generate greedily, then one forward pass over the whole sequence with hooks on
    :data:`PROBED`; in a TP run every rank calls this, in the same order."""
    import torch
    import transformers

    extra = {}
    if tp_size > 1:
        from transformers.distributed import DistributedConfig

        extra["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tp_size)
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra).eval()
    load_s = time.perf_counter() - started
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(17 + 97 * i) % vocab for i in range(PROMPT_LENGTH)]])
    outputs: dict[str, np.ndarray] = {}
    layer = model.model.layers[0]
    for name in PROBED:
        def keep(_module: Any, _args: Any, output: Any, name: str = name) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            outputs[name] = tensor[0].detach().float().numpy().copy()
        layer.get_submodule(name).register_forward_hook(keep)
    with torch.inference_mode():
        started = time.perf_counter()
        sequence = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        generate_s = time.perf_counter() - started
        logits = model(sequence).logits[0].float().numpy()
    return {"tokens": sequence[0, PROMPT_LENGTH:].tolist(), "logits": logits, "outputs": outputs,
            "load_s": load_s, "generate_s": generate_s}


def _rank(rank: int, tp_size: int, port: int, model_dir: Path, new_tokens: int, out_dir: Path) -> None:
    """One rank of the TP job: its result (or its error, one line) in ``out_dir/rank{rank}.pt``."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(tp_size))
    torch.set_num_threads(1)  # one core per rank, as vLLM binds its CPU workers
    try:
        dist.init_process_group("gloo", rank=rank, world_size=tp_size)
        result = _run(model_dir, tp_size, new_tokens)
    except Exception as exc:  # the probe reports it: transformers failing is a finding
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, out_dir / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(model_dir: Path, tp_size: int, new_tokens: int, out_dir: Path) -> list[dict[str, Any]]:
    import torch
    import torch.multiprocessing as mp

    try:
        mp.spawn(_rank, args=(tp_size, _free_port(), model_dir, new_tokens, out_dir), nprocs=tp_size)
    except Exception as exc:  # a rank that died without writing its result
        print(f"a rank died: {str(exc).strip().splitlines()[-1]}")
    found = [out_dir / f"rank{rank}.pt" for rank in range(tp_size)]
    return [torch.load(path, weights_only=False) if path.exists() else {"error": "no result (killed)"}
            for path in found]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _compare(reference: dict[str, Any], ranks: list[dict[str, Any]], tp_size: int) -> str:
    """Print what differs between the TP=N run (``ranks``) and TP=1; return the result line."""
    first = ranks[0]
    print(f"TP={tp_size}: load {first['load_s']:.2f} s, generate {first['generate_s']:.2f} s, "
          f"tokens {first['tokens']}")
    for name in PROBED:
        widths = [rank["outputs"][name].shape[-1] for rank in ranks]
        if name in SHARDED:
            whole = np.concatenate([rank["outputs"][name] for rank in ranks], axis=-1)
            print(f"  layers.0.{name}: each rank holds {widths} of {reference['outputs'][name].shape[-1]} "
                  f"columns; concatenated in rank order vs TP=1: max abs diff "
                  f"{_max_diff(whole, reference['outputs'][name]):.3g}")
        else:
            agree = all(np.array_equal(rank["outputs"][name], first["outputs"][name]) for rank in ranks)
            print(f"  layers.0.{name}: whole on every rank ({widths[0]} columns), ranks bit-identical: {agree}; "
                  f"vs TP=1: max abs diff {_max_diff(first['outputs'][name], reference['outputs'][name]):.3g}")
    same = first["tokens"] == reference["tokens"]
    diff = _max_diff(first["logits"], reference["logits"])
    where = "" if same else f" (first difference at generated token {_first_difference(first, reference)})"
    return (f"result: runs: TP={tp_size} greedy tokens {'identical to' if same else 'differ from'} TP=1{where}, "
            f"final logits max abs diff {diff:.3g} over {first['logits'].shape[0]} positions (float32)")


def _first_difference(run: dict[str, Any], reference: dict[str, Any]) -> int:
    return next(i for i, (a, b) in enumerate(zip(run["tokens"], reference["tokens"], strict=False)) if a != b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "tiny-qwen2")
    parser.add_argument("--heads", type=int, help="build a random Qwen2 with this many attention heads")
    parser.add_argument("--kv-heads", type=int, help="... and this many KV heads (default: --heads)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (ranks)")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.tp < 2 or args.new_tokens < 1:
        print("probe_hf_tp: --tp must be 2 or more and --new-tokens 1 or more", file=sys.stderr)
        return 2
    if args.heads is None and not (args.model / "config.json").is_file():
        print(f"probe_hf_tp: {args.model} has no config.json: pass a model directory with --model", file=sys.stderr)
        return 2
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"accelerate {_version('accelerate')}, {os.cpu_count()} CPUs")
    if importlib.util.find_spec("accelerate") is None:
        print("result: not run: transformers refuses any tp_plan without accelerate (pip install accelerate)")
        return 0
    with tempfile.TemporaryDirectory(prefix="probe_hf_tp_") as tmp:
        model_dir = args.model
        if args.heads is not None:
            model_dir = _random_qwen2(args.heads, args.kv_heads or args.heads, Path(tmp) / "model")
        config = transformers.AutoConfig.from_pretrained(model_dir)
        print(f"model {model_dir if args.heads is None else 'random Qwen2'}: {config.num_attention_heads} heads, "
              f"{config.num_key_value_heads} KV heads, TP={args.tp}")
        reference = _run(model_dir, 1, args.new_tokens)
        print(f"TP=1: load {reference['load_s']:.2f} s, generate {reference['generate_s']:.2f} s "
              f"({torch.get_num_threads()} threads), tokens {reference['tokens']}")
        ranks = _spawn(model_dir, args.tp, args.new_tokens, Path(tmp))
    errors = [f"rank {rank}: {result['error']}" for rank, result in enumerate(ranks) if "error" in result]
    if errors:
        for rank, result in enumerate(ranks):
            if "traceback" in result:
                print(f"rank {rank}'s traceback:\n{result['traceback']}")
        print(f"result: fails: {errors[0]}")
        return 0
    print(_compare(reference, ranks, args.tp))
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
