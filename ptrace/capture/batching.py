"""Batch what-ifs: the captured requests run in another batch than the baseline's, so that a
change in their answers is the batch's doing (``batch:...``, :class:`~ptrace.capture.whatif.Batch`).

A batched engine computes a request's rows together with whatever else it scheduled in that
step: the batch's size and the shapes of its matrix products, chunked prefill and prefix-cache
hits change the arithmetic. Here the same prompts run

- ``solo``: each alone, one ``generate`` per request;
- ``fillers=N``: together with N filler prompts of mixed lengths (seeded: ``seed=S``), submitted
  in the same ``generate`` after the captured ones. Fillers' tensors reach no interceptor (the
  recorder and the injections see the captured requests only), their results are dropped, and
  the schedule names them -1;
- ``prefix_cache=on``: after the prompts were run once (one token each) into the prefix cache,
  so that the captured run computes only each prompt's uncached tail;
- ``max_num_batched_tokens=K``, ``invariant=on``: on an engine loaded with other options (see
  ``Batch.engine_options``), otherwise as the baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ptrace.backends.base import Backend, EngineTensor, Generation, Interceptor, StepCallback, TensorSite
from ptrace.bundle_spec.schema import SamplingParams, ScheduleInfo, ScheduleStep, WhatIfSpec
from ptrace.capture.whatif import Batch

#: Value of a request in ``meta/schedule`` that the bundle does not record (a filler).
NOT_RECORDED = -1


class _Renumbered(Interceptor):
    """Shows ``inner`` the rows of captured requests only, under their captured index."""

    def __init__(self, inner: Interceptor, captured: Mapping[int, int]) -> None:
        self.inner, self.captured = inner, captured

    def wants(self, name: str) -> bool:
        return self.inner.wants(name)

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> np.ndarray | None:
        index = self.captured.get(site.request)
        if index is None:  # a filler: nobody records or changes it
            return None
        return self.inner.on_tensor(replace(site, request=index), tensor)


def generate(backend: Backend, prompts: list[np.ndarray], sampling: SamplingParams,
             interceptors: Sequence[Interceptor], on_step: StepCallback | None,
             forced: list[np.ndarray] | None, whatifs: Sequence[WhatIfSpec],
             longest_prompt: int | None = None) -> tuple[list[Generation], ScheduleInfo | None]:
    """``backend.generate`` of the captured requests as the run's batch what-if (if any) lays
    them out; their generations and the engine's schedule, in captured indices.

    ``longest_prompt`` bounds the fillers' lengths (what the model holds besides the new tokens)."""
    batch = next((spec for spec in whatifs if spec.kind == Batch.name), None)
    mode = Batch.mode(batch)[0] if batch is not None else None
    if mode == "solo":
        return _solo(backend, prompts, sampling, interceptors, on_step, forced)
    if mode == "fillers":
        return _among_fillers(backend, prompts, sampling, interceptors, on_step, forced, batch, longest_prompt)
    if mode == "prefix_cache":  # the prompts' KV cache blocks computed once, nothing recorded
        backend.generate(prompts, replace(sampling, max_new_tokens=1, prompt_logprobs=False))
    generations = backend.generate(prompts, sampling, interceptors, on_step, forced)
    return generations, backend.schedule()


def _solo(backend: Backend, prompts: list[np.ndarray], sampling: SamplingParams,
          interceptors: Sequence[Interceptor], on_step: StepCallback | None,
          forced: list[np.ndarray] | None) -> tuple[list[Generation], ScheduleInfo | None]:
    """One ``generate`` per request: its batch holds nothing else. Request i keeps its own
    sampling seed (``seed + i``, as in a batch)."""
    generations: list[Generation] = []
    steps: list[ScheduleStep] = []
    schedule = None
    for index, prompt in enumerate(prompts):
        alone = {0: index}
        generations += backend.generate(
            [prompt], replace(sampling, seed=sampling.seed + index), [_Renumbered(i, alone) for i in interceptors],
            _renumbered_steps(on_step, alone), None if forced is None else [forced[index]])
        schedule = backend.schedule()
        if schedule is not None:
            steps += _renumbered_schedule(schedule, alone).steps
    return generations, None if schedule is None else replace(schedule, steps=tuple(steps))


def _among_fillers(backend: Backend, prompts: list[np.ndarray], sampling: SamplingParams,
                   interceptors: Sequence[Interceptor], on_step: StepCallback | None,
                   forced: list[np.ndarray] | None, spec: WhatIfSpec,
                   longest_prompt: int | None) -> tuple[list[Generation], ScheduleInfo | None]:
    fillers = filler_prompts(int(spec.params["fillers"]), spec.seed, backend.vocab_size,
                             max(len(p) for p in prompts), longest_prompt)
    captured = {index: index for index in range(len(prompts))}
    filler_forced = None
    if forced is not None:  # teacher forcing feeds every request: fillers are fed their own draws
        rng = np.random.default_rng([spec.seed, len(fillers), 1])
        filler_forced = [rng.integers(0, backend.vocab_size, max(sampling.max_new_tokens - 1, 0), dtype=np.int64) for _ in fillers]
    generations = backend.generate([*prompts, *fillers], sampling, [_Renumbered(i, captured) for i in interceptors],
                                   _renumbered_steps(on_step, captured),
                                   None if forced is None else [*forced, *filler_forced])
    schedule = backend.schedule()
    return generations[: len(prompts)], None if schedule is None else _renumbered_schedule(schedule, captured)


def filler_prompts(count: int, seed: int, vocab_size: int, longest_captured: int,
                   longest_allowed: int | None) -> list[np.ndarray]:
    """``count`` prompts of random tokens, their lengths drawn uniformly from 1 to twice the
    longest captured prompt (at most ``longest_allowed``): a mixed batch of short and long."""
    rng = np.random.default_rng([seed, count])
    longest = 2 * longest_captured if longest_allowed is None else max(1, min(2 * longest_captured, longest_allowed))
    return [rng.integers(0, vocab_size, int(length), dtype=np.int64)
            for length in rng.integers(1, longest + 1, count)]


def _renumbered_steps(on_step: StepCallback | None, captured: Mapping[int, int]) -> StepCallback | None:
    if on_step is None:
        return None

    def step(request: int, index: int) -> None:
        if request in captured:
            on_step(captured[request], index)
    return step


def _renumbered_schedule(schedule: ScheduleInfo, captured: Mapping[int, int]) -> ScheduleInfo:
    """The schedule in captured indices; every other request is :data:`NOT_RECORDED`."""
    def renumber(step: ScheduleStep) -> ScheduleStep:
        return replace(step, requests=tuple(captured.get(r, NOT_RECORDED) for r in step.requests))
    return replace(schedule, steps=tuple(renumber(step) for step in schedule.steps))


