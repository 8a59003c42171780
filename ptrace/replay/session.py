"""``replay``: re-run a bundle's inputs on another engine, dtype or device, and compare.

A replay is an ordinary capture (the same inputs, seeds, sampling, tensor selection and steps as
the source, with the user's overrides) written as a sibling bundle that carries ``meta/replay``.
Two modes, both by default:

- teacher-forced: the target is fed the source's generated tokens, so every position stays
  aligned past the first divergent token (per-position tensor and logit metrics);
- free-running: the target generates its own tokens (token agreement, first divergent step).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ptrace.backends.registry import declared_class, engine_python, entries
from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.bundle_spec.dtypes import canonical as canonical_dtype
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import CaptureSettings, Document, ReplayInfo, SamplingParams, WhatIfSpec
from ptrace.capture.model import describe_model
from ptrace.capture.session import CaptureConfig, Progress, capture_runs
from ptrace.compare import Comparison, combine, compare
from ptrace.compare.calibration import calibrate
from ptrace.compare.judgment import not_calibrated, with_note
from ptrace.compare.noise import coarser
from ptrace.compare.thresholds import thresholds_for
from ptrace.errors import BackendUnavailableError, BundleCorruptError, ModelError, ModelMismatchError, UsageError

log = logging.getLogger("ptrace.replay")

TEACHER, FREE = "teacher-forced", "free-running"
MODES = (TEACHER, FREE)


@dataclass(frozen=True)
class ReplayConfig:
    bundle: Path
    backend: str
    output: Path | None = None
    dtype: str | None = None
    device: str | None = None
    model: Path | None = None
    allow_model_mismatch: bool = False
    modes: tuple[str, ...] = MODES
    engine_options: dict[str, str] = field(default_factory=dict)
    overwrite: bool = False
    threshold_overrides: dict[str, float] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    #: Also replay on a trusted engine at the replay's dtype and judge error ratios
    #: (``compare.calibration``); None: when the dtype or device differs from the source's.
    calibrate: bool | None = None
    #: Also measure each layer's own error, and bisect the layers that restore the tokens
    #: (``replay.localize``).
    localize: bool = False


@dataclass(frozen=True)
class ReplayResult:
    """Where the replays went, their comparisons with the source (by mode), and the one result
    that answers the user: ``primary`` (tensors from the teacher-forced run, aligned everywhere;
    tokens from the free run; judged against the calibration run and localized when asked)."""

    source: Path
    bundles: dict[str, Path]
    comparisons: dict[str, Comparison]
    primary: Comparison


def _primary(comparisons: dict[str, Comparison]) -> Comparison:
    tensors = comparisons.get(TEACHER) or comparisons[FREE]
    tokens = comparisons.get(FREE) or tensors
    return combine(tensors=tensors, tokens=tokens)


def default_output(bundle: Path, backend: str, dtype: str, device: str) -> Path:
    stem = bundle.name.removesuffix(".zip").removesuffix(".zarr")
    return bundle.with_name(f"{stem}.replay-{backend}-{dtype}-{device.replace(':', '')}")


@contextmanager
def open_source(path: Path) -> Iterator[Bundle]:
    """The bundle to replay, opened after a complete validation (every chunk's checksum read):
    a corrupt source is refused before any engine starts and anything is written, not found
    by the comparison after the engine ran."""
    problems = validate_bundle(path)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise BundleCorruptError(f"{path}: {problems[0]}{more}; nothing was run",
                                 hint=f"`ptrace validate {path}` lists every problem; re-capture or re-copy it")
    with open_bundle(path) as source:
        yield source


def recorded_model(source: Bundle) -> Path:
    """The source's model directory: where the capture recorded it (absolute), else as it was
    given there (bundles of older versions, or a copy moved with its model), from here."""
    candidates = [Path(p) for p in (source.model.model_path, source.model.model_path_given) if p]
    return next((p for p in candidates if p.is_dir()), candidates[0])


def _check_model(source: Bundle, config: ReplayConfig) -> tuple[Path, bool]:
    model_path = Path(config.model or recorded_model(source))
    try:
        model = describe_model(model_path)
    except ModelError as exc:
        raise ModelError(f"{exc}; the bundle was captured with {source.model.model_path}",
                         hint="pass --model PATH to the same weights") from None
    mismatch = model.fingerprint != source.model.fingerprint
    if mismatch and not config.allow_model_mismatch:
        raise ModelMismatchError(
            f"{model_path} is not the model of {source.path} (weight fingerprint "
            f"{model.fingerprint[:12]} != {source.model.fingerprint[:12]})",
            hint="point --model at the captured weights, or pass --allow-model-mismatch to compare anyway")
    return model_path, mismatch


def replay(config: ReplayConfig, *, progress: Progress | None = None) -> ReplayResult:
    with open_source(config.bundle) as source:
        plan = ReplayPlan.of(source, config)
        prefix = config.output or default_output(Path(config.bundle), config.backend, plan.dtype, plan.device)
        if config.localize:  # refuse a source it cannot localize before any engine starts
            from ptrace.replay.localize import check_source, localize

            check_source(source)
        trusted, calibration, note = _calibration(source, config, plan, prefix, progress)
        plan = replace(plan, judged_by=Judgment(calibration_prefix=trusted, note=note))
        bundles, comparisons = _run(source, plan, prefix, progress)
        primary = _primary(comparisons)
        primary = calibrate(primary, calibration) if calibration is not None else with_note(primary, note)
        if config.localize:
            primary = localize(source, config, prefix, primary, progress)
    return ReplayResult(source=Path(config.bundle), bundles=bundles, comparisons=comparisons, primary=primary)


def _run(source: Bundle, plan: ReplayPlan, prefix: Path,
         progress: Progress | None) -> tuple[dict[str, Path], dict[str, Comparison]]:
    """One replay's captures on one engine load (in its engine environment if not here), and
    their comparisons with the source."""
    runs, documents = plan.runs(prefix)
    bundles = dict(zip(plan.config.modes, capture_runs(runs, progress=progress, documents=documents), strict=True))
    comparisons = {}
    for mode, path in bundles.items():
        with open_bundle(path) as replayed:
            comparisons[mode] = compare(source, replayed, threshold_overrides=plan.config.threshold_overrides)
    return bundles, comparisons


def _calibration(source: Bundle, config: ReplayConfig, plan: ReplayPlan, prefix: Path,
                 progress: Progress | None) -> tuple[Path | None, Comparison | None, str | None]:
    """The calibration replay to judge this replay against: (its output prefix, its comparison
    with the source), or why there is none. Run before the replay, so that the replay records
    the calibration that exists.

    Wanted when asked, or by default when the dtype or device differs from the source's. The
    trusted engine is the source's own, else HF transformers, else any other engine, the first
    that runs the replay's dtype here and is not the replay itself (its engine, dtype and device:
    a run compared with itself proves nothing). With none, the replay is judged against the
    dtype's noise floor, and says it was not independently calibrated."""
    changed = (plan.dtype, plan.device) != (source.run.dtype, source.run.device)
    if not (config.calibrate or (config.calibrate is None and changed)):
        return None, None, (not_calibrated(source.run.dtype, plan.dtype, "not calibrated (--no-calibrate)")
                            if changed else None)
    for backend in dict.fromkeys((source.run.backend, "torch", *sorted(entries()))):
        try:
            cls = declared_class(backend)
            trusted = _calibration_config(source, config, plan, prefix, backend)
            if plan.dtype not in cls.capabilities.dtypes or (backend, trusted.device) == (config.backend, plan.device):
                continue
            engine_python(backend)  # raises when it can run nowhere here
            _, calibrations = _run(source, ReplayPlan.of(source, trusted), trusted.output, progress)
        except BackendUnavailableError as exc:
            log.info("not calibrating on %s: %s", backend, exc)
            continue
        return trusted.output, _primary(calibrations), None
    return None, None, not_calibrated(source.run.dtype, plan.dtype,
                                      f"not independently calibrated: no engine other than {config.backend} "
                                      f"runs {plan.dtype} here")


