"""One real capture (its first prompt tries to inject a script), its bfloat16 replay, and a real
what-if sweep on it: every report test renders these, or these with hand-made additions
(``handmade``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, whatif
from ptrace.compare import Comparison
from ptrace.replay.plan import ReplayConfig
from ptrace.replay.session import ReplayResult, replay
from ptrace.replay.whatif import WhatIfConfig, run_whatifs

HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="package")
def hostile_source(tmp_path_factory, example_model) -> Path:
    return capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path_factory.mktemp("report") / "src.zarr",
                                 prompts=(f"Hello {HOSTILE} world", "Second prompt"), command=("ptrace", "capture", HOSTILE),
                                 sampling=SamplingParams(max_new_tokens=6), settings=CaptureSettings(tensors=("*",))))


@pytest.fixture(scope="package")
def replayed(hostile_source, tmp_path_factory) -> ReplayResult:
    """A bfloat16 replay of the float32 capture (both modes), judged on its own (the panels that
    need a calibration get one by hand)."""
    return replay(ReplayConfig(bundle=hostile_source, backend="torch", dtype="bfloat16", calibrate=False,
                               output=tmp_path_factory.mktemp("replay") / "r"))


@pytest.fixture(scope="package")
def whatif_comparison(hostile_source, tmp_path_factory) -> Comparison:
    """KV-cache noise swept over three levels, and a bfloat16 cast of one layer's attention."""
    specs = ((whatif.parse("noise:layers.*.k,layers.*.v:std=1e-3:positions=0-4"),),
             (whatif.parse("cast:layers.2.attn:dtype=bfloat16"),))
    return run_whatifs(WhatIfConfig(
        replay=ReplayConfig(bundle=hostile_source, backend="torch", output=tmp_path_factory.mktemp("whatif")),
        whatifs=specs, sweep=("std", (1e-3, 1e-1, 1.0))))
