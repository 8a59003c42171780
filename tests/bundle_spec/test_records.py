"""The one serialisation (``bundle_spec.records``): round trips, the NaN rule, strict reading."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import numpy as np
import pytest

from ptrace.bundle_spec.records import MAX_DEPTH, Record, plain
from ptrace.bundle_spec.schema import DocumentError, SamplingParams
from ptrace.errors import BundleCorruptError, UsageError


@dataclass(frozen=True)
class Span:
    first: int
    last: int | None


@dataclass(frozen=True)
class Sample(Record):
    name: str
    scale: float
    spans: tuple[Span, ...]
    pair: tuple[int, int | None]
    where: Path | None
    labels: Mapping[str, tuple[str, ...]]
    counts: list[int] = field(default_factory=list)
    margin: float | None = None
    extra: Any = None
    values: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False, metadata={"dtype": np.dtype(np.float64)})
    sampling: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Tolerant(Record):
    ignores_unknown_keys: ClassVar[bool] = True
    name: str


def _sample(**changes) -> Sample:
    values = dict(name="a", scale=0.5, spans=(Span(0, 4), Span(9, None)), pair=(1, None), where=Path("/x/y"),
                  labels={"k": ("v", "w")}, counts=[1, 2], margin=0.25, extra={"nested": [1, "two", None]},
                  values=np.array([1.0, 2.5]), sampling=SamplingParams(temperature=0.7, seed=3))
    return Sample(**{**values, **changes})


def test_a_record_round_trips_through_plain_values_and_msgpack():
    sample = _sample()
    data = sample.to_dict()
    assert data["spans"] == [{"first": 0, "last": 4}, {"first": 9, "last": None}] and data["where"] == "/x/y"
    assert data["values"] == [1.0, 2.5] and data["sampling"]["temperature"] == 0.7
    for back in (Sample.from_dict(data), Sample.from_bytes(sample.to_bytes()), Sample.from_dict(json.loads(json.dumps(data)))):
        assert back == sample
        assert isinstance(back.spans, tuple) and isinstance(back.spans[0], Span) and isinstance(back.where, Path)
        assert back.values.dtype == np.float64 and back.values.tolist() == [1.0, 2.5]


def test_nan_and_infinity_are_exact_in_msgpack_and_null_in_json():
    sample = _sample(scale=math.inf, margin=math.nan, extra={"x": -math.inf}, values=np.array([math.nan, 1.0, math.inf]))
    # msgpack holds every float: the bits come back
    back = Sample.from_bytes(sample.to_bytes())
    assert back.scale == math.inf and math.isnan(back.margin) and back.extra == {"x": -math.inf}
    assert struct.pack("<d", back.values[0]) == struct.pack("<d", math.nan) and back.values[2] == math.inf
    # strict JSON has none of them: null, everywhere, and NaN again in a float field
    data = plain(sample, json=True)
    text = json.dumps(data, allow_nan=False)
    assert data["scale"] is None and data["margin"] is None and data["extra"] == {"x": None}
    assert data["values"] == [None, 1.0, None]
    read = Sample.from_dict(json.loads(text))
    assert math.isnan(read.scale) and read.margin is None and read.extra == {"x": None}
    assert math.isnan(read.values[0]) and read.values[1] == 1.0


@pytest.mark.parametrize("change, message", [
    (("scale", "0.5"), "Sample.scale is str '0.5', expected float"),
    (("scale", True), "Sample.scale is bool True, expected float"),
    (("counts", [1, True]), r"Sample.counts\[1\] is bool True, expected int"),
    (("spans", [{"first": 0, "last": "4"}]), r"Sample.spans\[0\].last is str '4', expected int"),
    (("pair", [1, 2, 3]), "Sample.pair has 3 items, expected 2"),
    (("labels", {"k": "v"}), "Sample.labels.k is str 'v', expected tuple"),
    (("sampling", {"ignore_eos": "false"}), "Sample.sampling.ignore_eos is str 'false', expected bool"),
    (("values", ["1.0"]), "Sample.values is not a list of numbers"),
    (("values", [[1.0]]), "Sample.values is not a list of numbers"),
    (("name", None), "Sample.name is NoneType None, expected str"),
])
def test_mistyped_values_are_refused_naming_the_node(change, message):
    data = _sample().to_dict()
    data[change[0]] = change[1]
    with pytest.raises(UsageError, match=message):
        Sample.from_dict(data)


def test_missing_and_unknown_keys():
    data = _sample().to_dict()
    with pytest.raises(UsageError, match="Sample has no field 'surprise'"):
        Sample.from_dict({**data, "surprise": 1})
    del data["name"]
    with pytest.raises(UsageError, match="Sample lacks the key 'name'"):
        Sample.from_dict(data)
    assert Tolerant.from_dict({"name": "x", "added_by_a_newer_writer": 1}) == Tolerant("x")
    # documents ignore keys they do not know (SPEC.md section 3), and refuse as a corrupt bundle
    assert SamplingParams.from_dict({"seed": 4, "newer": True}) == SamplingParams(seed=4)
    with pytest.raises(BundleCorruptError, match="SamplingParams.seed is float 4.5, expected int"):
        SamplingParams.from_dict({"seed": 4.5})


def test_data_never_chooses_what_is_built():
    """A map in an ``Any`` field stays a map, whatever it names; extension types and deep nesting
    are refused before anything is built."""
    hostile = {"__class__": "os.system", "__reduce__": ["rm -rf /"]}
    assert Sample.from_dict({**_sample().to_dict(), "extra": hostile}).extra == hostile
    payload = msgpack.packb({"name": msgpack.ExtType(7, b"code")}, use_bin_type=True)
    with pytest.raises(UsageError, match="extension type 7"):
        Tolerant.from_bytes(payload)
    deep: Any = "x"
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(DocumentError, match=f"nested more than {MAX_DEPTH}"):
        SamplingParams.from_bytes(msgpack.packb({"seed": deep}))
    with pytest.raises(UsageError, match="Sample is list"):
        Sample.from_dict([1, 2])


def test_only_plain_values_are_written():
    with pytest.raises(TypeError, match="a set is not a plain value"):
        _sample(extra={1, 2}).to_dict()
    assert plain({"k": np.float32(0.5), "n": np.int64(3), "b": b"\x00"}, json=True) == {"k": 0.5, "n": 3, "b": "b'\\x00'"}
