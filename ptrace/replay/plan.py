"""What a replay is, before any engine runs: its config, the source checked (every chunk, the
model's weights, the modes), and the plan every capture of one replay shares.

``replay.session`` runs a plan (with its calibration); ``replay.localize`` and ``replay.whatif``
run variants of it. Nothing here starts an engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.bundle_spec.dtypes import canonical as canonical_dtype
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import CaptureSettings, Document, ReplayInfo, SamplingParams, WhatIfSpec
from ptrace.capture.model import describe_model
from ptrace.capture.plan import CaptureConfig
from ptrace.compare.noise import coarser
from ptrace.compare.thresholds import thresholds_for
from ptrace.errors import BundleCorruptError, ModelError, ModelMismatchError, UsageError

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
