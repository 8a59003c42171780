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
from dataclasses import dataclass, replace
from pathlib import Path

from ptrace.backends.registry import declared_class, engine_python, entries
from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.reader import Bundle
from ptrace.capture.session import Progress, capture_runs
from ptrace.compare import Comparison, combine, compare
from ptrace.compare.calibration import calibrate
from ptrace.compare.judgment import not_calibrated, with_note
from ptrace.errors import BackendUnavailableError
from ptrace.replay.localize import check_source, localize
from ptrace.replay.plan import (
    FREE,
    TEACHER,
    Judgment,
    ReplayConfig,
    ReplayPlan,
    default_output,
    open_source,
    recorded_model,
)

log = logging.getLogger("ptrace.replay")


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


def replay(config: ReplayConfig, *, progress: Progress | None = None) -> ReplayResult:
    with open_source(config.bundle) as source:
        plan = ReplayPlan.of(source, config)
        prefix = config.output or default_output(Path(config.bundle), config.backend, plan.dtype, plan.device)
        if config.localize:  # refuse a source it cannot localize before any engine starts
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


