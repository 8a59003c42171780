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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ptrace.backends.environments import EngineEnvironment
from ptrace.backends.model_dir import read_config
from ptrace.bundle_spec import moe
from ptrace.bundle_spec.names import all_names
from ptrace.bundle_spec.schema import ParallelInfo, SamplingParams, ScheduleInfo
from ptrace.errors import BackendError, UsageError

log = logging.getLogger("ptrace.backends")

#: Called after each decode step: ``(request index, step index)``.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadOptions:
    """What ``Backend.load`` takes. ``engine_options`` arrive as the user's strings (``-E``) and
    reach ``_load`` parsed by the engine's declared :class:`EngineOption` schema."""

    model_dir: Path
    dtype: str = "float32"
    device: str = "cpu"
    engine_options: Mapping[str, Any] = field(default_factory=dict)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class EngineOption:
    """One ``--engine-option KEY=VALUE`` an engine understands: its type, meaning and limits.

    Declared on the backend class, so that validation, ``--help`` and ``ptrace backends`` all
    read the same schema. ``default`` None means "the engine's own default" (nothing is passed).
    """

    name: str
    type: type  # str, int, float or bool
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None

    def parse(self, value: Any, backend: str) -> Any:
        """The typed value of ``value`` (a string from the command line, or already typed)."""
        where = f"--engine-option {self.name}={value}"
        text = str(value).strip()
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if text.lower() not in _TRUE + _FALSE:
                raise UsageError(f"{where}: backend {backend} expects true or false")
            return text.lower() in _TRUE
        try:
            parsed = self.type(text)
        except ValueError:
            raise UsageError(f"{where}: backend {backend} expects {self.type.__name__}") from None
        if self.choices and parsed not in self.choices:
            raise UsageError(f"{where}: backend {backend} accepts {', '.join(self.choices)}")
        if self.minimum is not None and parsed < self.minimum:
            raise UsageError(f"{where}: backend {backend} needs at least {self.minimum:g}")
        return parsed

    def describe(self) -> str:
        """``name (type[, choices][, default]): help``, for help texts."""
        details = [self.type.__name__]
        if self.choices:
            details.append("|".join(self.choices))
        if self.default is not None:
            details.append(f"default {self.default}")
        return f"{self.name} ({', '.join(details)}): {self.help}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.__name__, "help": self.help,
                "default": self.default, "choices": list(self.choices), "minimum": self.minimum}


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared so that commands refuse impossible requests before any
    engine starts, and ``ptrace backends`` can say so."""

    #: Canonical intermediate tensors are observable (False: tokens and logprobs only).
    tensors: bool = True
    #: Interceptors may replace tensors, KV cache included (error-injection what-ifs, splices).
    replace: bool = True
    #: Requests run together in one engine batch (True) or one after another (False).
    batched: bool = False
    #: Device kinds ``--device`` may name.
    devices: tuple[str, ...] = ("cpu",)
    #: Compute dtypes.
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "replace": self.replace, "batched": self.batched,
                "devices": list(self.devices), "dtypes": list(self.dtypes)}


@dataclass(frozen=True)
class TensorSite:
    """Where a tensor comes from: ``rows`` positions starting at ``start`` of ``request``."""

    name: str
    request: int
    step: int
    start: int
    #: The rank whose shard this is, in a run split over several ranks (0 otherwise).
    rank: int = 0


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


class NativeTensor(EngineTensor):
    """An :class:`EngineTensor` over one of the engine's own tensors, kept as ``native`` (which
    the engine's hooks take back when an interceptor replaced it)."""

    def __init__(self, native: Any) -> None:
        self.native = native

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.native.shape)


def layer_modules(layers: Sequence[Any], attn_norm: str, attn: str, mlp_norm: str,
                  mlp: str) -> dict[str, Any]:
    """Canonical name -> the decoder-layer module whose output it is (SPEC.md section 5), given
    the attribute names an engine's decoder layer gives those modules; ``layers.{i}.out`` is the
    layer itself."""
    parts = {"attn_norm": attn_norm, "attn": attn, "mlp_norm": mlp_norm, "mlp": mlp}
    modules: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        modules.update({f"layers.{i}.{part}": getattr(layer, attribute) for part, attribute in parts.items()})
        modules[f"layers.{i}.out"] = layer
    return modules


