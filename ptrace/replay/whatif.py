"""``whatif``: replay a bundle with errors injected on purpose, and watch them propagate.

Every what-if run is a replay of the source (teacher-forced and free-running) with injections
(:mod:`ptrace.capture.whatif`). It is compared with an **unperturbed baseline replay on the same
engine, dtype and device**, so its numbers are the effect of the injection alone, not of the
engine; the baseline itself is compared with the source as any replay is. One engine load serves
the baseline and every what-if that changes tensors; a what-if that changes the model config or
the engine options needs a load of its own.

A sweep (``--sweep std=1e-5,1e-4,...``) runs every what-if once per value, ``--repeats N`` once
per noise seed, so the results make curves: divergence rate and KL against the swept value.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ptrace.backends.registry import declared_class
from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.names import forward_key
from ptrace.bundle_spec.schema import WhatIfSpec
from ptrace.capture import whatif
from ptrace.capture.session import Progress, capture_runs
from ptrace.compare import Comparison, combine, compare
from ptrace.compare.judgment import judge
from ptrace.compare.results import Propagation, TensorResult, WhatIfResult
from ptrace.compare.summary import with_summary
from ptrace.errors import UsageError
from ptrace.replay.plan import FREE, TEACHER, ReplayConfig, ReplayPlan, open_source


@dataclass(frozen=True)
class WhatIfConfig:
    """A replay (engine, dtype, device, output...) plus the what-ifs to run on it."""

    replay: ReplayConfig
    #: Each entry is one what-if run: its injections applied together.
    whatifs: tuple[tuple[WhatIfSpec, ...], ...]
    #: ``(parameter, values)``: every what-if once per value.
    sweep: tuple[str, tuple[float, ...]] | None = None
    #: Runs per what-if (and sweep value), with noise seeds seed, seed + 1, ...
    repeats: int = 1


def default_output(bundle: Path, backend: str, dtype: str, device: str) -> Path:
    stem = bundle.name.removesuffix(".zip").removesuffix(".zarr")
    return bundle.with_name(f"{stem}.whatif-{backend}-{dtype}-{device.replace(':', '')}")


@dataclass(frozen=True)
class _Run:
    name: str
    specs: tuple[WhatIfSpec, ...]
    sweep_value: float | None
    repeat: int


def _grid(config: WhatIfConfig) -> list[_Run]:
    """Every run: each what-if once per sweep value (if it has the swept parameter, else once),
    each of those once per repeat (noise seeds seed, seed + 1, ...)."""
    if not config.whatifs:
        raise UsageError("no what-if to run", hint="pass --inject SPEC (e.g. noise:layers.*.k:std=1e-3)")
    if config.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    param, values = config.sweep or (None, ())
    if param is not None and not any(_sweepable(s, param) for specs in config.whatifs for s in specs):
        raise UsageError(f"--sweep {param}: no what-if has a parameter {param}")
    runs = []
    for i, specs in enumerate(config.whatifs):
        swept = param is not None and any(_sweepable(s, param) for s in specs)
        for j, value in enumerate(values if swept else (None,)):
            changed = tuple(whatif.swept(s, param, value) if swept and _sweepable(s, param) else s for s in specs)
            for k in range(config.repeats):
                seeded = tuple(replace(s, seed=s.seed + k) for s in changed)
                name = f"w{i}" + (f"-v{j}" if swept else "") + (f"-r{k}" if config.repeats > 1 else "")
                runs.append(_Run(name, seeded, value, k))
    return runs


def _capturing_injections(plan: ReplayPlan, grid: list[_Run]) -> ReplayPlan:
    """``plan`` also capturing every tensor a what-if changes (in the baseline too), so that the
    first affected tensor is the injection point itself, captured by the source or not."""
    globs = [glob for run in grid for spec in run.specs for glob in spec.tensors]
    captured = tuple(g for g in plan.settings.tensors if g != "none")
    return replace(plan, settings=replace(plan.settings, tensors=tuple(dict.fromkeys((*captured, *globs)))))


def _sweepable(spec: WhatIfSpec, param: str) -> bool:
    kind = whatif.kind_of(spec)
    return param in kind.params or (not kind.on_tensors and param in spec.params)


def run_whatifs(config: WhatIfConfig, *, progress: Progress | None = None) -> Comparison:
    """Run the baseline and every what-if; the baseline's comparison with the source, with every
    what-if's result in ``whatifs``."""
    replay_config = config.replay
    grid = _grid(config)
    with open_source(replay_config.bundle) as source:
        plan = _capturing_injections(ReplayPlan.of(source, replace(replay_config, modes=(TEACHER, FREE))), grid)
        backend = declared_class(replay_config.backend)
        for run in grid:  # everything that can fail cheaply fails before any engine starts
            whatif.check(run.specs, num_layers=source.model.num_layers, source=source,
                         moe_layers=source.model.moe_layers, backend=backend)
        folder = replay_config.output or default_output(Path(replay_config.bundle), replay_config.backend,
                                                        plan.dtype, plan.device)
        folder.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list[_Run]] = defaultdict(list)
        for run in grid:
            groups[whatif.load_key(run.specs)].append(run)
        baseline_key = whatif.load_key(())
        ordered = [(baseline_key, [_Run("baseline", (), None, 0), *groups.pop(baseline_key, [])]), *groups.items()]
        bundles: dict[str, dict[str, Path]] = {}
        for _, runs in ordered:  # one engine load per group; the bar follows each capture
            captures, documents = [], []
            for run in runs:
                configs, docs = plan.runs(folder / run.name, run.specs)
                captures += configs
                documents += docs
            paths = capture_runs(captures, documents=documents, progress=progress)
            for index, run in enumerate(runs):
                bundles[run.name] = {TEACHER: paths[2 * index], FREE: paths[2 * index + 1]}
        baseline = _replay_comparison(source, bundles["baseline"], replay_config.threshold_overrides)
        results = [_result(run, bundles["baseline"], bundles[run.name], source, config,
                           replay_config.threshold_overrides) for run in grid]
    return with_summary(replace(baseline, whatifs=results))


