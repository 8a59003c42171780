"""The calibrated test on hand-made per-position errors: its statistics, not the engines (those
are in tests/replay)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ptrace.compare.calibration import MARGIN, calibrate, t_sf
from ptrace.compare.results import Comparison, RequestResult, TensorResult


def _tensor(name: str, rel: np.ndarray, requests: int) -> TensorResult:
    per = rel.size // requests
    return TensorResult(name=name, verdict="pass", positions=rel.size, max_abs_err=0.1, mean_abs_err=0.01,
                        mean_rel_err=float(rel.mean()), cos_sim=0.99, min_cos_sim=0.9, thousandth_ratio=0.0,
                        first_fail_position=None, rel_err=float(np.sqrt((rel**2).mean())), noise_floor=0.03,
                        position_request=np.repeat(np.arange(requests), per), position_index=np.tile(np.arange(per), requests),
                        position_rel=rel)


def _comparison(backend: str, errors: dict[str, np.ndarray], requests: int) -> Comparison:
    run = {"backend": backend, "dtype": "bfloat16", "device": "cpu", "path": f"/{backend}.zarr", "model_fingerprint": "m"}
    return Comparison(
        verdict="pass", summary="", token_match_rate=1.0, first_divergent_step=None, first_divergent_tensor=None,
        first_divergent_position=None, largest_local_error=None, first_nonfinite=None, thresholds={},
        tensors=[_tensor(name, rel, requests) for name, rel in errors.items()],
        requests=[RequestResult(index=r, prompt_len=8, tokens_a=[1], tokens_b=[1], token_match_rate=1.0,
                                first_divergent_step=None, divergence=None, compared_positions=8, kl=[], kl_source="none")
                  for r in range(requests)],
        a={"model_fingerprint": "m"}, b=run, missing=[])


def _pair(scale_by_layer: dict[int, float], positions: int = 40, requests: int = 2, seed: int = 0):
    """Calibration and replay errors drawn from the same log-normal spread; the replay's scaled
    by ``scale_by_layer`` (1: the dtype's error)."""
    rng = np.random.default_rng(seed)
    names = [f"layers.{i}.mlp" for i in range(4)]
    size = positions * requests
    calibration = {n: np.exp(rng.normal(-4, 0.5, size)) for n in names}
    replay = {n: np.exp(rng.normal(-4, 0.5, size)) * scale_by_layer.get(i, 1.0) for i, n in enumerate(names)}
    return _comparison("vllm", replay, requests), _comparison("torch", calibration, requests)


def test_student_t_tail_matches_tables():
    for t, df, expected in [(2.0, 5, 0.05097), (2.0, 6, 0.04621), (1.0, 1, 0.25), (3.0, 30, 0.002695),
                            (-1.5, 9, 0.91608)]:
        assert t_sf(t, df) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_the_dtype_s_own_error_passes_and_the_largest_ratio_is_the_largest(seed):
    replay, calibration = _pair({}, seed=seed)
    c = calibrate(replay, calibration)
    assert c.verdict == "pass" and c.calibration.within, c.summary
    assert c.first_divergent_tensor is None and "is what bfloat16 explains" in c.summary
    for t in c.calibration.tensors:
        assert t.ratio_max >= t.ratio_mean > 0
        mine = next(x for x in replay.tensors if x.name == t.name)
        assert t.ratio_max == pytest.approx(max(np.asarray(mine.position_rel) / np.asarray(t.position_rel)), rel=1e-2)


def test_a_fault_twice_the_dtype_s_error_is_found_in_its_layer_on_every_request():
    replay, calibration = _pair({2: 2.0, 3: 2.0})
    c = calibrate(replay, calibration)
    assert c.verdict == "fail" and c.first_divergent_tensor == "layers.2.mlp", c.summary
    assert [r.first_divergent_tensor for r in c.requests] == ["layers.2.mlp"] * 2
    judged = {t.name: t for t in c.tensors}
    assert judged["layers.1.mlp"].verdict == "pass" and judged["layers.1.mlp"].first_fail_position is None
    assert judged["layers.2.mlp"].first_fail_position is not None
    assert "makes 2" in c.summary and f"at most {MARGIN:g}x" in c.summary


def test_one_large_ratio_among_many_positions_is_not_a_fault():
    replay, calibration = _pair({})
    rel = np.array(replay.tensors[1].position_rel)
    rel[5] *= 8  # one position, 8x: within the spread of 80 positions' log-ratios it is an outlier, not a shift
    replay.tensors[1] = TensorResult(**{**replay.tensors[1].__dict__, "position_rel": rel})
    c = calibrate(replay, calibration)
    assert c.verdict == "pass", c.summary
    t = next(x for x in c.calibration.tensors if x.name == "layers.1.mlp")
    assert t.ratio_max > 4 * t.ratio_mean and math.isfinite(t.p_value)
