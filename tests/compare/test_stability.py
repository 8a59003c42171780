"""Stability across requests: divergence per prompt-length bucket, KL and top-1 agreement against
position, Div_Index, output length spread; synthetic bundles whose divergences are set by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from statistics import fmean

import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.compare import Comparison, combine, compare
from ptrace.compare.stability import MIN_PER_BUCKET, bin_width, with_request_totals
from ptrace.testing.bundles import SyntheticRequest, write_bundle
from tests.conftest import run_cli

OUTPUTS = (4, 5, 6, 7, 8)


def _prompt(length: int) -> tuple[int, ...]:
    return tuple(i % 31 + 1 for i in range(length))


def _flipped(outputs: tuple[int, ...], step: int | None) -> tuple[int, ...]:
    """``outputs`` with every token from ``step`` on replaced (None: unchanged)."""
    return outputs if step is None else outputs[:step] + tuple(t + 10 for t in outputs[step:])


def _pair(tmp_path: Path, lengths: list[int], flips: list[int | None], *, b_outputs=None, noise=0.02):
    """Bundles A and B (free-running) of prompts of ``lengths``; B's request i diverges at step
    ``flips[i]``."""
    a = [SyntheticRequest(_prompt(n), OUTPUTS) for n in lengths]
    b = [SyntheticRequest(_prompt(n), outs) for n, outs in
         zip(lengths, b_outputs or [_flipped(OUTPUTS, f) for f in flips])]
    return write_bundle(tmp_path / "a.zarr", a), write_bundle(tmp_path / "b.zarr", b, noise=noise)


def _compare(paths) -> Comparison:
    with open_bundle(paths[0]) as a, open_bundle(paths[1]) as b:
        return compare(a, b)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Comparison:
    """Prompts of 2..13 tokens (three buckets of four): none of the shortest four diverge, one of
    the middle four (at step 3), three of the longest four (at steps 1, 2, 2)."""
    flips = [None] * 4 + [None, 3, None, None] + [1, None, 2, 2]
    return _compare(_pair(tmp_path_factory.mktemp("twelve"), list(range(2, 14)), flips))


def test_divergence_rate_per_prompt_length_bucket(twelve):
    s = twelve.stability
    assert MIN_PER_BUCKET == 4
    assert [(b.min_len, b.max_len, b.requests, b.diverged, b.divergence_rate) for b in s.buckets] == \
        [(2, 5, 4, 0, 0.0), (6, 9, 4, 1, 0.25), (10, 13, 4, 3, 0.75)]
    assert [b.indices for b in s.buckets] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert (s.requests, s.diverged, s.divergence_rate) == (12, 4, 4 / 12)


def test_requests_of_one_prompt_length_share_a_bucket(tmp_path):
    """Eight requests make two buckets of four, but the fifth has the same length as the fourth."""
    c = _compare(_pair(tmp_path, [3, 3, 3, 3, 3, 5, 5, 7], [None] * 7 + [0]))
    assert [(b.min_len, b.max_len, b.requests, b.diverged) for b in c.stability.buckets] == [(3, 3, 5, 0), (5, 7, 3, 1)]


def test_div_index_is_the_distribution_of_first_divergent_steps(twelve):
    assert [(b.min_step, b.max_step, b.requests) for b in twelve.stability.div_index] == \
        [(1, 1, 1), (2, 2, 2), (3, 3, 1)]
    assert [r.first_divergent_step for r in twelve.requests] == [None] * 5 + [3, None, None, 1, None, 2, 2]


def test_free_running_positions_stop_at_each_first_divergence(twelve):
    """Position = prompt length + step; a free-running request counts up to its first divergent
    step (fewer than 32 positions: one bin each)."""
    s = twelve.stability
    assert s.position_source == "free-running"
    counted: dict[int, int] = {}
    for r in twelve.requests:
        steps = len(OUTPUTS) if r.first_divergent_step is None else r.first_divergent_step + 1
        for step in range(steps):
            counted[r.prompt_len + step] = counted.get(r.prompt_len + step, 0) + 1
    assert [(b.min_pos, b.max_pos, b.steps) for b in s.positions] == [(p, p, n) for p, n in sorted(counted.items())]
    assert s.positions[-1].max_pos == 11 + len(OUTPUTS) - 1, "the 13-token prompt diverged at step 2"
    for b in s.positions:
        assert 0 <= b.top1_agreement <= 1 and b.mean_kl <= b.max_kl


def test_teacher_forced_positions_cover_every_step(tmp_path):
    """Combined with a teacher-forced run, the KL past the first divergence counts too."""
    lengths, flips = [3, 4, 5], [1, None, 2]
    source = write_bundle(tmp_path / "a.zarr", [SyntheticRequest(_prompt(n), OUTPUTS) for n in lengths])
    forced = write_bundle(tmp_path / "t.zarr", [SyntheticRequest(_prompt(n), OUTPUTS, fed=OUTPUTS[:-1])
                                                for n in lengths], noise=0.05)
    free = write_bundle(tmp_path / "f.zarr", [SyntheticRequest(_prompt(n), _flipped(OUTPUTS, f))
                                              for n, f in zip(lengths, flips)], noise=0.05)
    with open_bundle(source) as a, open_bundle(forced) as t, open_bundle(free) as f:
        c = combine(tensors=compare(a, t), tokens=compare(a, f))
    s = c.stability
    assert s.position_source == "teacher-forced"
    assert sum(b.steps for b in s.positions) == 3 * len(OUTPUTS)
    assert s.diverged == 2 and [b.requests for b in s.buckets] == [3]
    for r in c.requests:  # the request's KL is the teacher-forced run's, every step
        assert len(r.teacher_forced.kl) == len(OUTPUTS)
        assert r.mean_kl == pytest.approx(fmean(r.teacher_forced.kl)) and r.max_kl == max(r.teacher_forced.kl)
        assert r.mean_kl > 0


def test_per_request_totals(twelve):
    for r in twelve.requests:
        assert r.tokens_matched == (len(OUTPUTS) if r.first_divergent_step is None else r.first_divergent_step)
        assert r.mean_kl == pytest.approx(fmean(r.kl)) and r.max_kl == max(r.kl)
    no_kl = with_request_totals(replace(twelve.requests[0], kl=[]))
    assert no_kl.mean_kl is None and no_kl.max_kl is None


def test_output_length_spread(tmp_path):
    """B stops early in one request and runs on in another: lengths 5, 3, 5, 7."""
    b_outputs = [OUTPUTS, OUTPUTS[:3], OUTPUTS, (*OUTPUTS, 9, 9)]
    c = _compare(_pair(tmp_path, [2, 3, 4, 5], [], b_outputs=b_outputs))
    s = c.stability
    assert (s.output_len_mean_a, s.output_len_std_a) == (5.0, 0.0)
    assert s.output_len_mean_b == 5.0 and s.output_len_std_b == pytest.approx(math.sqrt(2))
    assert s.diverged == 2, "a request whose length differs diverges"


def test_bins_have_a_power_of_two_width():
    assert bin_width([]) == 1 and bin_width([5, 36]) == 1 and bin_width([5, 37]) == 2
    assert bin_width(range(8192, 8192 + 64 * 16)) == 32


def test_json_has_the_keys_and_comes_back(twelve):
    data = json.loads(json.dumps(twelve.to_dict(), allow_nan=False))
    request = data["requests"][5]
    assert (request["prompt_len"], request["first_divergent_step"], request["tokens_matched"]) == (7, 3, 3)
    assert request["mean_kl"] == pytest.approx(twelve.requests[5].mean_kl)
    bucket = data["stability"]["buckets"][1]
    assert {k: bucket[k] for k in ("min_len", "max_len", "requests", "divergence_rate")} == \
        {"min_len": 6, "max_len": 9, "requests": 4, "divergence_rate": 0.25}
    assert {"positions", "div_index", "output_len_std_a", "output_len_std_b"} <= set(data["stability"])
    back = Comparison.from_dict(data)
    assert back.stability == twelve.stability and back.requests == twelve.requests
    assert back.to_dict() == data


def test_json_without_stability_still_loads(twelve):
    """Results written before stability existed load, with none."""
    data = twelve.to_dict()
    del data["stability"]
    for request in data["requests"]:
        del request["mean_kl"], request["max_kl"], request["tokens_matched"]
    back = Comparison.from_dict(data)
    assert back.stability is None and back.requests[0].mean_kl is None


def test_cli_json_holds_the_stability(tmp_path):
    a, b = _pair(tmp_path, [2, 3, 4, 5], [None, 1, None, 0])
    result = run_cli("compare", a, b, "--json", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["stability"]["buckets"][0]["divergence_rate"] == 0.5
    assert [r["first_divergent_step"] for r in data["requests"]] == [None, 1, None, 0]
