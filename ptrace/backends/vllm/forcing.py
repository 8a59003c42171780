"""Teacher forcing inside vLLM's sampler (imported only once vLLM is chosen: it subclasses
vLLM's ``LogitsProcessor``, which vLLM requires of every logits processor)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

#: Keys of ``SamplingParams.extra_args``: the tokens to force, ptrace's request index.
_FORCED_KEY, _REQUEST_KEY = "ptrace_forced_tokens", "ptrace_request"


class ForcedTokens(LogitsProcessor):
    """Forces each teacher-forced request's next fed token, and records the greedy choice first.

    vLLM (v1) computes the raw logprobs before it calls logits processors, so the recorded
    logprobs stay the model's own. While :meth:`recording`, ``choices`` keeps
    ``{request: {step: argmax}}``, what the engine would have chosen (one engine per process, so
    one class-wide record).
    """

    choices: ClassVar[dict[int, dict[int, int]] | None] = None

    @staticmethod
    def request_args(tokens: Sequence[int], request: int) -> dict[str, Any]:
        """``SamplingParams.extra_args`` that make request ``request`` be fed ``tokens``."""
        return {_FORCED_KEY: [int(token) for token in tokens], _REQUEST_KEY: request}

    @classmethod
    @contextmanager
    def recording(cls) -> Iterator[dict[int, dict[int, int]]]:
        """The greedy choices at every forced step inside the ``with`` block."""
        cls.choices = {}
        try:
            yield cls.choices
        finally:
            cls.choices = None

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[list[int], list[int], int]] = {}  # batch row -> (forced, outputs, request)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, outputs in batch_update.added:
            extra = (params.extra_args or {}) if params is not None else {}
            if _FORCED_KEY in extra:
                self.rows[index] = (extra[_FORCED_KEY], outputs, int(extra[_REQUEST_KEY]))
            else:
                self.rows.pop(index, None)
        for first, second, direction in batch_update.moved:
            a, b = self.rows.pop(first, None), self.rows.pop(second, None)
            if a is not None:
                self.rows[second] = a
            if b is not None and direction == MoveDirectionality.SWAP:
                self.rows[first] = b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (forced, outputs, request) in self.rows.items():
            step = len(outputs)  # the request's running output list: tokens chosen so far
            if self.choices is not None:  # a partial prefill's entry is overwritten by its last chunk's
                self.choices.setdefault(request, {})[step] = int(logits[row].argmax())
            if step < len(forced):
                token = forced[step]
                value = logits[row, token].clone()
                logits[row] = float("-inf")
                logits[row, token] = value
        return logits
