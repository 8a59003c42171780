"""Synthetic bundles, written with ``BundleWriter`` directly: no engine, exact situations.

What reads bundles (compare, the report) is tested here on cases a real engine makes only by
chance: a free-running run that flips a token at a chosen step, a teacher-forced run, runs that
captured different positions, a batch where one request differs.

The tensors come from a toy causal model, so they behave like a real model's activations: the
row at position ``p`` depends only on the tokens fed at positions ``0..p``. Two bundles fed the
same prefix hold identical rows there, and the rows part where the fed tokens part. The "weights"
(a fixed embedding table) are the same in every bundle; ``noise`` perturbs one bundle's
tensors, as another dtype or engine would.

It needs only numpy, ml_dtypes and ``ptrace.bundle_spec``: tools that read bundles can test with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ptrace.backends.decoding import log_softmax
from ptrace.bundle_spec import (
    BundleWriter,
    EnvironmentInfo,
    ModelInfo,
    RequestRecord,
    RequestsInfo,
    RunInfo,
    SamplingParams,
)
from ptrace.bundle_spec.layout import request_array, stats_array, tensor_array
from ptrace.bundle_spec.stats import row_stats
from ptrace.errors import UsageError

VOCAB, HIDDEN, TOPK = 32, 8, 4
LAYERS = 2
#: Every tensor the toy model has, in forward order.
TENSORS = ("embed", *(f"layers.{i}.out" for i in range(LAYERS)), "logits")
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


@dataclass(frozen=True)
class SyntheticRequest:
    """One request: its prompt and generated tokens (ids below ``VOCAB``).

    ``fed``: the tokens fed after the prompt when they are not the request's own outputs (a
    teacher-forced run is fed the reference's: ``len(outputs) - 1`` of them). ``positions``:
    the captured positions (default: every position fed, ``0 .. len(prompt) + len(outputs) - 2``).
    ``text``: the prompt's text, where the run had one.
    """

    prompt: Sequence[int]
    outputs: Sequence[int]
    fed: Sequence[int] | None = None
    positions: Sequence[int] | None = None
    text: str | None = None

    @property
    def fed_tokens(self) -> np.ndarray:
        after = self.outputs[:-1] if self.fed is None else self.fed
        return np.asarray([*self.prompt, *after], np.int64)


def toy_forward(fed: np.ndarray, hidden_size: int = HIDDEN) -> dict[str, np.ndarray]:
    """Every tensor of the toy model at every fed position (float64, ``[positions, ...]``)."""
    table = np.random.default_rng(1234).standard_normal((VOCAB, hidden_size))
    hidden = table[fed]
    out = {"embed": hidden}
    for i in range(LAYERS):  # a causal mix: the running mean of the positions so far, then a nonlinearity
        hidden = np.tanh(np.cumsum(hidden, axis=0) / np.arange(1, len(fed) + 1)[:, None] * (i + 2))
        out[f"layers.{i}.out"] = hidden
    out["logits"] = hidden @ table.T * 3
    return out


def write_bundle(path: str | Path, requests: Sequence[SyntheticRequest], *, tensors: Sequence[str] = TENSORS,
                 mode: str = "full", dtype: str = "float32", backend: str = "synthetic",
                 noise: float = 0.0, seed: int = 0, hidden_size: int = HIDDEN) -> Path:
    """Write a complete, valid bundle of ``requests``; ``noise`` is a relative Gaussian error
    added to every tensor (the top-k logprobs follow the noisy logits); ``hidden_size`` other
    than the default makes another model architecture."""
    rng = np.random.default_rng(seed)
    storage = _DTYPES[dtype]
    records = []
    with BundleWriter(path) as writer:
        for index, request in enumerate(requests):
            fed = request.fed_tokens
            if len(fed) != len(request.prompt) + len(request.outputs) - 1:
                raise UsageError(f"request {index}: fed {len(fed) - len(request.prompt)} tokens after the "
                                 f"prompt for {len(request.outputs)} outputs (needs one fewer)")
            values = toy_forward(fed, hidden_size)
            if noise:
                values = {name: v + rng.standard_normal(v.shape) * noise * np.abs(v).mean()
                          for name, v in values.items()}
            positions = np.arange(len(fed)) if request.positions is None else np.asarray(request.positions)
            for name in tensors:
                rows = values[name][positions].astype(storage)
                writer.append(stats_array(name), index, row_stats(rows))
                if mode == "full":
                    writer.append(tensor_array(name), index, rows)
            # the logits row at position P - 1 + s predicts token s
            decode = log_softmax(values["logits"][len(request.prompt) - 1:])
            top = np.argsort(-decode, axis=1, kind="stable")[:, :TOPK]
            writer.append(request_array("prompt_ids"), index, np.asarray(request.prompt, np.int64))
            writer.append(request_array("output_ids"), index, np.asarray(request.outputs, np.int64))
            writer.append(request_array("topk_ids"), index, top.astype(np.int64))
            writer.append(request_array("topk_logprobs"), index,
                          np.take_along_axis(decode, top, 1).astype(np.float32))
            writer.append(request_array("positions"), index, positions.astype(np.int64))
            if request.fed is not None:
                writer.append(request_array("input_ids"), index, fed)
            records.append(RequestRecord(index=index, prompt=request.text, prompt_len=len(request.prompt),
                                         output_len=len(request.outputs),
                                         output_tokens=tuple(f"t{t}" for t in request.outputs)))
        writer.write_document(ModelInfo(model_path="toy", name="toy", architecture="Toy",
                                        config={"num_hidden_layers": LAYERS}, weights={}, tokenizer={},
                                        fingerprint="toy-weights", tokenizer_fingerprint="toy-tokenizer"))
        writer.write_document(RunInfo(backend=backend, backend_version="0", dtype=dtype, device="cpu",
                                      seeds={"python": seed}, sampling=SamplingParams(logprobs=TOPK),
                                      capture={"tensors": list(tensors)}))
        writer.write_document(EnvironmentInfo(python={}, os={}, hardware={}, packages={}, env={}))
        writer.write_document(RequestsInfo(tuple(records)))
        return writer.commit(ptrace_version="synthetic", command=["synthetic", str(path)], mode=mode,
                             tensor_names=list(tensors))
