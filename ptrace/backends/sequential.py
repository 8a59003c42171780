"""The template of engines that ptrace drives itself: one request at a time, one forward pass per
decode step, no batching and no padding (HF transformers, MindFormers).

There every forward pass is one step of one request and every row of an activation one of its
positions, so the decode loop, the step each hook fires in, the logprobs and the choice of the
next token are the same for every such engine and live here once; the engine only computes the
logits of a step's new positions and shows its tensors to the interceptors through
:meth:`SequentialBackend._emit` from its hooks.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from ptrace.backends import decoding
from ptrace.backends.base import (
    Backend,
    Generation,
    Interceptor,
    NativeTensor,
    StepCallback,
    TensorSite,
)
from ptrace.bundle_spec.schema import SamplingParams


class DecodeSteps:
    """One request's decode-loop bookkeeping (one step per forward pass): what was chosen, when
    to stop, and which token to feed next."""

    def __init__(self, sampling: SamplingParams, forced: np.ndarray | None, eos_ids: set[int]) -> None:
        self.sampling, self.forced, self.eos_ids = sampling, forced, eos_ids
        self.tokens: list[int] = []
        self.top_ids: list[np.ndarray] = []
        self.top_logprobs: list[np.ndarray] = []
        self.finish_reason = "length"

    def record(self, token: int, top_ids: np.ndarray, top_logprobs: np.ndarray) -> int | None:
        """Record this step's choice; returns the token to feed next, or None when done.

        Teacher forcing feeds ``forced[step]`` instead of the choice, and never stops at EOS."""
        step = len(self.tokens)
        self.tokens.append(int(token))
        self.top_ids.append(np.asarray(top_ids, np.int64))
        self.top_logprobs.append(np.asarray(top_logprobs, np.float32))
        if token in self.eos_ids and not self.sampling.ignore_eos and self.forced is None:
            self.finish_reason = "stop"
            return None
        if step + 1 == self.sampling.max_new_tokens:
            return None
        return int(token) if self.forced is None else int(self.forced[step])

    def generation(self, prompt_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Generation:
        """The request's result; ``prompt_logprobs`` = (token logprobs, top-k ids, top-k logprobs)."""
        generation = Generation(output_ids=np.asarray(self.tokens, np.int64), topk_ids=np.stack(self.top_ids),
                                topk_logprobs=np.stack(self.top_logprobs), finish_reason=self.finish_reason)
        if prompt_logprobs is not None:
            generation.prompt_logprobs, generation.prompt_topk_ids, generation.prompt_topk_logprobs = prompt_logprobs
        return generation


class SequentialBackend(Backend):
    """A backend whose engine computes logits; the decode loop around it is ptrace's."""

    #: Wraps the engine's own tensors for interceptors.
    tensor_type: ClassVar[type[NativeTensor]]

    def __init__(self) -> None:
        super().__init__()
        #: End-of-sequence token ids of the loaded model (``_load`` sets them).
        self.eos_ids: set[int] = set()
        # Hook state of the running generate(): who sees the tensors, which ones they want, and
        # the step a forward pass belongs to (None outside one, when hooks show nothing).
        self._interceptors: list[Interceptor] = []
        self._wanted: set[str] = set()
        self._site: TensorSite | None = None
        #: One past the last position of the running step: a tensor with fewer rows than the step
        #: has positions (the LM head over the last prompt position only) covers its last ones.
        self._step_end = 0

    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]:
        self._check_length(max(len(p) for p in prompts) + sampling.max_new_tokens - 1)
        self._interceptors, self._wanted = interceptors, self.wanted_tensors(interceptors)
        with ExitStack() as hooks:
            self._install_hooks(self._wanted, hooks)
            try:
                return [self._generate_one(index, prompt, sampling, on_step,
                                           None if forced is None else forced[index])
                        for index, prompt in enumerate(prompts)]
            finally:
                self._site = None

    def _generate_one(self, index: int, prompt: np.ndarray, sampling: SamplingParams,
                      on_step: StepCallback | None, forced: np.ndarray | None) -> Generation:
        rng = np.random.default_rng(sampling.seed + index)
        steps = DecodeSteps(sampling, forced, self.eos_ids)
        sequence = [int(t) for t in prompt]
        prompt_logprobs = None
        self._start_request()
        for step in range(sampling.max_new_tokens):
            start = 0 if step == 0 else len(sequence) - 1
            self._site, self._step_end = TensorSite("", index, step, start), len(sequence)
            prompt_rows = step == 0 and sampling.prompt_logprobs
            logits = self._forward(sequence, start, prompt_rows)
            if prompt_rows:
                prompt_logprobs = decoding.prompt_logprobs(logits[:-1], prompt, sampling.logprobs)
            top_ids, top_logprobs = decoding.top_logprobs(logits[-1], sampling.logprobs)
            fed = self._next_token(steps.record(decoding.choose(logits[-1], sampling, rng), top_ids, top_logprobs))
            if on_step:
                on_step(index, step)
            if fed is None:
                break
            sequence.append(fed)
        self._site = None
        return steps.generation(prompt_logprobs)

    def _emit(self, name: str, rows: Any) -> Any | None:
        """Show one native tensor of the running step (rows = its new positions) to the
        interceptors; the native replacement, if any replaced it."""
        if self._site is None:
            return None
        site = replace(self._site, name=name, start=self._step_end - rows.shape[0])
        new = self._intercept(self._interceptors, site, self.tensor_type(rows))
        return None if new is None else new.native

    def _next_token(self, fed: int | None) -> int | None:
        """The token to feed next (None: the request is done). An engine whose ranks each run
        this loop makes them agree on rank 0's, so that they run the same forward passes."""
        return fed

    # -- what engines implement ----------------------------------------------------------------
    def _check_length(self, longest: int) -> None:
        """Refuse requests of ``longest`` positions (prompt + generated) that the loaded model
        cannot hold; engines without a fixed size accept any."""

    @abstractmethod
    def _install_hooks(self, wanted: set[str], hooks: ExitStack) -> None:
        """Hook the engine so that each tensor in ``wanted`` reaches :meth:`_emit`; every hook's
        removal goes onto ``hooks``."""

    @abstractmethod
    def _start_request(self) -> None:
        """Start a request with an empty KV cache."""

    @abstractmethod
    def _forward(self, sequence: list[int], start: int, prompt_rows: bool) -> np.ndarray:
        """One forward pass over positions ``start:`` of ``sequence`` (the prompt at the prefill,
        then the one new position), earlier positions coming from the KV cache: float32 logits
        of every new position when ``prompt_rows`` (the prefill of a request that wants prompt
        logprobs), otherwise of at least the last one (engines that can skip the LM head over the
        other positions should: it is a quarter of a long prefill)."""
