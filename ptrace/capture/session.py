"""``capture``: run a model on one engine and freeze the run into a bundle."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ptrace.backends.base import Backend, Interceptor, LoadOptions
from ptrace.backends.registry import create_backend, declared_class, engine_python
from ptrace.bundle_spec import names as canonical
from ptrace.bundle_spec.dtypes import canonical as canonical_dtype
from ptrace.bundle_spec.layout import request_array
from ptrace.bundle_spec.packing import pack
from ptrace.bundle_spec.schema import (
    CaptureSettings,
    DatasetInfo,
    Document,
    ModelInfo,
    RequestRecord,
    RequestsInfo,
    RunInfo,
    SamplingParams,
    SettingsInfo,
    WhatIfInfo,
    WhatIfSpec,
    plain,
)
from ptrace.bundle_spec.settings import complete
from ptrace.bundle_spec.store import ZIP_SUFFIX, check_bundle_name, claim_output
from ptrace.bundle_spec.structure import open_bundle
from ptrace.bundle_spec.writer import BundleWriter
from ptrace.capture import batching, datasets, whatif
from ptrace.capture.engine_process import run_in_environment
from ptrace.capture.environment import Redactor, collect_environment
from ptrace.capture.inputs import Prompt, resolve_prompts
from ptrace.capture.model import describe_model
from ptrace.capture.recorder import StepSelection, TensorRecorder
from ptrace.errors import BackendError, UsageError

log = logging.getLogger("ptrace.capture")

MODES = ("full", "stats")


@dataclass(frozen=True)
class CaptureConfig:
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the config crosses into engine environments as JSON)."""
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaptureConfig:
        values = {name: _tuples(value) for name, value in data.items()}
        values["sampling"] = SamplingParams.from_dict(data.get("sampling", {}))
        values["settings"] = CaptureSettings.from_dict(data.get("settings", {}))
        values["whatifs"] = tuple(WhatIfSpec.from_dict(w) for w in data.get("whatifs", ()))
        if values.get("prompts_file") is not None:
            values["prompts_file"] = Path(values["prompts_file"])
        return cls(**values)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class Progress(Protocol):
    """Progress callback: ``(done, total, stage)``, ``stage`` naming the phase: loading the
    engine (``total`` None), selecting prompts from a data set, then the steps of each bundle
    written (named by the bundle)."""

    def __call__(self, done: int, total: int | None, stage: str | None = None, /) -> None: ...


def _check(config: CaptureConfig) -> StepSelection:
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
    if tuple(patterns) == ("none",):  # tokens and logprobs only
        return []
    known = canonical.all_names(num_layers, moe_layers)
    selected = canonical.select(known, patterns)
    unmatched = [p for p in patterns if not canonical.select(known, [p])]
    if unmatched:
        raise UsageError(f"--tensors {', '.join(unmatched)} matches no canonical tensor",
                         hint=canonical.naming_hint(num_layers, moe_layers))
    return selected


def capture(config: CaptureConfig, *, progress: Progress | None = None,
            interceptors: Sequence[Interceptor] = (), documents: Sequence[Document] = ()) -> Path:
    """Run ``config`` and write its bundle; returns the bundle's path.

    ``interceptors`` run before the recorder, so a tensor they replace is recorded as replaced
    (this is how error-injection what-ifs are captured). ``documents`` are extra metadata
    documents to store (a replay's ``meta/replay``).
    """
    return capture_runs([config], progress=progress, interceptors=interceptors,
                        documents=[documents])[0]


