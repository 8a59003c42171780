"""Teacher forcing inside vLLM's sampler (imported only once vLLM is chosen: it subclasses
vLLM's ``LogitsProcessor``, which vLLM requires of every logits processor)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from ptrace.backends.vllm_engine import FORCED_KEY, REQUEST_KEY

if TYPE_CHECKING:
    from ptrace.backends.vllm_engine import _Hooks


class ForcedTokens(LogitsProcessor):
    """Forces each teacher-forced request's next fed token, and records the greedy choice first.

    vLLM (v1) computes the raw logprobs before it calls logits processors, so the recorded
    logprobs stay the model's own. ``observer`` is the running capture's hooks (one engine per
    process); it keeps ``{request: {step: argmax}}``, what the engine would have chosen.
    """

    observer: ClassVar[_Hooks | None] = None

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
            if FORCED_KEY in extra:
                self.rows[index] = (extra[FORCED_KEY], outputs, int(extra[REQUEST_KEY]))
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
            if self.observer is not None:  # a partial prefill's entry is overwritten by its last chunk's
                self.observer.forced_choices.setdefault(request, {})[step] = int(logits[row].argmax())
            if step < len(forced):
                token = forced[step]
                value = logits[row, token].clone()
                logits[row] = float("-inf")
                logits[row, token] = value
        return logits
