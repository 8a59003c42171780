"""Error-injection what-ifs: perturb chosen tensors of a run, as data that crosses into engines.

A what-if is a :class:`~ptrace.bundle_spec.schema.WhatIfSpec` (plain data: it travels to an
engine environment inside the capture config and is recorded in ``meta/whatif``). This module
gives each *kind* its behaviour and applies the specs to a run:

- tensor kinds (``noise``, ``ulp``, ``cast``, ``scale``, ``zero``, ``splice``) become a
  :class:`WhatIfInterceptor` that runs before the recorder, so the bundle records what the
  engine computed *with* the injection, and a replaced k or v stays in the engine's KV cache;
- load-time kinds (``config``: model config overrides such as ``rms_norm_eps``; ``engine``:
  engine options such as ``kv_cache_dtype``) change how the engine is loaded;
- ``batch`` changes which requests run together (:mod:`ptrace.capture.batching`), and for some
  of its modes the engine options that shape batches.

Kinds register themselves in :data:`KINDS`; ``parse`` reads the short text form
``KIND[:GLOBS][:KEY=VALUE]...`` (``noise:layers.*.k,layers.*.v:std=1e-3:positions=0-99``).
Everything that can be wrong with a spec is found by :func:`check` before an engine starts.
"""

from __future__ import annotations

import json
import re
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from ptrace.backends.base import Backend, EngineTensor, Interceptor, TensorSite
from ptrace.backends.model_dir import read_config
from ptrace.bundle_spec import names as canonical
from ptrace.bundle_spec.dtypes import canonical as canonical_dtype
from ptrace.bundle_spec.reader import Bundle
from ptrace.bundle_spec.schema import WhatIfSpec
from ptrace.bundle_spec.structure import open_bundle
from ptrace.capture.recorder import StepSelection
from ptrace.errors import PtraceError, UsageError

#: Spec fields the text form reads as selectors rather than kind parameters.
_SELECTORS = ("steps", "positions", "layers", "requests", "ranks", "seed")
_RANGE = re.compile(r"^(\d+)(?:(-)(\d*))?$")


# -- kinds -----------------------------------------------------------------------------------

class Kind(ABC):
    """What one kind of what-if does. ``params`` declares its parameters and their defaults
    (None: required); numeric ones can be swept."""

    name: ClassVar[str]
    help: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {}
    #: Applied to tensors as they are computed (False: at load time).
    on_tensors: ClassVar[bool] = True
    #: Reads the source bundle's captured tensors.
    needs_source: ClassVar[bool] = False
    #: Applied after the recorder saw the tensor: the bundle keeps what the engine computed, and
    #: only what follows sees the change.
    after_record: ClassVar[bool] = False

    @classmethod
    def check(cls, spec: WhatIfSpec) -> None:
        """Refuse unknown or missing parameters, and values the kind cannot use."""
        unknown = sorted(set(spec.params) - set(cls.params))
        if unknown:
            raise UsageError(f"what-if {cls.name} has no parameter {', '.join(unknown)}",
                             hint=f"its parameters: {', '.join(cls.params) or 'none'}")
        missing = [p for p, default in cls.params.items() if default is None and p not in spec.params]
        if missing:
            raise UsageError(f"what-if {cls.name} needs {', '.join(missing)}", hint=_usage(cls))

    @classmethod
    def globs(cls, spec: WhatIfSpec) -> tuple[str, ...]:
        """The tensor globs the spec changes: those it names."""
        return spec.tensors

    def param(self, spec: WhatIfSpec, name: str) -> Any:
        return spec.params.get(name, self.params[name])

    @abstractmethod
    def apply(self, rows: np.ndarray, spec: WhatIfSpec, site: TensorSite, context: _Context) -> np.ndarray:
        """``rows`` (float64, ``[selected rows, ...]``) after the injection."""


KINDS: dict[str, type[Kind]] = {}


def kind(cls: type[Kind]) -> type[Kind]:
    """Register a what-if kind under its name."""
    KINDS[cls.name] = cls
    return cls