def capture_runs(configs: Sequence[CaptureConfig], *, progress: Progress | None = None,
                 interceptors: Sequence[Interceptor] = (),
                 documents: Sequence[Sequence[Document]] | None = None) -> list[Path]:
    """Several captures on one loaded engine (a replay's teacher-forced and free runs).

    They must share backend, model, dtype, device and engine options. When the engine is not
    installed here, they run in its engine environment (``ptrace envs``), in one process.
    """
    documents = list(documents) if documents is not None else [() for _ in configs]
    configs = [replace(c, dtype=canonical_dtype(c.dtype)) for c in configs]  # bf16 -> bfloat16
    for config in configs:
        check_bundle_name(Path(config.output))
    engine = {(c.backend, str(c.model), c.dtype, c.device, tuple(sorted(c.engine_options.items())),
               whatif.load_key(c.whatifs)) for c in configs}
    if len(engine) != 1 or len(documents) != len(configs):
        raise UsageError("capture_runs needs one engine setup for all its runs, and documents for each")
    declared = declared_class(configs[0].backend)
    model = describe_model(configs[0].model)
    # The data set's file is found here: the engine's environment need not have its package.
    configs = [replace(c, dataset=datasets.locate(c.dataset)) if c.dataset else c for c in configs]
    for config in configs:  # everything that can fail cheaply fails before the engine starts
        _check(config)
        declared.parse_options(config.engine_options)
        claim_output(Path(config.output), config.overwrite)
        if _select_tensors(config.settings.tensors, model.num_layers, model.moe_layers) and not declared.capabilities.tensors:
            raise UsageError(f"backend {declared.name} cannot observe intermediate tensors: it captures "
                             "tokens and logprobs only", hint="pass --tensors none")
        _check_whatifs(config, declared, model.num_layers, model.moe_layers)
    python = engine_python(configs[0].backend)
    if python is not None:
        if interceptors:
            raise UsageError(f"backend {configs[0].backend} runs in its engine environment: Python "
                             "interceptors cannot cross into it", hint=f"run this code with {python}")
        return run_in_environment(python, configs[0].backend, [c.to_dict() for c in configs], documents, progress)
    first = configs[0]
    overrides, engine_overrides = whatif.load_time(first.whatifs)
    backend = create_backend(first.backend)
    with ExitStack() as cleanup:
        model_dir = Path(first.model)
        if overrides:  # a model config what-if: the same weights under a changed config.json
            model_dir = cleanup.enter_context(whatif.patched_model(model_dir, overrides))
            model = replace(describe_model(model_dir), model_path=model.model_path, name=model.name,
                            model_path_given=model.model_path_given)
        cleanup.callback(backend.close)
        if progress:
            progress(0, None, f"loading {first.model} ({first.dtype}, {first.device})")
        backend.load(LoadOptions(model_dir, first.dtype, first.device,
                                 {**first.engine_options, **engine_overrides}))
        return [_capture_one(backend, config, model, progress, interceptors, docs)
                for config, docs in zip(configs, documents, strict=True)]


def _check_whatifs(config: CaptureConfig, backend: type[Backend], num_layers: int,
                   moe_layers: Sequence[int] = ()) -> None:
    if not config.whatifs:
        return
    if not backend.capabilities.replace and any(whatif.kind_of(s).on_tensors for s in config.whatifs):
        raise UsageError(f"backend {backend.name} cannot replace tensors: its what-ifs are load-time ones "
                         "(config, engine) only")
    if any(whatif.kind_of(s).needs_source for s in config.whatifs):
        if config.whatif_source is None:
            raise UsageError("a splice what-if needs the bundle to take values from")
        with open_bundle(config.whatif_source) as source:
            whatif.check(config.whatifs, num_layers=num_layers, source=source, moe_layers=moe_layers,
                         backend=backend)
    else:
        whatif.check(config.whatifs, num_layers=num_layers, source=None, moe_layers=moe_layers, backend=backend)


def _capture_one(backend: Backend, config: CaptureConfig, model: ModelInfo, progress: Progress | None,
                 interceptors: Sequence[Interceptor], documents: Sequence[Document]) -> Path:
    """One capture on the loaded engine, written as a ``*.zarr`` directory or a ``*.zarr.zip``."""
    target = Path(config.output)
    if not target.name.endswith(ZIP_SUFFIX):
        return _write_bundle(backend, config, target, model, progress, interceptors, documents)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:  # written as a directory, then packed: every member is known before the zip is made
        bundle = _write_bundle(backend, config, staging / "bundle.zarr", model, progress, interceptors,
                               documents, label=target.name)
        return pack(bundle, target, overwrite=config.overwrite)
    finally:
        shutil.rmtree(staging)


def _write_bundle(backend: Backend, config: CaptureConfig, output: Path, model: ModelInfo,
                  progress: Progress | None, interceptors: Sequence[Interceptor], documents: Sequence[Document],
                  label: str | None = None) -> Path:
    """The capture written as a bundle directory at ``output`` (``label``: the name progress
    shows, when that is not ``output``'s)."""
    settings, sampling = config.settings, config.sampling
    steps = StepSelection.parse(settings.steps)
    names = _select_tensors(settings.tensors, model.num_layers, model.moe_layers)
    parallel = backend.parallel()
    if settings.per_rank and parallel is not None:  # each rank's own shards as well
        names += canonical.per_rank_names(names, parallel.tensor_parallel_size)
    command = list(config.command if config.command is not None else sys.argv)
    redactor = Redactor.from_environment(os.environ, command)
    seeds = _seed_everything(backend, sampling.seed)
    prompts, dataset = _prompts(config, backend, model, progress)
    with BundleWriter(output, overwrite=config.overwrite) as writer:
        recorder = TensorRecorder(writer, names, settings.mode, steps)
        total = len(prompts) * sampling.max_new_tokens
        done = 0

        def on_step(_request: int, _step: int) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, f"writing {label or output.name}")

        forced = None if config.forced_tokens is None else [np.asarray(f, np.int64)
                                                              for f in config.forced_tokens]
        before, after = (whatif.WhatIfInterceptor(config.whatifs, model.num_layers, config.whatif_source,
                                                  after_record=phase, moe_layers=model.moe_layers)
                         for phase in (False, True))
        try:
            generations, schedule = batching.generate(backend, [p.ids for p in prompts], sampling,
                                                      [*interceptors, before, recorder, after], on_step, forced,
                                                      config.whatifs, _longest_prompt(model, sampling))
        finally:
            before.close()
            after.close()
        _check_coverage(backend, recorder, names, steps)
        records = _write_requests(writer, backend, prompts, generations, recorder, forced)
        run = RunInfo(backend=backend.name, backend_version=backend.version(), dtype=config.dtype,
                      device=config.device, seeds=seeds, sampling=sampling,
                      capture=settings,
                      engine=backend.engine_info(), engine_options=dict(config.engine_options))
        if config.whatifs:
            documents = [*documents, WhatIfInfo(tuple(config.whatifs), whatif.labels(config.whatifs))]
        if schedule is not None:
            documents = [*documents, schedule]
        if backend.parallel() is not None:  # the layout of this generate
            documents = [*documents, backend.parallel()]
        resolved = SettingsInfo(complete(backend.resolved_settings()))
        for document in (model, run, resolved, collect_environment(), RequestsInfo(tuple(records), dataset),
                         *documents):
            writer.write_document(type(document).from_dict(redactor.scrub(document.to_dict())))
        from ptrace import __version__

        return writer.commit(ptrace_version=__version__, command=redactor.scrub(command),
                             mode=settings.mode, tensor_names=names)


