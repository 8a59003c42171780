"""The host-side decoding arithmetic every sequential engine shares (no engine needed)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ptrace.backends import decoding
from ptrace.bundle_spec.schema import SamplingParams


def _reference_log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("values", ["distinct", "ties", "nan"])
def test_top_k_is_the_head_of_a_stable_descending_sort(values):
    """Largest first, equal values in id order, whatever the row holds."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        width, k = int(rng.integers(1, 600)), int(rng.integers(0, 40))
        if values == "distinct":
            rows = rng.standard_normal((3, width)).astype(np.float32)
        else:  # few distinct values: ties at the k-th value in most rows
            rows = rng.integers(-3, 3, (3, width)).astype(np.float32)
        if values == "nan":
            rows[rng.random(rows.shape) < 0.2] = np.nan
        expected = np.argsort(-rows, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(decoding.top_k(rows, k), expected)
        np.testing.assert_array_equal(decoding.top_k(rows[0], k), expected[0])


def test_prompt_logprobs_agree_with_a_float64_log_softmax(monkeypatch):
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 1000, 40)
    logits = (rng.standard_normal((39, 1000)) * 4).astype(np.float32)
    reference = _reference_log_softmax(logits)
    whole = decoding.prompt_logprobs(logits, prompt, 5)
    monkeypatch.setattr(decoding, "BLOCK_ELEMENTS", 7 * 1000)  # blocks of 7 rows, the last one short
    blocked = decoding.prompt_logprobs(logits, prompt, 5)
    for a, b in zip(whole, blocked, strict=True):
        np.testing.assert_array_equal(a, b)
    token_lp, top_ids, top_lps = whole
    assert np.isnan(token_lp[0]) and (top_ids[0] == -1).all() and np.isnan(top_lps[0]).all()
    np.testing.assert_allclose(token_lp[1:], reference[np.arange(39), prompt[1:]], atol=1e-5)
    np.testing.assert_array_equal(top_ids[1:], np.argsort(-reference, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(top_lps[1:], np.take_along_axis(reference, top_ids[1:], 1), atol=1e-5)


def test_prompt_logprobs_never_hold_the_whole_prompt_at_once(monkeypatch):
    """A long prompt over a large vocabulary must not need [prompt, vocab] temporaries."""
    logits = np.random.default_rng(2).standard_normal((512, 4096)).astype(np.float32)  # 8 MiB
    monkeypatch.setattr(decoding, "BLOCK_ELEMENTS", 16 * 4096)  # 256 KiB per float32 temporary
    tracemalloc.start()
    decoding.prompt_logprobs(logits, np.zeros(513, np.int64), 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < logits.nbytes / 4, f"peak {peak / 2**20:.1f} MiB for {logits.nbytes / 2**20:.0f} MiB of logits"


def test_top_logprobs_of_one_row():
    row = np.array([0.5, 3.0, -1.0, 3.0, 2.0], np.float32)
    ids, logprobs = decoding.top_logprobs(row, 3)
    assert ids.tolist() == [1, 3, 4]
    np.testing.assert_allclose(logprobs, _reference_log_softmax(row)[[1, 3, 4]], atol=1e-6)


def test_choose_greedy_and_seeded_sampling():
    logits = np.random.default_rng(3).standard_normal(500).astype(np.float32) * 3
    assert decoding.choose(logits, SamplingParams(), np.random.default_rng(0)) == int(np.argmax(logits))
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, seed=7)
    draws = [decoding.choose(logits, nucleus, np.random.default_rng(seed)) for seed in range(200)]
    assert draws == [decoding.choose(logits, nucleus, np.random.default_rng(seed)) for seed in range(200)]
    probs = np.exp(_reference_log_softmax(logits))
    order = np.argsort(-probs, kind="stable")
    kept = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    assert set(draws) <= kept and len(set(draws)) > 1
    top3 = SamplingParams(temperature=2.0, top_k=3)
    assert {decoding.choose(logits, top3, np.random.default_rng(s)) for s in range(100)} == set(order[:3].tolist())
