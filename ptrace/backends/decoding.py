"""How a token and its logprobs come out of logits, for the engines that drive their own decode
loop (:mod:`ptrace.backends.sequential`): log-softmax, top-k, seeded sampling and prompt
logprobs, on the host in NumPy.

One implementation for every such engine: two engines that compute the same logits then record
the same logprobs and pick the same tokens, so a difference between their bundles is a
difference in the model's numerics, never in the bookkeeping around it. Engines hand over float32
rows; sampling alone widens its one row to float64.
"""

from __future__ import annotations

import numpy as np

from ptrace.bundle_spec.schema import SamplingParams

#: Logits entries normalised at once by :func:`prompt_logprobs` (16 MiB per float32 temporary),
#: so a long prompt over a large vocabulary never needs a [prompt, vocab] log-softmax.
BLOCK_ELEMENTS = 1 << 22
#: Group maxima per requested id in :func:`top_k`: more groups, a tighter bound, fewer candidates.
GROUPS_PER_K = 8


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p along the last axis, in the logits' own dtype."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k(rows: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest entries along the last axis, largest first, equal values in id
    order (a stable sort's order), without sorting or partitioning whole rows.

    The k-th largest of any k entries of a row is at most the row's k-th largest value, so the
    k-th largest of ``GROUPS_PER_K * k`` group maxima bounds it from below: only the few entries
    at or above that bound are sorted (about a fifth of ``np.argpartition``'s time on rows of 32000).
    Rows with fewer candidates than ``k`` (NaN) take a stable sort of the whole row."""
    width = rows.shape[-1]
    flat = rows.reshape(-1, width)
    if k == 0:
        return np.zeros((*rows.shape[:-1], 0), np.int64)
    if width <= GROUPS_PER_K * k:
        return np.argsort(-rows, axis=-1, kind="stable")[..., :k]
    groups = GROUPS_PER_K * k
    maxima = flat[:, :width // groups * groups].reshape(len(flat), groups, -1).max(axis=-1)
    bound = np.partition(maxima, groups - k, axis=-1)[:, groups - k]
    row, column = np.nonzero(flat >= bound[:, None])
    ordered = np.lexsort((column, -flat[row, column], row))
    counts = np.bincount(row, minlength=len(flat))
    firsts = np.cumsum(counts) - counts
    picked = np.minimum(firsts[:, None] + np.arange(k), len(row) - 1)
    ids = column[ordered][picked] if len(row) else np.zeros((len(flat), k), np.int64)
    short = counts < k
    if short.any():
        ids[short] = np.argsort(-flat[short], axis=-1, kind="stable")[:, :k]
    return ids.reshape(*rows.shape[:-1], k)


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely ids of one row of logits and their logprobs."""
    logprobs = log_softmax(logits)
    ids = top_k(logprobs, k)
    return ids, logprobs[ids]


def choose(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy argmax, or seeded sampling with temperature, top-k and top-p, from one row."""
    if sampling.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k > 0:
        kth = np.partition(scores, -min(sampling.top_k, scores.size))[-min(sampling.top_k, scores.size)]
        scores[scores < kth] = -np.inf
    if sampling.top_p < 1.0:
        order = np.argsort(-scores, kind="stable")
        probs = np.exp(log_softmax(scores[order]))
        drop = np.cumsum(probs) - probs >= sampling.top_p
        scores[order[drop]] = -np.inf
    cumulative = np.cumsum(np.exp(log_softmax(scores)))
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


def prompt_logprobs(logits: np.ndarray, prompt: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row i of the prefill's logits predicts prompt token i+1 (SPEC.md section 2): the prompt
    tokens' logprobs, and the top-k ids and logprobs per position (position 0: NaN and -1).

    log p = logit - logsumexp(row), for the picked entries only, a block of rows at a time
    (:data:`BLOCK_ELEMENTS`): 2048 prompt positions over a 32000-token vocabulary would otherwise
    need a quarter GB per temporary."""
    positions = prompt.shape[0]
    token_lp = np.full(positions, np.nan, dtype=np.float32)
    top_ids = np.full((positions, k), -1, dtype=np.int64)
    top_lps = np.full((positions, k), np.nan, dtype=np.float32)
    block = max(1, BLOCK_ELEMENTS // max(1, logits.shape[-1]))
    for first in range(0, positions - 1, block):
        last = min(first + block, positions - 1)
        predicted = slice(first + 1, last + 1)  # the prompt positions that rows first:last predict
        rows = logits[first:last]
        top = rows.max(axis=-1, keepdims=True)
        logsumexp = top + np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))
        token_lp[predicted] = rows[np.arange(last - first), prompt[predicted]] - logsumexp[:, 0]
        ids = top_k(rows, k)
        top_ids[predicted], top_lps[predicted] = ids, np.take_along_axis(rows, ids, axis=-1) - logsumexp
    return token_lp, top_ids, top_lps