def _prompts(config: CaptureConfig, backend: Backend, model: ModelInfo,
             progress: Progress | None) -> tuple[list[Prompt], DatasetInfo | None]:
    """The run's prompts, and how they were drawn when they come from a data set."""
    if config.dataset is None:
        return resolve_prompts(texts=config.prompts, prompts_file=config.prompts_file,
                               token_ids=config.prompt_token_ids, random_input_ids=config.random_input_ids,
                               num_requests=config.num_requests, seed=config.sampling.seed,
                               tokenize=backend.tokenize), None
    longest = config.max_prompt_tokens
    if longest is None:
        longest = _longest_prompt(model, config.sampling)
    return datasets.select(config.dataset, count=config.num_requests, seed=config.sampling.seed,
                           min_tokens=config.min_prompt_tokens or 1, max_tokens=longest,
                           tokenize_batch=backend.tokenize_batch, chat_template=backend.chat_template(),
                           progress=progress and (lambda done, total, stage: progress(
                               done, total, f"selecting {config.num_requests} prompts: {stage}")))


def _longest_prompt(model: ModelInfo, sampling: SamplingParams) -> int | None:
    """The longest prompt the model holds besides the new tokens (None: its config does not say)."""
    if "max_position_embeddings" not in model.config:
        return None
    return int(model.config["max_position_embeddings"]) - sampling.max_new_tokens


def _seed_everything(backend: Backend, seed: int) -> dict[str, int]:
    random.seed(seed)
    np.random.seed(seed)
    return {"python": seed, "numpy": seed, **backend.set_seed(seed)}


def _check_coverage(backend: Backend, recorder: TensorRecorder, names: list[str],
                    steps: StepSelection) -> None:
    """Never let an engine that silently skipped hooks produce an empty capture that looks fine."""
    if not names:
        return
    if not recorder.captured_any:  # no selected step ran (e.g. --steps beyond the end)
        raise UsageError("no step selected by --steps was run", hint="check --steps and --max-new-tokens")
    missing = [n for n in names if n not in recorder.seen]
    if missing:
        raise BackendError(f"backend {backend.name} produced no {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}: its hooks did not fire")


def _write_requests(writer: BundleWriter, backend: Backend, prompts: list[Prompt], generations: list,
                    recorder: TensorRecorder, forced: list[np.ndarray] | None) -> list[RequestRecord]:
    records = []
    for index, (prompt, generation) in enumerate(zip(prompts, generations, strict=True)):
        writer.append(request_array("prompt_ids"), index, prompt.ids)
        if forced is not None:  # what was fed differs from prompt + outputs (SPEC.md section 2)
            fed = forced[index][: len(generation.output_ids) - 1]
            writer.append(request_array("input_ids"), index, np.concatenate([prompt.ids, fed]))
        for leaf in ("output_ids", "topk_ids", "topk_logprobs",
                     "prompt_logprobs", "prompt_topk_ids", "prompt_topk_logprobs"):
            value = getattr(generation, leaf)
            if value is not None:
                writer.append(request_array(leaf), index, value)
        writer.append(request_array("positions"), index, recorder.positions(index))
        records.append(RequestRecord(
            index=index, prompt=prompt.text, prompt_len=int(prompt.ids.shape[0]),
            output_len=int(generation.output_ids.shape[0]),
            output_text=backend.detokenize(generation.output_ids.tolist()),
            output_tokens=tuple(backend.detokenize([t]) for t in generation.output_ids.tolist()),
            finish_reason=generation.finish_reason, source=prompt.source))
    return records