class Interceptor(ABC):
    """Sees (and may replace) canonical tensors as the engine produces them."""

    #: Runs where the tensors are: in a multi-rank engine, in each rank's process, on the rank's
    #: own shard (``TensorSite.rank`` says which; the object must pickle). Interceptors that
    #: replace tensors need it, since a replacement made after the ranks ran cannot reach them;
    #: the others see the unsharded tensors in the driver.
    on_ranks: ClassVar[bool] = False

    @abstractmethod
    def wants(self, name: str) -> bool:
        """Whether this interceptor needs ``name``: engines hook only what someone wants."""

    @abstractmethod
    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> np.ndarray | None:
        """Return an array to replace the tensor with, or None to leave it alone."""


def intercept_all(interceptors: Sequence[Interceptor], site: TensorSite,
                  tensor: EngineTensor) -> EngineTensor | None:
    """Show ``tensor`` to every interceptor that wants it, in order, each seeing the previous
    one's replacement; the final replacement, or None if none replaced it."""
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


class Backend(ABC):
    """One inference engine behind ptrace's interface.

    Everything ptrace needs to know about an engine is declared here, on its class: the registry
    (an entry point in the ``ptrace.backends`` group) finds the class, and ``ptrace backends``,
    ``ptrace envs``, option validation, ``--help`` and the recorded package versions all read
    these declarations. Adding an engine is one module and one entry point.
    """

    #: Registry name (``--backend``).
    name: ClassVar[str]
    #: One-line description for ``ptrace backends``.
    description: ClassVar[str] = ""
    #: Import names that must be importable for the engine to run (probed without importing).
    requires: ClassVar[tuple[str, ...]] = ()
    #: The engine environment (``ptrace envs``) the engine runs in when this one lacks it.
    environment: ClassVar[EngineEnvironment | None] = None
    #: Distributions whose versions decide this engine's numerics (recorded in every bundle).
    packages: ClassVar[tuple[str, ...]] = ()
    #: The ``--engine-option`` schema.
    options: ClassVar[tuple[EngineOption, ...]] = ()
    #: What the engine can do.
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self) -> None:
        self.load_options: LoadOptions | None = None

    # -- discovery -----------------------------------------------------------------------------
    @classmethod
    def probe(cls) -> str | None:
        """Why this engine is not installed here (cheap: no import), or None if it looks runnable."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed"
        return None

    @classmethod
    def missing_hardware(cls) -> str | None:
        """Why the engine can run on no device of this machine (cheap), or None. Unlike
        :meth:`probe`, no engine environment can help."""
        return None

    @classmethod
    def install_hint(cls) -> str | None:
        """What to tell a user whose environment lacks the engine."""
        if cls.environment is not None:
            return f"create its environment with: ptrace envs create {cls.environment.name} (or: make setup)"
        return None

    @classmethod
    def parse_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` checked and typed by :attr:`options`, declared defaults filled in."""
        schema = {option.name: option for option in cls.options}
        unknown = sorted(set(given) - set(schema))
        if unknown:
            raise UsageError(f"backend {cls.name} has no engine option {', '.join(unknown)}",
                             hint=f"it understands {', '.join(schema) or 'none'} (see `ptrace backends`)")
        parsed = {name: option.default for name, option in schema.items() if option.default is not None}
        parsed.update({name: schema[name].parse(value, cls.name) for name, value in given.items()})
        return parsed

    # -- template methods ----------------------------------------------------------------------
    @classmethod
    def check_setup(cls, dtype: str, device: str) -> None:
        """Refuse a dtype or device kind the engine does not declare (before anything starts)."""
        capabilities = cls.capabilities
        if dtype not in capabilities.dtypes:
            raise UsageError(f"backend {cls.name} does not support dtype {dtype}",
                             hint=f"choose one of {', '.join(capabilities.dtypes)}")
        if device.split(":")[0].lower() not in capabilities.devices:
            raise UsageError(f"backend {cls.name} does not run on {device}",
                             hint=f"it runs on {', '.join(capabilities.devices)}")

    @classmethod  # noqa: B027 (a hook: an engine without such limits refuses nothing)
    def check_engine_options(cls, options: Mapping[str, Any], model_dir: Path, model_config: Mapping[str, Any],
                             device: str) -> None:
        """Refuse engine options (parsed) that this model (``model_config``: its config.json) or
        this machine cannot take, before anything starts; an engine with such limits overrides this."""

    def load(self, options: LoadOptions) -> None:
        """Load the model; the dtype, device kind and engine options must be declared ones."""
        self.check_setup(options.dtype, options.device)
        options = replace(options, engine_options=self.parse_options(options.engine_options))
        log.info("loading %s on %s (%s, %s)", options.model_dir, self.name, options.dtype, options.device)
        self._load(options)
        self.load_options = options

    def generate(self, prompts: Sequence[np.ndarray], sampling: SamplingParams,
                 interceptors: Sequence[Interceptor] = (),
                 on_step: StepCallback | None = None,
                 forced: Sequence[np.ndarray] | None = None) -> list[Generation]:
        """Run every prompt (token ids) through the engine; interceptors see every wanted tensor.

        ``forced`` (teacher forcing): per request, the tokens to feed back instead of the
        engine's own choices; the outputs still record what the engine would have chosen.
        """
        if self.load_options is None:
            raise BackendError(f"backend {self.name}: generate() before load()")
        if not self.capabilities.tensors and self.wanted_tensors(interceptors):
            raise UsageError(f"backend {self.name} cannot observe intermediate tensors: it captures "
                             "tokens and logprobs only", hint="pass --tensors none")
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
        return intercept_all(interceptors, site, tensor)

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

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Decoder layers of the loaded model."""

    def wanted_tensors(self, interceptors: Sequence[Interceptor]) -> set[str]:
        """The canonical tensors some interceptor wants: engines hook only these."""
        return {name for name in all_names(self.num_layers, self.moe_layers)
                if any(i.wants(name) for i in interceptors)}

    @property
    def moe_layers(self) -> list[int]:
        """The loaded model's mixture-of-experts layers (their routing tensors, SPEC.md section 5),
        as its config.json declares them."""
        return moe.moe_layers(read_config(self.load_options.model_dir)) if self.load_options else []

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, by the model's own tokenizer: every engine here loads the HF
        tokenizer of the checkpoint into ``self.tokenizer``; one with another kind overrides this."""
        return list(self.tokenizer(text)["input_ids"])

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each of ``texts``, as :meth:`tokenize` gives them, in one call: a fast
        tokenizer encodes a batch on all its threads, and without the attention masks nobody
        reads it converts half as much to Python (selecting long prompts from a data set
        tokenizes thousands of records: 3x faster than one by one on ShareGPT)."""
        return [list(ids) for ids in self.tokenizer(texts, return_attention_mask=False)["input_ids"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_template(self) -> Callable[[list[dict[str, str]]], str] | None:
        """The tokenizer's chat template as a function of messages (``role``, ``content``) to
        prompt text, with the assistant's turn opened; None where the tokenizer has none.
        Conversations from a data set are rendered with it, as the model saw chats in training."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return partial(self.tokenizer.apply_chat_template, tokenize=False, add_generation_prompt=True)

    @abstractmethod
    def version(self) -> str:
        """Version of the engine's main package."""

    def engine_info(self) -> dict[str, Any]:
        """Engine settings that change numerics (recorded in ``meta/run.engine``)."""
        return {}

    def resolved_settings(self) -> dict[str, Any]:
        """The arithmetic settings (``ptrace.bundle_spec.settings.VOCABULARY``) the loaded engine
        uses, read back from its model and engine objects, not from config.json (recorded in
        ``meta/settings``). A key left out is recorded as "unknown": never guess one."""
        return {}
    def schedule(self) -> ScheduleInfo | None:
        """The engine steps of the last ``generate`` (``meta/schedule``): which requests ran
        together; None for engines that run one request at a time."""
        return None

    def parallel(self) -> ParallelInfo | None:
        """The parallel layout (``meta/parallel``): the loaded engine's sizes, and after a
        ``generate`` how its ranks held each tensor; None for an engine that runs on one rank."""
        return None

    def close(self) -> None:  # noqa: B027 (a hook: an engine that holds nothing releases nothing)
        """Release the engine (processes, device memory)."""
