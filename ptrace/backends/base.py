"""The interface every engine implements, and the hook protocol that sees its tensors.

A backend is a template method (as Polygraphy's runners are): the public ``load`` and
``generate`` validate their inputs and log, then call the engine's ``_load``/``_generate``.
Engines call :meth:`Backend._intercept` for every canonical tensor they produce; interceptors
(the capture recorder, later error-injection what-ifs) see it through the engine-agnostic
:class:`EngineTensor` and may return a replacement, which the engine then uses instead.
Nothing here imports an engine.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ptrace.bundle_spec.schema import SamplingParams
from ptrace.errors import BackendError, UsageError

log = logging.getLogger("ptrace.backends")

#: Called after each decode step: ``(request index, step index)``.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadOptions:
    model_dir: Path
    dtype: str = "float32"
    device: str = "cpu"
    engine_options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSite:
    """Where a tensor comes from: ``rows`` positions starting at ``start`` of ``request``."""

    name: str
    request: int
    step: int
    start: int


class EngineTensor(ABC):
    """An engine's tensor for one request, rows = positions (SPEC.md section 6)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def dtype(self) -> str:
        """Logical dtype name (``float32``, ``bfloat16``, ...)."""

    @abstractmethod
    def numpy(self) -> np.ndarray:
        """A lossless, contiguous host copy in the tensor's own dtype."""

    @abstractmethod
    def row_stats(self) -> np.ndarray:
        """``[rows, 7]`` float64 statistics, as ``bundle_spec.stats.row_stats`` defines them."""

    @abstractmethod
    def replaced(self, array: np.ndarray) -> EngineTensor:
        """A tensor of the same shape, dtype and device holding ``array``'s values."""


class Interceptor(ABC):
    """Sees (and may replace) canonical tensors as the engine produces them."""

    @abstractmethod
    def wants(self, name: str) -> bool:
        """Whether this interceptor needs ``name``: engines hook only what someone wants."""

    @abstractmethod
    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> np.ndarray | None:
        """Return an array to replace the tensor with, or None to leave it alone."""


@dataclass
class Generation:
    """What a backend returns for one request (SPEC.md section 2 arrays)."""

    output_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    prompt_topk_ids: np.ndarray | None = None
    prompt_topk_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None
    finish_reason: str = "length"


class DecodeSteps:
    """One request's decode-loop bookkeeping, for engines that drive their own loop (one step
    per forward pass): what was chosen, when to stop, and which token to feed next."""

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


class Backend(ABC):
    """One inference engine behind ptrace's interface."""

    #: Registry name (``--backend``).
    name: ClassVar[str]
    #: One-line description for ``ptrace backends``.
    description: ClassVar[str] = ""
    #: Import names that must be importable for the engine to run (probed without importing).
    requires: ClassVar[tuple[str, ...]] = ()
    #: The engine environment (``ptrace envs``) the engine runs in when this one lacks it.
    environment: ClassVar[str | None] = None
    #: What to tell a user whose environment lacks the engine.
    install_hint: ClassVar[str] = ""
    #: Compute dtypes this engine accepts.
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")

    def __init__(self) -> None:
        self.options: LoadOptions | None = None

    # -- discovery -----------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> str | None:
        """Why this engine cannot run here (cheap: no import), or None if it looks runnable."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed"
        return None

    # -- template methods ----------------------------------------------------------------------
    def load(self, options: LoadOptions) -> None:
        """Load the model; ``options.dtype`` must be one of :attr:`dtypes`."""
        if options.dtype not in self.dtypes:
            raise UsageError(f"backend {self.name} does not support dtype {options.dtype}",
                             hint=f"choose one of {', '.join(self.dtypes)}")
        log.info("loading %s on %s (%s, %s)", options.model_dir, self.name, options.dtype, options.device)
        self._load(options)
        self.options = options

    def generate(self, prompts: Sequence[np.ndarray], sampling: SamplingParams,
                 interceptors: Sequence[Interceptor] = (),
                 on_step: StepCallback | None = None,
                 forced: Sequence[np.ndarray] | None = None) -> list[Generation]:
        """Run every prompt (token ids) through the engine; interceptors see every wanted tensor.

        ``forced`` (teacher forcing): per request, the tokens to feed back instead of the
        engine's own choices; the outputs still record what the engine would have chosen.
        """
        if self.options is None:
            raise BackendError(f"backend {self.name}: generate() before load()")
        if sampling.max_new_tokens < 1:
            raise UsageError("max_new_tokens must be at least 1")
        vocab = self.vocab_size
        for i, ids in enumerate(prompts):
            if ids.ndim != 1 or ids.size == 0:
                raise UsageError(f"prompt {i} is empty")
            if ids.min() < 0 or ids.max() >= vocab:
                raise UsageError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab})")
        if forced is not None and (len(forced) != len(prompts) or
                                   any(len(f) < sampling.max_new_tokens - 1 for f in forced)):
            raise UsageError("teacher forcing needs, per prompt, max_new_tokens - 1 tokens to feed")
        if not 0 <= sampling.logprobs <= vocab:
            raise UsageError(f"logprobs must be in [0, {vocab}]")
        log.info("%s: generating %d request(s), %d new tokens each", self.name, len(prompts),
                 sampling.max_new_tokens)
        generations = self._generate(list(prompts), sampling, list(interceptors), on_step,
                                     None if forced is None else [np.asarray(f, np.int64) for f in forced])
        if len(generations) != len(prompts):
            raise BackendError(f"backend {self.name} returned {len(generations)} results "
                               f"for {len(prompts)} prompts")
        return generations

    def _intercept(self, interceptors: Sequence[Interceptor], site: TensorSite,
                   tensor: EngineTensor) -> EngineTensor | None:
        """Show ``tensor`` to every interceptor in order; the replacement, if any replaced it."""
        changed = False
        for interceptor in interceptors:
            if interceptor.wants(site.name):
                new = interceptor.on_tensor(site, tensor)
                if new is not None:
                    if tuple(new.shape) != tuple(tensor.shape):
                        raise BackendError(f"{site.name}: replacement of shape {new.shape} for "
                                           f"a tensor of shape {tensor.shape}")
                    tensor, changed = tensor.replaced(new), True
        return tensor if changed else None

    # -- what engines implement ----------------------------------------------------------------
    @abstractmethod
    def _load(self, options: LoadOptions) -> None: ...

    @abstractmethod
    def _generate(self, prompts: list[np.ndarray], sampling: SamplingParams,
                  interceptors: list[Interceptor], on_step: StepCallback | None,
                  forced: list[np.ndarray] | None) -> list[Generation]: ...

    @abstractmethod
    def set_seed(self, seed: int) -> dict[str, int]:
        """Seed the engine's RNGs; returns ``{rng name: seed}`` for the bundle."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, by the model's own tokenizer: every engine here loads the HF
        tokenizer of the checkpoint into ``self.tokenizer``; one with another kind overrides this."""
        return list(self.tokenizer(text)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @abstractmethod
    def version(self) -> str:
        """Version of the engine's main package."""

    def engine_info(self) -> dict[str, Any]:
        """Engine settings that change numerics (recorded in ``meta/run.engine``)."""
        return {}

    def close(self) -> None:
        """Release the engine (processes, device memory)."""
