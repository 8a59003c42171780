"""What ``TensorRecorder`` keeps per request stays small over a long batched run, and still says
exactly which positions were captured."""

from __future__ import annotations

import pytest
import torch

from ptrace.backends.base import TensorSite
from ptrace.backends.torch_tensor import TorchTensor
from ptrace.bundle_spec import BundleWriter
from ptrace.capture.recorder import StepSelection, TensorRecorder
from ptrace.errors import BackendError

NAMES = ["embed", "layers.0.out"]


def _show(recorder: TensorRecorder, request: int, step: int, start: int, rows: int) -> None:
    for name in NAMES:
        recorder.on_tensor(TensorSite(name, request, step, start), TorchTensor(torch.ones(rows, 4)))


def _recorder(tmp_path, steps: str | None = None) -> TensorRecorder:
    return TensorRecorder(BundleWriter(tmp_path / "b.zarr"), NAMES, "stats", StepSelection.parse(steps))


def test_a_long_batched_run_keeps_one_run_of_positions_per_request(tmp_path):
    recorder, prompt, steps = _recorder(tmp_path), 10, 300
    for request in (0, 1):  # chunked prefill: two spans of step 0
        _show(recorder, request, 0, 0, 6)
        _show(recorder, request, 0, 6, prompt - 6)
    for step in range(1, steps + 1):
        for request in (0, 1):
            _show(recorder, request, step, prompt + step - 1, 1)
    for request in (0, 1):
        assert recorder.positions(request).tolist() == list(range(prompt + steps))
        assert len(recorder._spans.runs[request]) == 1  # not one entry per step


def test_selected_steps_leave_gaps_in_the_positions(tmp_path):
    recorder = _recorder(tmp_path, "0,3-4")
    for step in range(6):
        _show(recorder, 0, step, 0 if step == 0 else 4 + step, 5 if step == 0 else 1)
    assert recorder.positions(0).tolist() == [0, 1, 2, 3, 4, 7, 8]


def test_a_span_with_other_rows_or_out_of_order_is_refused(tmp_path):
    recorder = _recorder(tmp_path)
    recorder.on_tensor(TensorSite("embed", 0, 0, 0), TorchTensor(torch.ones(5, 4)))
    with pytest.raises(BackendError, match="other tensors"):
        recorder.on_tensor(TensorSite("layers.0.out", 0, 0, 0), TorchTensor(torch.ones(4, 4)))
    recorder.on_tensor(TensorSite("embed", 0, 1, 5), TorchTensor(torch.ones(1, 4)))
    with pytest.raises(BackendError, match="arrived after"):  # its rows would precede step 1's
        recorder.on_tensor(TensorSite("layers.0.out", 0, 0, 0), TorchTensor(torch.ones(5, 4)))


def test_logits_keep_their_own_spans(tmp_path):
    """Without prompt logprobs the prefill's logits are its last row (SPEC.md section 6): that
    is not a span of other rows, and the positions stay those of the other tensors."""
    recorder = TensorRecorder(BundleWriter(tmp_path / "b.zarr"), [*NAMES, "logits"], "stats", StepSelection())
    for step, start, rows in ((0, 0, 5), (1, 5, 1), (2, 6, 1)):
        _show(recorder, 0, step, start, rows)
        logit_start = 4 if step == 0 else start
        recorder.on_tensor(TensorSite("logits", 0, step, logit_start), TorchTensor(torch.ones(1 if step == 0 else rows, 4)))
    assert recorder.positions(0).tolist() == list(range(7))
    assert recorder._logit_spans.positions(0).tolist() == [4, 5, 6]
