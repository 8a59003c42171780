"""What a comparison found, as plain data that goes to JSON and comes back.

The report renders these objects and nothing else, so a result saved with ``ptrace compare
--json`` (or ``Comparison.to_dict``) re-renders the same report without the bundles.

They are records (``bundle_spec.records``) whose ``to_dict`` is their strict JSON form: JSON has
no NaN or Infinity (Python writes them, but most other readers reject the file), so a non-finite
float (a metric with nothing to measure, a run that overflowed) is written as ``None``, and
``from_dict`` reads ``None`` back as NaN wherever the field is a float. ``from_dict`` checks each
value against its field's type, naming the node (``Comparison.tensors[0].verdict``).

Per-position results (one entry per tensor and compared position: millions on a big bundle) are
numpy arrays in memory, 8 bytes an entry where a list of Python floats takes about 32, so that
compare's memory stays bounded by its block size; in JSON they are lists, which
:meth:`Result.to_json` writes an array at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ptrace.bundle_spec.records import Record, plain
from ptrace.errors import ComparisonError


def _json_array(array: np.ndarray, indent: str) -> str:
    """A one-dimensional numeric array as ``json.dumps(plain(array, json=True), indent=2)``
    writes it on a line indented by ``indent``: one number a line, NaN and infinity as ``null``."""
    if not array.size:
        return "[]"
    item = indent + "  "
    text = json.dumps(array.tolist(), separators=(",\n" + item, ": "))  # the C encoder: no indent
    if array.dtype.kind == "f":  # numbers only: these tokens are the non-finite floats
        text = text.replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null")
    return f"[\n{item}{text[1:-1]}\n{indent}]"


def per_position(dtype: type[np.generic]) -> Any:
    """A per-position field: a 1-D array of ``dtype`` (a list given is converted), empty by
    default. Left out of ``==``: an array compared element-wise has no single truth value."""
    return field(default_factory=lambda: np.zeros(0, dtype), repr=False, compare=False,
                 metadata={"dtype": np.dtype(dtype)})


class Result(Record):
    """Mixin for the frozen dataclasses below: ``to_dict`` is their strict JSON form, and
    ``from_dict`` reads it back (keys this version does not know, a newer writer's, ignored)."""

    ignores_unknown_keys: ClassVar[bool] = True

    @classmethod
    def invalid(cls, message: str) -> ComparisonError:
        return ComparisonError(message, hint="load what `ptrace compare --json` wrote")

    def __post_init__(self) -> None:
        """Per-position fields given as lists (built by hand) become arrays."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if "dtype" in f.metadata:
                value = getattr(self, f.name)
                if not (isinstance(value, np.ndarray) and value.dtype == f.metadata["dtype"]):
                    object.__setattr__(self, f.name, np.array(value, dtype=f.metadata["dtype"]))

    def to_dict(self) -> dict[str, Any]:
        return plain(self, json=True)

    def to_json(self) -> str:
        """:meth:`to_dict` as strict JSON indented by 2: byte for byte what ``json.dumps(
        self.to_dict(), indent=2, allow_nan=False)`` writes, in a fraction of its time.

        json indents in pure Python, a few microseconds per value; per-position arrays hold
        millions of values on a big bundle. So they are left out of what json indents (a marker
        stands in for each) and each is written whole by json's C encoder, which writes numbers
        as the indenting one does (``repr``). Numpy's own float formatting would avoid the
        Python float per value that ``tolist`` makes, but takes 3x the time of both together."""
        arrays: list[np.ndarray] = []
        marker = os.urandom(16).hex()  # no string in a result can hold it by chance

        def stand_in(array: np.ndarray) -> str:
            arrays.append(array)
            return f"{marker}{len(arrays) - 1}"

        skeleton = json.dumps(plain(self, json=True, array=stand_in), indent=2, allow_nan=False)
        return re.sub(f'^( *)(.*)"{marker}(\\d+)"',
                      lambda found: found[1] + found[2] + _json_array(arrays[int(found[3])], found[1]),
                      skeleton, flags=re.MULTILINE)


@dataclass(frozen=True)
class TensorResult(Result):
    name: str
    verdict: str
    positions: int
    max_abs_err: float
    mean_abs_err: float
    mean_rel_err: float
    cos_sim: float
    min_cos_sim: float
    thousandth_ratio: float
    #: the first position whose own verdict is as bad as the tensor's; None when the tensor passes
    first_fail_position: int | None
    stats_only: bool = False
    #: normwise relative error ``||b - a|| / ||a||`` over every compared row (for stats-only
    #: tensors: the largest relative change of a row's scale)
    rel_err: float = math.nan
    #: below this relative error a difference is rounding, not divergence (``compare.noise``)
    noise_floor: float = 0.0
    #: per compared position, for plots: the request, absolute position, mean abs error, cosine
    #: and normwise relative error
    position_request: np.ndarray = per_position(np.int64)
    position_index: np.ndarray = per_position(np.int64)
    position_mean_abs: np.ndarray = per_position(np.float64)
    position_cos: np.ndarray = per_position(np.float64)
    position_rel: np.ndarray = per_position(np.float64)


@dataclass(frozen=True)
class Divergence(Result):
    """The first step where the generated tokens differ, and whether it is a near-tie."""

    step: int
    token_a: int
    token_b: int
    a_in_b_topk: bool
    b_in_a_topk: bool
    margin_a: float | None
    margin_b: float | None
    near_tie: bool


@dataclass(frozen=True)
class RequestResult(Result):
    index: int
    prompt_len: int
    tokens_a: list[int]
    tokens_b: list[int]
    token_match_rate: float
    first_divergent_step: int | None
    divergence: Divergence | None
    compared_positions: int
    kl: list[float]
    kl_source: str
    topk_a: list[list[int]] = field(repr=False, default_factory=list)
    topk_b: list[list[int]] = field(repr=False, default_factory=list)
    #: where this request's runs part ways: the earliest tensor in forward order whose error
    #: rises above the noise floor, and the earliest position where it does
    first_divergent_tensor: str | None = None
    first_divergent_position: int | None = None
    #: when these tokens come from a free-running replay: the same request in the teacher-forced
    #: one (fed A's tokens, so its ``tokens_b`` are B's choice at every step and its KL covers
    #: every step, not only those before the first divergence)
    teacher_forced: RequestResult | None = field(default=None, repr=False)
    #: steps whose tokens agree; the mean and largest KL per step, from the teacher-forced run
    #: where there is one (every step), else from this one (``compare.stability``); None: no KL
    tokens_matched: int = 0
    mean_kl: float | None = None
    max_kl: float | None = None


@dataclass(frozen=True)
class Propagation(Result):
    """One tensor's error against a baseline: normwise relative error ``||x - x0|| / ||x0||``."""

    tensor: str
    error: float


@dataclass(frozen=True)
class LengthBucket(Result):
    """Requests whose prompt length lies in ``min_len .. max_len`` (inclusive): how many of them
    produced other tokens than the reference, and their KL per step."""

    min_len: int
    max_len: int
    requests: int
    diverged: int
    divergence_rate: float
    mean_kl: float | None
    max_kl: float | None
    indices: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PositionBin(Result):
    """Decode steps whose generated token sits at an absolute position in ``min_pos .. max_pos``
    (inclusive; the position is the length of the context it was predicted from), pooled over
    requests: KL per step and how often both runs' most likely token is the same."""

    min_pos: int
    max_pos: int
    steps: int
    requests: int
    mean_kl: float | None
    max_kl: float | None
    top1_agreement: float | None


@dataclass(frozen=True)
class StepBin(Result):
    """How many requests first diverge at a decode step in ``min_step .. max_step`` (inclusive)."""

    min_step: int
    max_step: int
    requests: int


@dataclass(frozen=True)
class Stability(Result):
    """Stability across many requests (``compare.stability``): divergence against prompt length,
    KL and top-1 agreement against absolute position, where first divergences fall."""

    requests: int
    diverged: int
    divergence_rate: float
    #: output length (tokens) over the requests, per run: mean and population standard deviation
    output_len_mean_a: float
    output_len_mean_b: float
    output_len_std_a: float
    output_len_std_b: float
    #: where the requests' KL comes from: "full logits", "top-K logprobs" (an estimate, K the
    #: number recorded), "mixed" (some of each) or "none"
    kl_source: str
    #: "teacher-forced" (every step, past the first divergence) or "free-running" (each request
    #: only up to its first divergence: later steps see other contexts)
    position_source: str
    buckets: list[LengthBucket]
    positions: list[PositionBin]
    #: the distribution of first divergent steps ("Div_Index"), over diverged requests
    div_index: list[StepBin]


@dataclass(frozen=True)
class WhatIfResult(Result):
    """What one error-injection run did, against the unperturbed baseline replay on the same
    engine, dtype and device (``ptrace whatif``)."""

    #: one line naming the injections (``noise std=0.001 in layers.*.k,layers.*.v``)
    label: str
    #: the injections, as recorded in ``meta/whatif`` (SPEC.md section 3.7)
    spec: list[dict[str, Any]]
    sweep_param: str | None
    sweep_value: float | None
    repeat: int
    #: share of requests whose free-running tokens differ from the baseline's (0..1)
    divergence_rate: float
    token_match_rate: float
    #: per request: the first step whose token differs from the baseline's, or None
    first_divergent_step: list[int | None]
    #: KL(baseline || what-if) of the next-token distributions, teacher-forced
    mean_kl: float
    max_kl: float
    #: the earliest tensor in forward order that differs from the baseline at all
    first_affected_tensor: str | None
    #: error per tensor, forward order, from the first affected one on
    propagation: list[Propagation]
    #: error at the last layer output over error at the first affected tensor
    amplification: float | None
    #: against the source (the reference): verdict, summary, first divergent tensor
    vs_source: dict[str, Any]
    sentence: str
    bundles: dict[str, str] = field(default_factory=dict)
    #: the same against the baseline per prompt-length bucket and position (long-context what-ifs)
    stability: Stability | None = None
    #: per request, the what-if's own generated tokens (free-running) and their texts
    tokens: list[list[int]] = field(default_factory=list)
    token_texts: list[list[str]] = field(default_factory=list)
    #: expert choices that differ from the baseline's (``compare.routing``); None for dense models
    routing: dict[str, Any] | None = None
    #: a batch what-if's own batches: its teacher-forced run's ``meta/schedule``; None for other
    #: what-ifs (their batches are the baseline's) and engines that record none
    schedule: dict[str, Any] | None = None


@dataclass(frozen=True)
class CalibratedTensor(Result):
    """One tensor's error in the calibration run (a trusted engine at the replay's dtype), and the
    replay's error as a multiple of it (the "double benchmark")."""

    name: str
    #: the calibration run's normwise relative error against the reference: overall, per position
    rel_err: float
    position_rel: np.ndarray = per_position(np.float64)
    #: replay error / calibration error per position: the geometric mean over positions (the
    #: typical multiple), and the largest (so never below the mean)
    ratio_mean: float = math.nan
    ratio_max: float = math.nan
    #: the smallest p-value of the one-sided tests (one per request) that the replay's error is
    #: more than the dtype explains (``compare.calibration``), and how many positions they used
    p_value: float = math.nan
    positions: int = 0
    within: bool = True


@dataclass(frozen=True)
class Calibration(Result):
    """The calibration replay and what it says of the replay (``--calibrate``)."""

    backend: str
    dtype: str
    device: str
    path: str
    #: the test's parameters: margin, alpha, min_positions (``compare.calibration``)
    limits: dict[str, float]
    tensors: list[CalibratedTensor]
    #: every tensor within the limits: the replay's error is what its dtype explains
    within: bool
    sentence: str


@dataclass(frozen=True)
class LocalError(Result):
    """One layer's own error (its input spliced from the reference) against the error it shows
    in the plain replay (inherited from the layers before it, plus its own)."""

    tensor: str
    local_error: float
    propagated_error: float
    #: propagated / local: how much of the error this layer inherits
    amplification: float | None


@dataclass(frozen=True)
class Bisection(Result):
    """The smallest set of layers whose output, spliced from the reference, restores the
    reference's tokens (in the spirit of Polygraphy's ``debug precision``)."""

    layers: list[int]
    restored_requests: int
    total_requests: int
    tried: list[dict[str, Any]] = field(default_factory=list)
    sentence: str = ""


@dataclass(frozen=True)
class Comparison(Result):
    """Run ``b`` against reference run ``a``. ``a`` and ``b`` summarise the runs (paths,
    engines, settings, environment, prompts, token texts): all the report shows of them."""

    verdict: str
    summary: str
    token_match_rate: float
    first_divergent_step: int | None
    first_divergent_tensor: str | None
    first_divergent_position: int | None
    largest_local_error: str | None
    first_nonfinite: dict[str, Any] | None
    thresholds: dict[str, float]
    tensors: list[TensorResult]
    requests: list[RequestResult]
    a: dict[str, Any]
    b: dict[str, Any]
    missing: list[str]
    #: the request whose divergence ``first_divergent_tensor``/``_position`` describe
    first_divergent_request: int | None = None
    #: what "divergent" was measured against: "noise floor" (``compare.noise``) or "calibration"
    localized_by: str = "noise floor"
    #: error-injection what-ifs run on this replay (``ptrace whatif``, ``replay --inject``)
    whatifs: list[WhatIfResult] = field(default_factory=list)
    #: the calibration replay (``--calibrate``) when B's dtype or device differs from A's
    calibration: Calibration | None = None
    #: why a comparison across dtypes or devices was not judged against a calibration run (then
    #: it is judged against the coarser dtype's noise floor and limits); None when calibrated or
    #: when nothing about the arithmetic's precision differs
    calibration_note: str | None = None
    #: the dtype whose row of limits ``thresholds`` holds (the coarser of A's and B's)
    thresholds_dtype: str = "float32"
    #: per-layer local error (``--localize``), and where it came from: "measured" (a splice
    #: replay) or "heuristic" (error growth between consecutive tensors of this comparison)
    local_errors: list[LocalError] = field(default_factory=list)
    local_error_source: str = "heuristic"
    bisection: Bisection | None = None
    #: divergence against prompt length, KL against position (``compare.stability``)
    stability: Stability | None = None
    #: the arithmetic settings whose values differ between the runs (``compare.settings``):
    #: ``{key, group, a, b, acts_at, from_position, consistent}`` each, vocabulary order
    settings_diff: list[dict[str, Any]] = field(default_factory=list)
    #: mixture-of-experts expert choices that differ (``compare.routing``); None for dense models
    routing: dict[str, Any] | None = None
