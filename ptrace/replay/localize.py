"""``--localize``: measure each layer's own error, and find the layers that matter.

In a plain replay a layer's error is its own plus everything it inherited. The localization
replay hands every layer the reference's input instead (``restore`` of ``layers.*.out`` and of
the attention's ``k``/``v``: the engine's own values are recorded, the source's are passed on),
so each recorded layer output carries that layer's error alone: its **local error**. Next to the
propagated error of the plain replay this says where error is made and where it is only
amplified.

When the replay's tokens diverge from the source's, a bisection in the spirit of Polygraphy's
``debug precision`` looks for the smallest set of layers whose output, spliced from the
reference, restores the reference's tokens: layers are tried in order of their local error, and
every prefix of that order runs (free-running) on one engine load.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.names import forward_key, layer_index
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import WhatIfSpec
from ptrace.capture.session import Progress, capture_runs
from ptrace.compare import Comparison, compare
from ptrace.compare.results import Bisection, LocalError
from ptrace.compare.summary import with_summary
from ptrace.errors import UsageError
from ptrace.replay.plan import FREE, TEACHER, ReplayConfig, ReplayPlan

#: What the localization replay restores from the source: every layer's input, and the cache.
RESTORED = ("layers.*.out", "layers.*.k", "layers.*.v")
#: The tensors whose local error is reported (branches first: they name the op that errs).
REPORTED = ("attn", "mlp", "out")


def check_source(source: Bundle) -> None:
    missing = [n for n in (f"layers.{i}.{part}" for i in range(source.model.num_layers) for part in ("out", "k", "v"))
               if not all(source.has_tensor(r, n) for r in range(source.num_requests))]
    if missing:
        raise UsageError(f"--localize needs the source's full layer outputs and k/v, and {source.path} lacks "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
                         hint="capture the source with --mode full --tensors '*'")


def localize(source: Bundle, config: ReplayConfig, prefix: Path, replayed: Comparison,
             progress: Progress | None = None) -> Comparison:
    """``replayed`` (the plain replay's comparison) with measured local errors, and a bisection
    when its tokens diverge."""
    check_source(source)
    plan = ReplayPlan.of(source, replace(config, modes=(TEACHER,)))
    restore = tuple(WhatIfSpec("restore", (glob,)) for glob in RESTORED)
    runs, documents = plan.runs(prefix.with_name(f"{prefix.name}.localize"), restore)
    (path,) = capture_runs(runs, progress=progress, documents=documents)
    with open_bundle(path) as local_run:
        local = compare(source, local_run, threshold_overrides=config.threshold_overrides)
    propagated = {t.name: t.rel_err for t in replayed.tensors}
    errors = [LocalError(tensor=t.name, local_error=t.rel_err, propagated_error=propagated.get(t.name, float("nan")),
                         amplification=(propagated[t.name] / t.rel_err if t.rel_err > 0 and t.name in propagated
                                        else None))
              for t in sorted(local.tensors, key=lambda t: forward_key(t.name))
              if layer_index(t.name) is not None and t.name.rsplit(".", 1)[1] in REPORTED]
    branches = [e for e in errors if e.tensor.rsplit(".", 1)[1] != "out"]
    largest = max(branches or errors, key=lambda e: e.local_error, default=None)
    result = replace(replayed, local_errors=errors, local_error_source="measured",
                     largest_local_error=largest.tensor if largest and largest.local_error > 0 else None)
    if any(r.first_divergent_step is not None for r in replayed.requests) and FREE in config.modes:
        result = replace(result, bisection=bisect(source, config, prefix, errors, progress))
    return with_summary(result)


def bisect(source: Bundle, config: ReplayConfig, prefix: Path, errors: list[LocalError],
           progress: Progress | None = None) -> Bisection:
    """The smallest prefix of the layers ordered by local error whose spliced outputs make every
    request's free-running tokens the source's."""
    outs = sorted((e for e in errors if e.tensor.endswith(".out")), key=lambda e: -e.local_error)
    order = [layer_index(e.tensor) for e in outs]
    plan = ReplayPlan.of(source, replace(config, modes=(FREE,)))
    runs, documents = [], []
    for k in range(1, len(order) + 1):
        spec = WhatIfSpec("splice", tuple(f"layers.{i}.out" for i in sorted(order[:k])))
        configs, docs = plan.runs(prefix.with_name(f"{prefix.name}.bisect-{k}"), (spec,))
        runs += configs
        documents += docs
    tried, found = [], None
    for k, path in enumerate(capture_runs(runs, progress=progress, documents=documents), start=1):
        with open_bundle(path) as spliced:
            restored = sum(spliced.output_ids(r).tolist() == source.output_ids(r).tolist()
                           for r in range(source.num_requests))
        tried.append({"layers": sorted(order[:k]), "restored_requests": restored})
        if found is None and restored == source.num_requests:
            found = tried[-1]
    total = source.num_requests
    if found is None:
        best = max(tried, key=lambda t: t["restored_requests"], default={"layers": [], "restored_requests": 0})
        return Bisection(layers=best["layers"], restored_requests=best["restored_requests"], total_requests=total,
                         tried=tried, sentence=f"no set of layers restores every request (at best {best['restored_requests']}"
                                               f"/{total}, restoring layers {_listed(best['layers'])})")
    return Bisection(layers=found["layers"], restored_requests=total, total_requests=total, tried=tried,
                     sentence=f"restoring layer{'s' if len(found['layers']) > 1 else ''} {_listed(found['layers'])} "
                              f"to the reference's output fixes {total}/{total} requests")


def _listed(layers: list[int]) -> str:
    names = [str(i) for i in layers]
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)

