"""``replay``: re-run a bundle's inputs on another engine, dtype or device, and compare.

A replay is an ordinary capture (the same inputs, seeds, sampling, tensor selection and steps as
the source, with the user's overrides) written as a sibling bundle that carries ``meta/replay``.
Two modes, both by default:

- teacher-forced: the target is fed the source's generated tokens, so every position stays
  aligned past the first divergent token (per-position tensor and logit metrics);
- free-running: the target generates its own tokens (token agreement, first divergent step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import ReplayInfo
from ptrace.capture.model import describe_model
from ptrace.capture.session import CaptureConfig, Progress, capture_runs
from ptrace.errors import ModelError, UsageError
from ptrace.compare import Comparison, combine, compare

TEACHER, FREE = "teacher-forced", "free-running"
MODES = (TEACHER, FREE)


class ModelMismatchError(ModelError):
    """The replay model's weights are not the ones the bundle was captured with."""


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


@dataclass(frozen=True)
class ReplayResult:
    """Where the replays went, and their comparisons with the source (by mode)."""

    source: Path
    bundles: dict[str, Path]
    comparisons: dict[str, Comparison]

    @property
    def primary(self) -> Comparison:
        """Tensors from the teacher-forced run (aligned everywhere), tokens from the free run."""
        tensors = self.comparisons.get(TEACHER) or self.comparisons[FREE]
        tokens = self.comparisons.get(FREE) or tensors
        return combine(tensors=tensors, tokens=tokens)


def default_output(bundle: Path, backend: str, dtype: str, device: str) -> Path:
    stem = bundle.name.removesuffix(".zip").removesuffix(".zarr")
    return bundle.with_name(f"{stem}.replay-{backend}-{dtype}-{device.replace(':', '')}")


def _check_model(source: Bundle, config: ReplayConfig) -> tuple[Path, bool]:
    model_path = Path(config.model or source.model.model_path)
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
    unknown = set(config.modes) - set(MODES)
    if unknown or not config.modes:
        raise UsageError(f"unknown replay mode(s) {', '.join(sorted(unknown)) or '(none)'}",
                         hint=f"modes are {', '.join(MODES)}")
    with open_bundle(config.bundle) as source:
        model_path, mismatch = _check_model(source, config)
        run = source.run
        dtype, device = config.dtype or run.dtype, config.device or run.device
        prefix = config.output or default_output(Path(config.bundle), config.backend, dtype, device)
        prompts = tuple(tuple(source.prompt_ids(r).tolist()) for r in range(source.num_requests))
        outputs = tuple(tuple(source.output_ids(r).tolist()) for r in range(source.num_requests))
        max_new = max(len(o) for o in outputs)
        if any(len(o) != max_new for o in outputs):
            raise UsageError("the source's requests generated different numbers of tokens (EOS); "
                             "replay needs equal lengths", hint="capture without --stop-at-eos")
        sampling = run.sampling
        runs = []
        for mode in config.modes:
            out = prefix.with_name(f"{prefix.name}.{mode.split('-')[0]}.zarr")
            runs.append(CaptureConfig(
                backend=config.backend, model=model_path, output=out, dtype=dtype, device=device,
                prompt_token_ids=prompts, seed=run.seeds.get("python", sampling.seed),
                max_new_tokens=max_new, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, logprobs=sampling.logprobs, prompt_logprobs=sampling.prompt_logprobs,
                ignore_eos=sampling.ignore_eos, tensors=tuple(run.capture.get("tensors") or ()) or ("none",),
                steps=run.capture.get("steps"), mode=source.mode,
                engine_options={**dict(run.engine_options), **config.engine_options} if config.backend == run.backend
                else dict(config.engine_options),
                overwrite=config.overwrite, command=config.command or ("ptrace", "replay", str(config.bundle)),
                forced_tokens=outputs if mode == TEACHER else None,
            ))
        documents = [[ReplayInfo(source_bundle_id=source.manifest.bundle_id, source_path=str(config.bundle),
                                 mode=mode, model_mismatch=mismatch, model_path=str(model_path))]
                     for mode in config.modes]
        # One engine load for both runs (in the engine's own environment if it is not here).
        bundles = dict(zip(config.modes, capture_runs(runs, progress=progress, documents=documents),
                           strict=True))
        comparisons = {}
        for mode, path in bundles.items():
            with open_bundle(path) as replayed:
                comparisons[mode] = compare(source, replayed, threshold_overrides=config.threshold_overrides)
    return ReplayResult(source=Path(config.bundle), bundles=bundles, comparisons=comparisons)
