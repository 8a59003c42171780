"""What a capture is, before any engine runs: its config, and the plan ``capture_runs`` resolves
the configs into, every check done.

:func:`plan_captures` finds everything that can be wrong with a config while it is still cheap:
the input source, sampling, mode, steps, tensors, engine options, what-ifs (a splice's source
bundle opened and checked), the output's name and whether it exists. It reads the model's
directory (its fingerprints and config.json: the layers, the mixture-of-experts ones) and the
backend's declarations, never the engine. ``capture.session`` then only executes the plan, in
this process or, sent as msgpack through ``bundle_spec.records``, in the engine's own environment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ptrace.backends.base import Backend
from ptrace.backends.registry import declared_class, engine_python
from ptrace.bundle_spec import names as canonical
from ptrace.bundle_spec.dtypes import canonical as canonical_dtype
from ptrace.bundle_spec.records import Record
from ptrace.bundle_spec.schema import CaptureSettings, Document, ModelInfo, SamplingParams, WhatIfSpec
from ptrace.bundle_spec.store import check_bundle_name, claim_output
from ptrace.bundle_spec.structure import open_bundle
from ptrace.capture import datasets, whatif
from ptrace.capture.model import describe_model
from ptrace.capture.recorder import StepSelection
from ptrace.errors import UsageError

MODES = ("full", "stats")


@dataclass(frozen=True)
class CaptureConfig(Record):
    """Everything ``ptrace capture`` takes; the CLI builds one of these from its flags.

    ``sampling`` and ``settings`` are the documents the bundle records (``run.sampling``,
    ``run.capture``): a replay passes the source's documents back whole, so nothing it should
    repeat can be dropped on the way.
    """

    backend: str
    model: str | Path
    output: str | Path
    dtype: str = "float32"
    device: str = "cpu"
    prompts: tuple[str, ...] = ()
    prompts_file: Path | None = None
    #: Prompts given as token ids (the Python API's and replay's input source).
    prompt_token_ids: tuple[tuple[int, ...], ...] = ()
    random_input_ids: int | None = None
    #: A data set of conversations, ``sharegpt[:PATH]`` (``ptrace.capture.datasets``).
    dataset: str | None = None
    #: How many prompts: random ones, or drawn from ``dataset``.
    num_requests: int = 1
    #: Prompt lengths drawn from ``dataset`` (default: at least 1 token, at most what the model
    #: holds besides ``max_new_tokens``).
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    #: How tokens are chosen; its seed also seeds python, numpy, the engine and random inputs.
    sampling: SamplingParams = SamplingParams()
    #: What to record.
    settings: CaptureSettings = CaptureSettings()
    engine_options: Mapping[str, str] = field(default_factory=dict)
    overwrite: bool = False
    command: tuple[str, ...] | None = None
    #: Teacher forcing: per request, the tokens to feed back instead of the engine's choices.
    forced_tokens: tuple[tuple[int, ...], ...] | None = None
    #: Error-injection what-ifs applied to this run (``ptrace.capture.whatif``), recorded in
    #: ``meta/whatif``; ``splice`` takes its values from ``whatif_source``.
    whatifs: tuple[WhatIfSpec, ...] = ()
    whatif_source: str | None = None


@dataclass(frozen=True)
class RunPlan(Record):
    """One config resolved: what its bundle records, each selection parsed once."""

    #: The config, its dtype canonical (``bf16`` -> ``bfloat16``) and its data set's file found
    #: (the engine's environment need not have the package that ships it).
    config: CaptureConfig
    steps: StepSelection
    #: The canonical names ``config.settings.tensors`` selects, forward order.
    tensor_names: tuple[str, ...]
    injections: tuple[whatif.Injection, ...]
    #: Documents to store besides the capture's own (a replay's ``meta/replay``), as stored:
    #: node path -> document.
    documents: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class CapturePlan(Record):
    """Captures that share one engine load (a replay's teacher-forced and free runs), checked."""

    backend: str
    #: The model directory as given, and the model as described from its directory, with a config what-if's overrides in its
    #: ``config`` (what the engine loads): its layers decide the tensors and the what-ifs' targets.
    model_dir: Path
    model: ModelInfo
    dtype: str
    device: str
    #: The configs' engine options and those the load-time what-ifs set, checked by the backend.
    engine_options: Mapping[str, str]
    #: A config what-if's changes to config.json: the engine loads a patched copy of the model.
    config_overrides: Mapping[str, Any]
    #: The engine environment's Python the captures run with; None: this process.
    python: Path | None
    runs: tuple[RunPlan, ...]


def plan_captures(configs: Sequence[CaptureConfig],
                  documents: Sequence[Sequence[Document]] | None = None) -> CapturePlan:
    """``configs`` (sharing backend, model, dtype, device and engine options) resolved into one
    plan, or the first thing wrong with them raised; ``documents``: each run's extra ones."""
    documents = list(documents) if documents is not None else [() for _ in configs]
    configs = [replace(c, dtype=canonical_dtype(c.dtype)) for c in configs]
    for config in configs:
        check_bundle_name(Path(config.output))
    engine = {(c.backend, str(c.model), c.dtype, c.device, tuple(sorted(c.engine_options.items())),
               whatif.load_key(c.whatifs)) for c in configs}
    if len(engine) != 1 or len(documents) != len(configs):
        raise UsageError("capture_runs needs one engine setup for all its runs, and documents for each")
    first = configs[0]
    declared = declared_class(first.backend)
    declared.check_setup(first.dtype, first.device)
    config_overrides, engine_overrides = whatif.load_time(first.whatifs)
    model = describe_model(first.model, config_overrides)
    engine_options = {**first.engine_options, **engine_overrides}
    declared.check_engine_options(declared.parse_options(engine_options), Path(first.model), model.config,
                                  first.device)
    runs = tuple(_plan_run(config, docs, declared, model) for config, docs in zip(configs, documents, strict=True))
    return CapturePlan(backend=first.backend, model_dir=Path(first.model), model=model, dtype=first.dtype, device=first.device,
                       engine_options=engine_options, config_overrides=config_overrides,
                       python=engine_python(first.backend), runs=runs)


def _plan_run(config: CaptureConfig, documents: Sequence[Document], backend: type[Backend],
              model: ModelInfo) -> RunPlan:
    if config.dataset:
        config = replace(config, dataset=datasets.locate(config.dataset))
    steps = _check(config)
    claim_output(Path(config.output), config.overwrite)
    names = _select_tensors(config.settings.tensors, model.num_layers, model.moe_layers)
    if names and not backend.capabilities.tensors:
        raise UsageError(f"backend {backend.name} cannot observe intermediate tensors: it captures "
                         "tokens and logprobs only", hint="pass --tensors none")
    return RunPlan(config=config, steps=steps, tensor_names=tuple(names),
                   injections=_check_whatifs(config, backend, model),
                   documents={document.path: document.to_dict() for document in documents})


def _check(config: CaptureConfig) -> StepSelection:
    """The config's own consistency, and its step selection parsed."""
    sampling = config.sampling
    sources = sum([bool(config.prompts), config.prompts_file is not None, bool(config.prompt_token_ids),
                   config.random_input_ids is not None, config.dataset is not None])
    if sources != 1:
        raise UsageError("give exactly one input source: --prompt, --prompts-file, --random-input-ids or --dataset")
    if config.dataset is None and (config.min_prompt_tokens, config.max_prompt_tokens) != (None, None):
        raise UsageError("--min-prompt-tokens and --max-prompt-tokens select prompts from a --dataset")
    if config.settings.mode not in MODES:
        raise UsageError(f"unknown mode {config.settings.mode!r}", hint="use --mode full or --mode stats")
    if sampling.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0 or sampling.logprobs < 0:
        raise UsageError("sampling needs temperature >= 0, 0 < top-p <= 1, top-k >= 0, logprobs >= 0")
    return StepSelection.parse(config.settings.steps)


def _select_tensors(patterns: Sequence[str], num_layers: int, moe_layers: Sequence[int] = ()) -> list[str]:
    """The canonical names ``patterns`` select (``("none",)``: none); a pattern that matches
    nothing is refused."""
    if tuple(patterns) == ("none",):  # tokens and logprobs only
        return []
    known = canonical.all_names(num_layers, moe_layers)
    selected = canonical.select(known, patterns)
    unmatched = [p for p in patterns if not canonical.select(known, [p])]
    if unmatched:
        raise UsageError(f"--tensors {', '.join(unmatched)} matches no canonical tensor",
                         hint=canonical.naming_hint(num_layers, moe_layers))
    return selected


def _check_whatifs(config: CaptureConfig, backend: type[Backend], model: ModelInfo) -> tuple[whatif.Injection, ...]:
    """The config's what-ifs checked against the model, the backend and a splice's source."""
    if not config.whatifs:
        return ()
    if not backend.capabilities.replace and any(whatif.kind_of(s).on_tensors for s in config.whatifs):
        raise UsageError(f"backend {backend.name} cannot replace tensors: its what-ifs are load-time ones "
                         "(config, engine) only")
    with ExitStack() as stack:
        source = None
        if any(whatif.kind_of(s).needs_source for s in config.whatifs):
            if config.whatif_source is None:
                raise UsageError("a splice what-if needs the bundle to take values from")
            source = stack.enter_context(open_bundle(config.whatif_source))
        return whatif.check(config.whatifs, num_layers=model.num_layers, source=source,
                            moe_layers=model.moe_layers, backend=backend)
