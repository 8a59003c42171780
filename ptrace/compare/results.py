"""What a comparison found, as plain data that goes to JSON and comes back.

The report renders these objects and nothing else, so a result saved with ``ptrace compare
--json`` (or ``Comparison.to_dict``) re-renders the same report without the bundles.

JSON has no NaN or Infinity (Python writes them, but most other readers reject the file), so
``to_dict`` writes a non-finite float (a metric with nothing to measure, a run that overflowed)
as ``None``; ``from_dict`` reads ``None`` back as NaN wherever the field is a float.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from ptrace.errors import ComparisonError


def plain(value: Any) -> Any:
    """``value`` as strict JSON data: dicts, lists, str, int, finite float, bool, None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):
        return value
    return str(value)  # anything else in a run's metadata (bytes, a path) shows as its text


def _load(hint: Any, value: Any) -> Any:
    """``value`` read from JSON as the type ``hint`` (a field's resolved annotation)."""
    if hint is float:
        return math.nan if value is None else float(value)
    if value is None:
        return None
    if isinstance(hint, type) and issubclass(hint, Result):
        return hint.from_dict(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return [_load(args[0], item) for item in value]
    if origin in (types.UnionType, typing.Union):  # ``X | None``: ``None`` was handled above
        return _load(next(a for a in args if a is not type(None)), value)
    return value


class Result:
    """Mixin for the frozen dataclasses below: ``to_dict`` and its inverse ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Keys this version does not know (a newer writer's) are ignored."""
        if not isinstance(data, Mapping):
            raise ComparisonError(f"a {cls.__name__} must be a JSON object, not {type(data).__name__}",
                                  hint="load what `ptrace compare --json` wrote")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = _load(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ComparisonError(f"a {cls.__name__} lacks the key {f.name!r}",
                                      hint="load what `ptrace compare --json` wrote")
        return cls(**kwargs)


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
    first_fail_position: int | None
    stats_only: bool = False
    #: normwise relative error ``||b - a|| / ||a||`` over every compared row (for stats-only
    #: tensors: the largest relative change of a row's scale)
    rel_err: float = math.nan
    #: below this relative error a difference is rounding, not divergence (``compare.noise``)
    noise_floor: float = 0.0
    #: per compared position, for plots: the request, absolute position, mean abs error, cosine
    #: and normwise relative error
    position_request: list[int] = field(default_factory=list, repr=False)
    position_index: list[int] = field(default_factory=list, repr=False)
    position_mean_abs: list[float] = field(default_factory=list, repr=False)
    position_cos: list[float] = field(default_factory=list, repr=False)
    position_rel: list[float] = field(default_factory=list, repr=False)


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