def _replay_comparison(reference: Any, runs: dict[str, Path], overrides: dict[str, float]) -> Comparison:
    """Tensors from the teacher-forced run, tokens from the free-running one, as ``replay`` does,
    judged as ``compare`` judges them (uncalibrated: a dtype change says so)."""
    comparisons = {}
    for mode, path in runs.items():
        with open_bundle(path) as replayed:
            comparisons[mode] = judge(reference, replayed, threshold_overrides=overrides)
    return combine(tensors=comparisons[TEACHER], tokens=comparisons[FREE])


def _result(run: _Run, baseline: dict[str, Path], runs: dict[str, Path], source: Any, config: WhatIfConfig,
            overrides: dict[str, float]) -> WhatIfResult:
    with open_bundle(baseline[TEACHER]) as base_teacher, open_bundle(baseline[FREE]) as base_free:
        with open_bundle(runs[TEACHER]) as teacher, open_bundle(runs[FREE]) as free:
            tensors = compare(base_teacher, teacher, threshold_overrides=overrides)
            tokens = compare(base_free, free, threshold_overrides=overrides)
    vs_source = _replay_comparison(source, runs, overrides)
    requests = tokens.requests
    diverged = [r.first_divergent_step for r in requests]
    kl = [value for r in tensors.requests for value in r.kl]
    ordered = sorted(tensors.tensors, key=lambda t: forward_key(t.name))
    affected = [t for t in ordered if _changed(t)]
    first = affected[0] if affected else None
    propagation = [Propagation(t.name, t.rel_err) for t in ordered
                   if first is not None and forward_key(t.name) >= forward_key(first.name) and not t.stats_only]
    outs = [p for p in propagation if p.tensor.endswith(".out")]
    amplification = (outs[-1].error / propagation[0].error
                     if outs and propagation and propagation[0].error > 0 else None)
    label = whatif.labels(run.specs)
    rate = sum(d is not None for d in diverged) / len(diverged) if diverged else 0.0
    result = WhatIfResult(
        label=label, spec=[s.to_dict() for s in run.specs],
        sweep_param=config.sweep[0] if config.sweep else None, sweep_value=run.sweep_value, repeat=run.repeat,
        divergence_rate=rate, token_match_rate=tokens.token_match_rate, first_divergent_step=diverged,
        mean_kl=sum(kl) / len(kl) if kl else 0.0, max_kl=max(kl, default=0.0),
        first_affected_tensor=first.name if first else None, propagation=propagation,
        amplification=amplification,
        vs_source={"verdict": vs_source.verdict, "summary": vs_source.summary,
                   "first_divergent_tensor": vs_source.first_divergent_tensor},
        sentence="", bundles={mode: str(path) for mode, path in runs.items()},
        stability=combine(tensors=tensors, tokens=tokens).stability,
        tokens=[list(r.tokens_b) for r in requests],
        token_texts=[[str(text) for text in texts] for texts in tokens.b.get("output_tokens") or []],
        routing=tensors.routing,
        schedule=tensors.b.get("schedule") if any(s.kind == whatif.Batch.name for s in run.specs) else None)
    return replace(result, sentence=sentence(result))


def _changed(t: TensorResult) -> bool:
    """Whether a what-if changed ``t`` against the baseline: any element, or in a stats capture
    (the long-sequence runs) the scale of any row; its error propagation needs the elements."""
    return t.rel_err > 0 if t.stats_only else t.max_abs_err > 0


def sentence(result: WhatIfResult) -> str:
    """``noise std=0.001 in layers.*.k,layers.*.v: 7/16 requests diverge, first at step 12; error
    grows 40x from layers.0.k to layers.3.out``."""
    steps = [s for s in result.first_divergent_step if s is not None]
    n = len(result.first_divergent_step)
    tokens = (f"{len(steps)}/{n} requests diverge, first at step {min(steps)}" if steps
              else f"0/{n} requests diverge")
    if result.first_affected_tensor is None:
        return f"{result.label}: no tensor changed; {tokens}"
    growth = ""
    if result.amplification is not None and result.propagation:
        last = [p for p in result.propagation if p.tensor.endswith(".out")][-1].tensor
        growth = f"; error grows {result.amplification:.3g}x from {result.first_affected_tensor} to {last}"
    flips = (f"; {result.routing['flip_count']}/{result.routing['choices']} expert choices differ"
             if result.routing else "")
    return f"{result.label}: {tokens}; mean KL {result.mean_kl:.3g}{growth}{flips}"