@kind
class Noise(Kind):
    name = "noise"
    help = "add seeded Gaussian noise: std=ABSOLUTE, or rel=FRACTION of each row's RMS"
    params = {"std": 0.0, "rel": 0.0}

    @classmethod
    def check(cls, spec: WhatIfSpec) -> None:
        super().check(spec)
        if float(spec.params.get("std", 0)) < 0 or float(spec.params.get("rel", 0)) < 0:
            raise UsageError("what-if noise needs std >= 0 and rel >= 0")

    def apply(self, rows, spec, site, context):
        std = float(self.param(spec, "std"))
        rel = float(self.param(spec, "rel"))
        flat = rows.reshape(rows.shape[0], -1)
        scale = np.full((flat.shape[0], 1), std)
        if rel:
            scale = scale + rel * np.sqrt(np.mean(flat**2, axis=1, keepdims=True))
        if not scale.any():
            return rows
        noise = context.rng(spec, site).standard_normal(flat.shape)
        return (flat + noise * scale).reshape(rows.shape)


@kind
class LastBit(Kind):
    name = "ulp"
    help = "flip the last mantissa bit of a seeded fraction of elements (msprobe's bit_noise)"
    params = {"fraction": 1.0}

    def apply(self, rows, spec, site, context):
        native = rows.astype(context.dtype)
        bits = native.view(f"u{native.dtype.itemsize}")
        flip = context.rng(spec, site).random(bits.shape) < float(self.param(spec, "fraction"))
        return np.where(flip, bits ^ 1, bits).astype(bits.dtype).view(native.dtype).astype(np.float64)


