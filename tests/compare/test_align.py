"""Which positions are compared, on synthetic bundles (no engine): the toy model's rows depend
only on the tokens fed so far, so comparable rows of two runs are identical, and a row compared
where it should not be (or read from the wrong row) shows up as an error."""

from __future__ import annotations

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle, validate_bundle
from ptrace.compare import compare
from ptrace.compare.align import align, comparable_positions
from ptrace.errors import ComparisonError
from ptrace.testing.bundles import TENSORS, SyntheticRequest, write_bundle

PROMPT = (1, 2, 3, 4)
OUTPUTS = (5, 6, 7, 8, 9)
#: the same run, but its token at step 2 differs: fed positions 0..5 are shared, 6 is not
FLIPPED = (5, 6, 10, 11, 12)


def _pair(tmp_path, a: list[SyntheticRequest], b: list[SyntheticRequest], **b_options):
    return (open_bundle(write_bundle(tmp_path / "a.zarr", a)),
            open_bundle(write_bundle(tmp_path / "b.zarr", b, **b_options)))


def _assert_identical_where_compared(comparison, positions: int) -> None:
    assert [t.name for t in comparison.tensors] == list(TENSORS)
    for t in comparison.tensors:
        assert t.positions == positions and t.max_abs_err == 0 and t.verdict == "pass", t


def test_synthetic_bundles_are_valid(tmp_path):
    path = write_bundle(tmp_path / "a.zarr", [SyntheticRequest(PROMPT, OUTPUTS),
                                              SyntheticRequest(PROMPT, FLIPPED, fed=OUTPUTS[:-1], positions=(1, 6))])
    assert validate_bundle(path) == []


def test_free_running_divergence_ends_the_comparable_positions_at_the_first_differing_fed_token(tmp_path):
    a, b = _pair(tmp_path, [SyntheticRequest(PROMPT, OUTPUTS)], [SyntheticRequest(PROMPT, FLIPPED)])
    np.testing.assert_array_equal(comparable_positions(a, b, 0), np.arange(6))
    c = compare(a, b)
    request = c.requests[0]
    assert request.first_divergent_step == 2 and request.divergence.step == 2
    assert request.compared_positions == 6 and c.first_divergent_step == 2
    # KL for the steps predicted at comparable positions (3, 4, 5): identical distributions there
    assert request.kl == [0.0, 0.0, 0.0] and request.kl_source == "full logits"
    _assert_identical_where_compared(c, 6)


def test_teacher_forced_run_stays_aligned_past_the_divergent_token(tmp_path):
    forced = SyntheticRequest(PROMPT, FLIPPED, fed=OUTPUTS[:-1])  # fed A's tokens, chose its own
    a, b = _pair(tmp_path, [SyntheticRequest(PROMPT, OUTPUTS)], [forced])
    np.testing.assert_array_equal(comparable_positions(a, b, 0), np.arange(8))
    c = compare(a, b)
    assert c.requests[0].first_divergent_step == 2 and c.requests[0].compared_positions == 8
    assert len(c.requests[0].kl) == len(OUTPUTS)
    _assert_identical_where_compared(c, 8)


def test_different_captured_positions_intersect(tmp_path):
    a, b = _pair(tmp_path, [SyntheticRequest(PROMPT, OUTPUTS, positions=(0, 1, 2, 3, 5, 6, 7))],
                 [SyntheticRequest(PROMPT, OUTPUTS, positions=(2, 3, 4, 6))])
    aligned = align(a, b, 0)
    np.testing.assert_array_equal(aligned.positions, [2, 3, 6])
    np.testing.assert_array_equal(aligned.rows_a, [2, 3, 5])
    np.testing.assert_array_equal(aligned.rows_b, [0, 1, 3])
    c = compare(a, b)
    _assert_identical_where_compared(c, 3)
    assert all(t.position_index.tolist() == [2, 3, 6] for t in c.tensors)
    # step 0 is predicted at position 3 (captured by both), step 1 at 4 (not by A): top-k KL instead
    assert c.requests[0].kl_source.startswith("top-")


def test_captured_positions_intersect_and_stop_at_a_free_running_divergence(tmp_path):
    a, b = _pair(tmp_path, [SyntheticRequest(PROMPT, OUTPUTS)],
                 [SyntheticRequest(PROMPT, FLIPPED, positions=(0, 2, 4, 6, 7))])
    np.testing.assert_array_equal(comparable_positions(a, b, 0), [0, 2, 4])
    _assert_identical_where_compared(compare(a, b), 3)


def test_a_batch_where_only_request_2_differs(tmp_path):
    same = [SyntheticRequest(PROMPT, OUTPUTS), SyntheticRequest((7, 3), (4, 4, 4))]
    a, b = _pair(tmp_path, [*same, SyntheticRequest((9, 8, 7), (1, 2, 3, 4))],
                 [*same, SyntheticRequest((9, 8, 7), (1, 5, 6, 7))])
    c = compare(a, b)
    assert [r.compared_positions for r in c.requests] == [8, 4, 4]
    assert [r.first_divergent_step for r in c.requests] == [None, None, 1]
    assert [r.token_match_rate for r in c.requests] == [1.0, 1.0, 0.25]
    assert c.first_divergent_step == 1 and c.token_match_rate == pytest.approx(9 / 12)
    assert c.first_divergent_tensor is None and c.verdict != "pass"
    _assert_identical_where_compared(c, 16)


def test_noise_in_one_run_is_measured_only_where_the_runs_are_comparable(tmp_path):
    a, b = _pair(tmp_path, [SyntheticRequest(PROMPT, OUTPUTS)], [SyntheticRequest(PROMPT, FLIPPED)], noise=0.1)
    c = compare(a, b)
    assert all(t.positions == 6 and t.verdict == "fail" and 0 < t.cos_sim < 1 for t in c.tensors)
    assert c.first_divergent_tensor == "embed" and c.first_divergent_position == 0


def test_bundles_of_different_inputs_or_models_are_refused(tmp_path):
    a = open_bundle(write_bundle(tmp_path / "a.zarr", [SyntheticRequest(PROMPT, OUTPUTS)]))
    two = open_bundle(write_bundle(tmp_path / "two.zarr", [SyntheticRequest(PROMPT, OUTPUTS)] * 2))
    other = open_bundle(write_bundle(tmp_path / "other.zarr", [SyntheticRequest((4, 3, 2, 1), OUTPUTS)]))
    wider = open_bundle(write_bundle(tmp_path / "wider.zarr", [SyntheticRequest(PROMPT, OUTPUTS)], hidden_size=16))
    with pytest.raises(ComparisonError, match="have 1 and 2 requests"):
        compare(a, two)
    with pytest.raises(ComparisonError, match="request 0 has different prompts"):
        compare(a, other)
    with pytest.raises(ComparisonError, match=r"tensor embed has rows of shape \(8,\) in one and \(16,\)") as info:
        compare(a, wider)
    assert isinstance(info.value, ValueError) and info.value.hint