def _calibration_config(source: Bundle, config: ReplayConfig, plan: ReplayPlan, prefix: Path,
                        backend: str) -> ReplayConfig:
    """The calibration replay on ``backend``: at the replay's dtype, on the replay's device where
    that engine has it, on the source's weights."""
    devices = declared_class(backend).capabilities.devices
    device = plan.device if plan.device.split(":")[0] in devices else source.run.device
    model = recorded_model(source)
    return replace(config, backend=backend, dtype=plan.dtype, device=device, engine_options={}, calibrate=False,
                   localize=False,
                   model=model if model.exists() else config.model, allow_model_mismatch=False,
                   output=prefix.with_name(f"{prefix.name}.calibration-{backend}-{plan.dtype}"))


@dataclass(frozen=True)
class Judgment:
    """What a replay is judged against, recorded in its ``meta/replay`` (``compare.judgment``):
    the calibration replay's bundles (``prefix.<mode>.zarr``) or why there is none."""

    calibration_prefix: Path | None = None
    note: str | None = None


@dataclass(frozen=True)
class ReplayPlan:
    """What every run replaying a bundle shares: the source's inputs, sampling and capture
    settings, the engine setup, and the modes. ``runs`` makes the captures of one replay (or of
    one what-if, with its injections)."""

    config: ReplayConfig
    source_id: str
    source_dtype: str
    model_path: Path
    mismatch: bool
    dtype: str
    device: str
    prompts: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]
    sampling: SamplingParams
    settings: CaptureSettings
    engine_options: dict[str, str]
    judged_by: Judgment = Judgment()

    @classmethod
    def of(cls, source: Bundle, config: ReplayConfig) -> ReplayPlan:
        unknown = set(config.modes) - set(MODES)
        if unknown or not config.modes:
            raise UsageError(f"unknown replay mode(s) {', '.join(sorted(unknown)) or '(none)'}",
                             hint=f"modes are {', '.join(MODES)}")
        model_path, mismatch = _check_model(source, config)
        run = source.run
        outputs = tuple(tuple(source.output_ids(r).tolist()) for r in range(source.num_requests))
        max_new = max(len(o) for o in outputs)
        if any(len(o) != max_new for o in outputs):
            raise UsageError("the source's requests generated different numbers of tokens (EOS); "
                             "replay needs equal lengths", hint="capture without --stop-at-eos")
        same_engine = config.backend == run.backend
        return cls(config=config, source_id=source.manifest.bundle_id, source_dtype=run.dtype, model_path=model_path,
                   mismatch=mismatch, dtype=canonical_dtype(config.dtype or run.dtype), device=config.device or run.device,
                   prompts=tuple(tuple(source.prompt_ids(r).tolist()) for r in range(source.num_requests)),
                   outputs=outputs, sampling=replace(run.sampling, max_new_tokens=max_new), settings=run.capture,
                   engine_options={**(dict(run.engine_options) if same_engine else {}), **config.engine_options})

    def runs(self, prefix: Path, whatifs: tuple[WhatIfSpec, ...] = ()) -> tuple[list[CaptureConfig], list[list[Document]]]:
        """The captures (one per mode, written to ``prefix.<mode>.zarr``) and their documents."""
        config = self.config
        runs, documents = [], []
        for mode in config.modes:
            runs.append(CaptureConfig(  # the source's sampling and capture settings, whole
                backend=config.backend, model=self.model_path, output=_bundle_path(prefix, mode),
                dtype=self.dtype, device=self.device, prompt_token_ids=self.prompts, sampling=self.sampling,
                settings=self.settings, engine_options=self.engine_options, overwrite=config.overwrite,
                command=config.command or ("ptrace", "replay", str(config.bundle)),
                forced_tokens=self.outputs if mode == TEACHER else None,
                whatifs=whatifs, whatif_source=str(config.bundle) if whatifs else None))
            calibration = self.judged_by.calibration_prefix
            documents.append([ReplayInfo(
                source_bundle_id=self.source_id, source_path=str(config.bundle), mode=mode,
                model_mismatch=self.mismatch, model_path=str(self.model_path),
                calibration_path=_bundle_path(calibration, mode).name if calibration else "",
                calibration_note=self.judged_by.note or "",
                thresholds=thresholds_for(coarser(self.source_dtype, self.dtype), config.threshold_overrides).to_dict())])
        return runs, documents


def _bundle_path(prefix: Path, mode: str) -> Path:
    """Where a replay of ``mode`` with output prefix ``prefix`` is written."""
    return prefix.with_name(f"{prefix.name}.{mode.split('-')[0]}.zarr")
