"""The numbers themselves: per-row errors and KL divergences, against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from ptrace.backends.decoding import log_softmax
from ptrace.compare.metrics import kl_full, kl_topk, row_errors
from ptrace.errors import ComparisonError


def test_row_errors_match_the_seed_documents_formulas():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 64))
    b = a + rng.standard_normal((3, 64)) * 1e-3
    errors = row_errors(a.astype(np.float32), b.astype(np.float32))
    x, y = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(errors.mean_abs, np.abs(x - y).mean(1))
    np.testing.assert_allclose(errors.mean_rel, (np.abs(x - y) / (np.abs(x) + 1e-8)).mean(1))
    np.testing.assert_allclose(errors.cos, (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
    assert (row_errors(a, a).cos == 1).all() and (row_errors(a, a).max_abs == 0).all()


def test_row_errors_refuse_rows_of_different_shapes():
    with pytest.raises(ComparisonError, match="shapes"):
        row_errors(np.zeros((2, 4)), np.zeros((2, 5)))


def _topk(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What a capture records: the ids and logprobs of the k most likely tokens, best first."""
    order = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(logprobs, order, 1)


def _random_pairs(seeds: range):
    """Pairs of next-token distributions: peaked and flat, close to each other and unrelated."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        vocab = int(rng.integers(2, 40))
        logits_a = rng.standard_normal((4, vocab)) * rng.uniform(0.01, 10)
        if seed % 2:
            logits_b = rng.standard_normal((4, vocab)) * rng.uniform(0.01, 10)
        else:
            logits_b = logits_a + rng.standard_normal((4, vocab)) * rng.uniform(0, 3)
        yield logits_a, logits_b


def test_topk_kl_never_exceeds_the_exact_kl_and_is_exact_with_the_whole_vocabulary():
    """What ``kl_topk`` promises: with A's top-k only, it errs towards a smaller KL (never
    inventing divergence), and with k = vocabulary size it is the exact KL."""
    for logits_a, logits_b in _random_pairs(range(300)):
        exact = kl_full(logits_a, logits_b)
        lp_a, lp_b = log_softmax(logits_a.astype(np.float64)), log_softmax(logits_b.astype(np.float64))
        vocab = logits_a.shape[1]
        for k in range(1, vocab + 1):
            estimate = kl_topk(*_topk(lp_a, k), *_topk(lp_b, k))
            # float64 rounding of 1 - (a probability near 1) leaves a relative 1e-8 at most
            assert (estimate <= exact * (1 + 1e-6) + 1e-12).all(), (k, vocab, estimate, exact)
        np.testing.assert_allclose(estimate, exact, rtol=1e-9, atol=1e-12)
