"""``capture``: run a model on one engine and freeze the run into a bundle.

``capture_runs`` resolves its configs into a :class:`~ptrace.capture.plan.CapturePlan` (every
check done, no engine started), then executes it here (:func:`execute`) or in the engine's own
environment (``capture.engine_process``, whose child executes the same plan).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import numpy as np

from ptrace.backends.base import Backend, Interceptor, LoadOptions
from ptrace.backends.registry import create_backend
from ptrace.bundle_spec.layout import request_array
from ptrace.bundle_spec.names import per_rank_names
from ptrace.bundle_spec.packing import pack
from ptrace.bundle_spec.schema import (
    DatasetInfo,
    Document,
    ModelInfo,
    RequestRecord,
    RequestsInfo,
    RunInfo,
    SamplingParams,
    SettingsInfo,
    WhatIfInfo,
    document_at,
)
from ptrace.bundle_spec.settings import complete
from ptrace.bundle_spec.store import ZIP_SUFFIX
from ptrace.bundle_spec.writer import BundleWriter
from ptrace.capture import batching, datasets, whatif
from ptrace.capture.engine_process import run_in_environment
from ptrace.capture.environment import Redactor, collect_environment
from ptrace.capture.inputs import Prompt, resolve_prompts
from ptrace.capture.plan import CaptureConfig, CapturePlan, RunPlan, plan_captures
from ptrace.capture.recorder import StepSelection, TensorRecorder
from ptrace.errors import BackendError, UsageError

log = logging.getLogger("ptrace.capture")


class Progress(Protocol):
    """Progress callback: ``(done, total, stage)``, ``stage`` naming the phase: loading the
    engine (``total`` None), selecting prompts from a data set, then the steps of each bundle
    written (named by the bundle)."""

    def __call__(self, done: int, total: int | None, stage: str | None = None, /) -> None: ...


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
    plan = plan_captures(configs, documents)
    if plan.python is not None:
        if interceptors:
            raise UsageError(f"backend {plan.backend} runs in its engine environment: Python "
                             "interceptors cannot cross into it", hint=f"run this code with {plan.python}")
        return run_in_environment(plan, progress)
    return execute(plan, progress=progress, interceptors=interceptors)


def execute(plan: CapturePlan, *, progress: Progress | None = None,
            interceptors: Sequence[Interceptor] = ()) -> list[Path]:
    """Run a checked plan in this process: load the engine once, write each run's bundle."""
    backend = create_backend(plan.backend)
    with ExitStack() as cleanup:
        model_dir = plan.model_dir
        if plan.config_overrides:  # a model config what-if: the same weights under a changed config.json
            model_dir = cleanup.enter_context(whatif.patched_model(model_dir, dict(plan.config_overrides)))
        cleanup.callback(backend.close)
        if progress:
            progress(0, None, f"loading {plan.model_dir} ({plan.dtype}, {plan.device})")
        backend.load(LoadOptions(model_dir, plan.dtype, plan.device, plan.engine_options))
        return [_capture_one(backend, run, plan.model, progress, interceptors) for run in plan.runs]


def _capture_one(backend: Backend, run: RunPlan, model: ModelInfo, progress: Progress | None,
                 interceptors: Sequence[Interceptor]) -> Path:
    """One capture on the loaded engine, written as a ``*.zarr`` directory or a ``*.zarr.zip``."""
    target = Path(run.config.output)
    if not target.name.endswith(ZIP_SUFFIX):
        return _write_bundle(backend, run, target, model, progress, interceptors)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:  # written as a directory, then packed: every member is known before the zip is made
        bundle = _write_bundle(backend, run, staging / "bundle.zarr", model, progress, interceptors,
                               label=target.name)
        return pack(bundle, target, overwrite=run.config.overwrite)
    finally:
        shutil.rmtree(staging)


def _write_bundle(backend: Backend, run: RunPlan, output: Path, model: ModelInfo,
                  progress: Progress | None, interceptors: Sequence[Interceptor],
                  label: str | None = None) -> Path:
    """The capture written as a bundle directory at ``output`` (``label``: the name progress
    shows, when that is not ``output``'s)."""
    config = run.config
    settings, sampling = config.settings, config.sampling
    names = list(run.tensor_names)
    parallel = backend.parallel()
    if settings.per_rank and parallel is not None:  # each rank's own shards as well
        names += per_rank_names(names, parallel.tensor_parallel_size)
    command = list(config.command if config.command is not None else sys.argv)
    redactor = Redactor.from_environment(os.environ, command)
    seeds = _seed_everything(backend, sampling.seed)
    prompts, dataset = _prompts(config, backend, model, progress)
    with BundleWriter(output, overwrite=config.overwrite) as writer:
        recorder = TensorRecorder(writer, names, settings.mode, run.steps)
        total = len(prompts) * sampling.max_new_tokens
        done = 0

        def on_step(_request: int, _step: int) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, total, f"writing {label or output.name}")

        forced = None if config.forced_tokens is None else [np.asarray(f, np.int64)
                                                              for f in config.forced_tokens]
        before, after = (whatif.WhatIfInterceptor(run.injections, config.whatif_source, after_record=phase)
                         for phase in (False, True))
        try:
            generations, schedule = batching.generate(backend, [p.ids for p in prompts], sampling,
                                                      [*interceptors, before, recorder, after], on_step, forced,
                                                      config.whatifs, _longest_prompt(model, sampling))
        finally:
            before.close()
            after.close()
        _check_coverage(backend, recorder, names, run.steps)
        records = _write_requests(writer, backend, prompts, generations, recorder, forced)
        info = RunInfo(backend=backend.name, backend_version=backend.version(), dtype=config.dtype,
                       device=config.device, seeds=seeds, sampling=sampling,
                       capture=settings,
                       engine=backend.engine_info(), engine_options=dict(config.engine_options))
        documents = [document_at(path).from_dict(data) for path, data in run.documents.items()]
        if config.whatifs:
            documents = [*documents, WhatIfInfo(tuple(config.whatifs), whatif.labels(config.whatifs))]
        if schedule is not None:
            documents = [*documents, schedule]
        if backend.parallel() is not None:  # the layout of this generate
            documents = [*documents, backend.parallel()]
        resolved = SettingsInfo(complete(backend.resolved_settings()))
        for document in (model, info, resolved, collect_environment(), RequestsInfo(tuple(records), dataset),
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