@kind
class Cast(Kind):
    name = "cast"
    help = "round-trip through dtype=float16|bfloat16|float8_e4m3fn|float8_e5m2|float32"
    params = {"dtype": None}
    DTYPES: ClassVar[dict[str, np.dtype]] = {
        "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
        "bfloat16": np.dtype(ml_dtypes.bfloat16), "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
        "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2)}

    @classmethod
    def check(cls, spec: WhatIfSpec) -> None:
        super().check(spec)
        if canonical_dtype(str(spec.params["dtype"])) not in cls.DTYPES:
            raise UsageError(f"what-if cast: unknown dtype {spec.params['dtype']!r}",
                             hint=f"choose one of {', '.join(cls.DTYPES)}")

    def apply(self, rows, spec, site, context):
        return rows.astype(self.DTYPES[canonical_dtype(spec.params["dtype"])]).astype(np.float64)


@kind
class Scale(Kind):
    name = "scale"
    help = "multiply by factor=F"
    params = {"factor": None}

    def apply(self, rows, spec, site, context):
        return rows * float(spec.params["factor"])


@kind
class Zero(Kind):
    name = "zero"
    help = "replace with zeros"

    def apply(self, rows, spec, site, context):
        return np.zeros_like(rows)


@kind
class Splice(Kind):
    name = "splice"
    help = "replace with the source bundle's captured value (what if this tensor were the reference's)"
    needs_source = True

    def apply(self, rows, spec, site, context):
        return context.source_rows(site, rows.shape[0])


@kind
class Restore(Splice):
    name = "restore"
    help = ("record the engine's own value, then hand the source bundle's value to what follows: each "
            "layer then works on the reference's input, so its recorded error is its own (--localize)")
    after_record = True


@kind
class Route(Splice):
    name = "route"
    help = ("force the source bundle's expert choices in mixture-of-experts layers (weights=1: its "
            "combine weights too; else the router's own weights of those experts): does routing explain "
            "the divergence? Select layers with layers=FIRST-LAST")
    params = {"weights": 0}

    @classmethod
    def check(cls, spec: WhatIfSpec) -> None:
        super().check(spec)
        if spec.tensors:
            raise UsageError("what-if route takes no tensor names: it replaces layers.*.experts",
                             hint="select layers with route:layers=0-1, add the weights with weights=1")

    @classmethod
    def globs(cls, spec: WhatIfSpec) -> tuple[str, ...]:
        parts = ("experts", "expert_weights") if int(spec.params.get("weights", 0)) else ("experts",)
        return tuple(f"layers.*.{part}" for part in parts)


@kind
class ConfigOverride(Kind):
    name = "config"
    help = "override model config.json keys at load time, e.g. rms_norm_eps=1e-5 rope_theta=1e6"
    on_tensors = False

    @classmethod
    def check(cls, spec: WhatIfSpec) -> None:
        if not spec.params:
            raise UsageError("what-if config needs at least one KEY=VALUE", hint=_usage(cls))

    def apply(self, rows, spec, site, context):
        raise NotImplementedError  # load-time kind


@kind
class EngineOverride(ConfigOverride):
    name = "engine"
    help = "load the engine with other options, e.g. kv_cache_dtype=fp8"


@kind
class Batch(Kind):
    name = "batch"
    help = ("run the requests in another batch: solo (each alone), fillers=N (among N seeded filler "
            "prompts), max_num_batched_tokens=K (chunked prefill), prefix_cache=on (prompts warmed "
            "into the prefix cache first), invariant=on (vLLM's batch-invariant mode); on an engine that "
            "runs one request at a time (torch): padded=N (each request in a padded batch of N + 1 rows)")
    params = {"solo": False, "fillers": 0, "max_num_batched_tokens": 0, "prefix_cache": "off", "invariant": "off",
              "padded": 0}
    #: The engine option of engines that run each request alone but can pad it into a batch.
    PADDED_OPTION: ClassVar[str] = "padded_batch"
    on_tensors = False
    #: Parameters the text form takes as a bare word (``batch:solo``).
    flags: ClassVar[tuple[str, ...]] = ("solo",)
    _SWITCHES = ("prefix_cache", "invariant")

    @classmethod
    def check(cls, spec: WhatIfSpec) -> None:
        super().check(spec)
        given = [p for p in cls.params if spec.params.get(p, cls.params[p]) != cls.params[p]]
        if len(given) != 1:
            raise UsageError(f"what-if batch needs exactly one of {', '.join(cls.params)}"
                             + (f", not {' and '.join(given)}" if given else ""), hint="e.g. batch:solo, batch:fillers=16, batch:max_num_batched_tokens=64, "
                                  "batch:prefix_cache=on, batch:invariant=on")
        (mode,) = given
        value = spec.params[mode]
        if mode in cls._SWITCHES and value != "on":
            raise UsageError(f"what-if batch:{mode}={value}: the only other value than off is on")
        if mode in ("fillers", "max_num_batched_tokens", "padded") and (not isinstance(value, int) or value < 1):
            raise UsageError(f"what-if batch:{mode}={value}: expected a whole number >= 1")
        if mode == "solo" and value is not True:
            raise UsageError("what-if batch:solo takes no value")
        if spec.tensors or spec.steps or spec.positions or spec.layers or spec.requests:
            raise UsageError(f"what-if batch:{mode} changes whole batches: it takes no tensors, steps, "
                             "positions, layers or requests")

    @staticmethod
    def mode(spec: WhatIfSpec) -> tuple[str, Any]:
        """The one parameter a batch spec sets, and its value."""
        (mode,) = [(p, v) for p, v in spec.params.items() if v != Batch.params[p]]
        return mode

    @classmethod
    def engine_options(cls, spec: WhatIfSpec) -> dict[str, Any]:
        """The engine options the spec loads the engine with (the rest happens at generation)."""
        mode, value = cls.mode(spec)
        if mode == "max_num_batched_tokens":
            return {"max_num_batched_tokens": value, "enable_chunked_prefill": True}
        if mode == "prefix_cache":
            return {"enable_prefix_caching": True}
        if mode == "invariant":
            return {"batch_invariant": True}
        if mode == "padded":
            return {cls.PADDED_OPTION: value}
        return {}

    @classmethod
    def refusal(cls, spec: WhatIfSpec, backend: type[Backend]) -> str | None:
        """Why ``backend`` cannot run ``spec`` (None: it can): a padded batch needs an engine that
        pads, every other mode one that batches."""
        if cls.mode(spec)[0] == "padded":
            if not any(option.name == cls.PADDED_OPTION for option in backend.options):
                return f"backend {backend.name} has no padded batches (it batches without padding)"
        elif not backend.capabilities.batched:
            return f"backend {backend.name} runs one request at a time, it cannot batch"
        return None

    def apply(self, rows, spec, site, context):
        raise NotImplementedError  # applied to whole batches, by ptrace.capture.batching


def _usage(cls: type[Kind]) -> str:
    params = ":".join(f"{p}={'VALUE' if d is None else d}" for p, d in cls.params.items())
    return f"e.g. {cls.name}:GLOBS{':' + params if params else ''} ({cls.help})"


def kind_of(spec: WhatIfSpec) -> type[Kind]:
    if spec.kind not in KINDS:
        raise UsageError(f"unknown what-if kind {spec.kind!r}", hint=f"kinds: {', '.join(KINDS)}")
    return KINDS[spec.kind]


# -- the text form -----------------------------------------------------------------------------

def parse(text: str) -> WhatIfSpec:
    """``KIND[:GLOBS][:KEY=VALUE]...``; selectors (steps, positions, layers, requests, seed) are
    keys like the kind's parameters: ``noise:layers.*.k,layers.*.v:std=1e-3:positions=0-99``."""
    kind_name, *parts = text.strip().split(":")
    tensors: tuple[str, ...] = ()
    params: dict[str, Any] = {}
    selectors: dict[str, Any] = {}
    flags = getattr(KINDS.get(kind_name), "flags", ())
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep and part.strip() in flags:
            params[part.strip()] = True
        elif not sep:
            if tensors:
                raise UsageError(f"--inject {text!r}: two tensor selections ({','.join(tensors)} and {part})",
                                 hint="join globs with commas: layers.*.k,layers.*.v")
            tensors = tuple(g.strip() for g in part.split(",") if g.strip())
        elif key in _SELECTORS:
            selectors[key] = (tuple(int(r) for r in value.split(",")) if key in ("requests", "ranks")
                              else int(value) if key == "seed" else value)
        else:
            params[key] = _number(value)
    spec = WhatIfSpec(kind=kind_name, tensors=tensors, params=params, **selectors)
    kind_of(spec).check(spec)
    return spec


def split_joined(text: str) -> list[str]:
    """``noise:...+splice:...`` -> its injections ('+' before a kind name joins them; a '+' in
    a number such as 1e+3 does not)."""
    return re.split(r"\+(?=[a-z_]+(?::|$))", text)


def _number(value: str) -> Any:
    """Numbers as numbers (sweepable), anything else as given."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def read_file(path: Path) -> list[tuple[WhatIfSpec, ...]]:
    """``--inject-file``: a JSON list of what-ifs, each a spec map (SPEC.md section 3.7) or a
    list of them applied together in one run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read what-if file {path}: {exc}") from None
    runs = []
    for entry in data if isinstance(data, list) else [data]:
        specs = []
        for item in entry if isinstance(entry, list) else [entry]:
            try:
                spec = WhatIfSpec.from_dict(item)
            except PtraceError as exc:
                raise UsageError(f"{path}: {exc}") from None
            kind_of(spec).check(spec)
            specs.append(spec)
        runs.append(tuple(specs))
    return runs


def describe(spec: WhatIfSpec) -> str:
    """One line for humans: ``noise std=0.001 in layers.*.k,layers.*.v at positions 0-99``."""
    params = " ".join(k if v is True else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in spec.params.items())
    where = [f"in {','.join(spec.tensors)}"] if spec.tensors else []
    where += [f"{key} {value}" for key, value in (("steps", spec.steps), ("positions", spec.positions),
                                                  ("layers", spec.layers)) if value is not None]
    if spec.requests:
        where.append(f"requests {','.join(map(str, spec.requests))}")
    if spec.ranks:
        where.append(f"ranks {','.join(map(str, spec.ranks))}")
    return " ".join(part for part in (spec.kind, params, *where) if part)


# -- checks before any engine starts ----------------------------------------------------------

@dataclass(frozen=True)
class Injection:
    """One what-if checked against a model: its spec, and what it selects, parsed once (plain
    data: it travels to an engine environment inside the capture plan)."""

    spec: WhatIfSpec
    steps: StepSelection
    #: Inclusive absolute positions; None: every position.
    positions: tuple[int, int] | None
    #: The canonical names it changes, its layer range applied (none for load-time kinds).
    names: tuple[str, ...]


def check(specs: Sequence[WhatIfSpec], *, num_layers: int, source: Bundle | None,
          moe_layers: Sequence[int] = (), backend: type[Backend] | None = None) -> tuple[Injection, ...]:
    """Every problem a what-if can have, raised before an engine loads (``backend``: the
    engine's class, for what only some engines can do); when there is none, the specs resolved."""
    known = canonical.all_names(num_layers, moe_layers)
    injections = []
    if sum(spec.kind == Batch.name for spec in specs) > 1:
        raise UsageError("one batch what-if per run: " + "; ".join(describe(s) for s in specs if s.kind == Batch.name),
                         hint="run them side by side: one --inject each")
    for spec in specs:
        kind_cls = kind_of(spec)
        kind_cls.check(spec)
        where = f"what-if {describe(spec)}"
        refusal = Batch.refusal(spec, backend) if kind_cls is Batch and backend is not None else None
        if refusal:
            raise UsageError(f"{where}: {refusal}",
                             hint="batch:padded=N runs on torch; the other batch what-ifs on a batched engine (vllm)")
        if kind_cls.on_tensors:
            if not kind_cls.globs(spec):
                raise UsageError(f"{where}: name the tensors to change", hint=_usage(kind_cls))
            for glob in kind_cls.globs(spec):
                if not canonical.select(known, [glob]):
                    raise UsageError(f"{where}: {glob!r} matches no canonical tensor of this model",
                                     hint=canonical.naming_hint(num_layers, moe_layers))
        positions = _parse_range(spec.positions, "positions")
        _parse_range(spec.layers, "layers")
        steps = StepSelection.parse(spec.steps)
        names = targets(spec, known) if kind_cls.on_tensors else []
        if kind_cls.needs_source:
            if source is None:
                raise UsageError(f"{where}: a splice needs a source bundle to take values from")
            missing = [n for n in names if not all(source.has_tensor(r, n) for r in range(source.num_requests))]
            if missing:
                raise UsageError(f"{where}: {source.path} has no full tensor {', '.join(missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''} to splice in",
                                 hint="capture the source with --mode full and those --tensors")
        injections.append(Injection(spec, steps, positions, tuple(names)))
    return tuple(injections)


def _parse_range(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None:
        return None
    match = _RANGE.match(str(text).strip())
    if not match:
        raise UsageError(f"what-if {what}={text}: expected FIRST-LAST, FIRST- or N (e.g. 0-99)")
    first = int(match.group(1))
    last = first if match.group(2) is None else int(match.group(3)) if match.group(3) else 2**62
    if last < first:
        raise UsageError(f"what-if {what}={text}: the range ends before it starts")
    return first, last


def targets(spec: WhatIfSpec, known: Sequence[str]) -> list[str]:
    """The canonical names a spec changes, its layer range applied."""
    names = canonical.select(known, kind_of(spec).globs(spec))
    layers = _parse_range(spec.layers, "layers")
    if layers is None:
        return names
    return [n for n in names if (i := canonical.layer_index(n)) is None or layers[0] <= i <= layers[1]]


@contextmanager
def patched_model(model_dir: Path, overrides: dict[str, Any]) -> Iterator[Path]:
    """A temporary model directory with ``model_dir``'s files (linked, not copied) and its
    ``config.json`` changed by ``overrides``: every engine reads its config from there."""
    config = read_config(model_dir)
    with tempfile.TemporaryDirectory(prefix="ptrace-whatif-model-") as tmp:
        patched = Path(tmp)
        for item in model_dir.iterdir():
            if item.name != "config.json":
                (patched / item.name).symlink_to(item.resolve())
        (patched / "config.json").write_text(json.dumps({**config, **overrides}, indent=2))
        yield patched


def load_key(specs: Sequence[WhatIfSpec]) -> str:
    """Equal for runs whose load-time what-ifs are equal: they can share one engine load."""
    return json.dumps(load_time(specs), sort_keys=True, default=str)


def load_time(specs: Sequence[WhatIfSpec]) -> tuple[dict[str, Any], dict[str, str]]:
    """(model config overrides, engine options) of the load-time specs."""
    config: dict[str, Any] = {}
    engine: dict[str, str] = {}
    for spec in specs:
        if spec.kind == ConfigOverride.name:
            config.update(spec.params)
        elif spec.kind == EngineOverride.name:
            engine.update({k: str(v) for k, v in spec.params.items()})
        elif spec.kind == Batch.name:
            engine.update({k: str(v).lower() for k, v in Batch.engine_options(spec).items()})
    return config, engine


# -- applying them ------------------------------------------------------------------------------

@dataclass
class _Context:
    """What a kind may need while it changes one site: the tensor's own dtype, a random stream
    for the site, and the source bundle's rows."""

    dtype: np.dtype
    first_row: int
    source: Callable[[], Bundle] | None

    def rng(self, spec: WhatIfSpec, site: TensorSite) -> np.random.Generator:
        """The same draws for the same site in every run (teacher-forced and free-running)."""
        return np.random.default_rng([spec.seed, site.request, site.step, zlib.crc32(site.name.encode()),
                                      site.start + self.first_row])

    def source_rows(self, site: TensorSite, count: int) -> np.ndarray:
        bundle = self.source()
        positions = bundle.tensor_positions(site.request, site.name)
        wanted = site.start + self.first_row + np.arange(count)
        rows = np.searchsorted(positions, wanted)
        if rows.size and (rows[-1] >= positions.size or not np.array_equal(positions[rows], wanted)):
            raise UsageError(f"splice: {bundle.path} has no {site.name} of request {site.request} at positions "
                             f"{wanted[0]}-{wanted[-1]}", hint="splice at steps the source captured (--steps)")
        return bundle.tensor_rows(site.request, site.name, int(rows[0]), int(rows[-1]) + 1).astype(np.float64)


class WhatIfInterceptor(Interceptor):
    """Applies the tensor kinds of some checked what-ifs to a run, in the order given (in a
    multi-rank run, in each rank's process, on its shards: a ``ranks`` selector picks them)."""

    on_ranks = True

    def __init__(self, injections: Sequence[Injection], source: str | Path | None = None, *,
                 after_record: bool = False) -> None:
        """The injections of one phase: before the recorder (``after_record=False``) or after it."""
        self.injections = [(i, KINDS[i.spec.kind](), frozenset(i.names)) for i in injections
                           if KINDS[i.spec.kind].on_tensors and KINDS[i.spec.kind].after_record == after_record]
        self.names = set().union(*(names for _, _, names in self.injections))
        self._source_path = source
        self._source: Bundle | None = None

    def _open_source(self) -> Bundle:
        if self._source is None:
            self._source = open_bundle(self._source_path)
        return self._source

    def wants(self, name: str) -> bool:
        return name in self.names

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> np.ndarray | None:
        original = tensor.numpy()
        result = None
        for injection, behaviour, names in self.injections:
            spec, positions = injection.spec, injection.positions
            if site.name not in names or site.step not in injection.steps or (spec.requests and site.request not in spec.requests):
                continue
            if spec.ranks and site.rank not in spec.ranks:
                continue
            first, last = 0, original.shape[0]
            if positions is not None:  # absolute positions -> this site's rows
                first = max(0, positions[0] - site.start)
                last = min(original.shape[0], positions[1] - site.start + 1)
                if first >= last:
                    continue
            if result is None:
                result = original.astype(np.float64)
            context = _Context(original.dtype, first, self._open_source if self._source_path else None)
            result[first:last] = behaviour.apply(result[first:last], spec, site, context)
        return None if result is None else result.astype(original.dtype)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None



def sweep_values(text: str) -> tuple[str, list[Any]]:
    """``--sweep std=1e-5,1e-4,1e-3``: the parameter and its values."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise UsageError(f"--sweep {text!r} is not PARAM=V1,V2,...", hint="e.g. --sweep std=1e-5,1e-4,1e-3")
    parsed = [_number(v.strip()) for v in values.split(",") if v.strip()]
    if not all(isinstance(v, (int, float)) for v in parsed):
        raise UsageError(f"--sweep {text!r}: values must be numbers")
    return key.strip(), parsed


def swept(spec: WhatIfSpec, param: str, value: Any) -> WhatIfSpec:
    """``spec`` with one parameter set to a sweep value (refused if the kind has no such one)."""
    kind_cls = kind_of(spec)
    if param not in kind_cls.params and kind_cls.on_tensors:
        raise UsageError(f"--sweep {param}: what-if {spec.kind} has no parameter {param}",
                         hint=f"its parameters: {', '.join(kind_cls.params) or 'none'}")
    return replace(spec, params={**spec.params, param: value})


def labels(specs: Sequence[WhatIfSpec]) -> str:
    return "; ".join(describe(s) for s in specs)


__all__ = ["KINDS", "Injection", "Kind", "WhatIfInterceptor", "check", "describe", "kind", "labels", "load_key", "load_time",
           "parse", "read_file", "sweep_values", "swept", "targets"]

