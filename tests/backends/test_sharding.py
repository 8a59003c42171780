"""Unsharding tensor-parallel shards into canonical tensors, the replicas' check, and the CPU
thread binding: no engine (the engine-level tests are in test_vllm_tp.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ptrace import hardware
from ptrace.backends import sharding
from ptrace.backends.base import TensorSite
from ptrace.backends.rank_gather import RankGather, RankRows
from ptrace.bundle_spec.schema import ParallelInfo


def test_thread_binding_splits_the_usable_cpus_evenly():
    assert hardware.cpu_thread_binding(2, (0, 1)) == "0|1"
    assert hardware.cpu_thread_binding(2, (4, 5, 6, 7, 8)) == "4,5|6,7"
    assert hardware.cpu_thread_binding(1, (0, 1)) == "0,1"
    with pytest.raises(ValueError, match="3 ranks cannot be bound to 2"):
        hardware.cpu_thread_binding(3, (0, 1))
    assert set(hardware.usable_cpus()) <= set(range(1024)) and hardware.usable_cpus()


def test_heads_are_concatenated_in_rank_order():
    whole = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)  # rows, heads, head_dim
    shards = [whole[:, :2], whole[:, 2:]]
    unsharded, found = sharding.unshard("layers.0.q", shards, "float32", kv_heads=2)
    np.testing.assert_array_equal(unsharded, whole)
    assert found == []


def test_kv_heads_fewer_than_ranks_are_replicas_and_checked():
    """Two KV heads over four ranks: ranks 0 and 1 hold head 0, ranks 2 and 3 head 1."""
    head0, head1 = np.ones((2, 1, 4), np.float32), np.full((2, 1, 4), 2, np.float32)
    bad = head1.copy()
    bad[1, 0, 3] += 0.5
    unsharded, found = sharding.unshard("layers.3.k", [head0, head0, head1, bad], "float32", kv_heads=2)
    np.testing.assert_array_equal(unsharded, np.concatenate([head0, head1], axis=1))
    assert found == [sharding.Disagreement((2, 3), (1,), 0.5)]
    assert sharding.rank_shards("layers.3.k", 4, heads=8, kv_heads=2) == ("heads 0-0",) * 2 + ("heads 1-1",) * 2
    assert sharding.rank_shards("layers.3.q", 4, heads=8, kv_heads=2)[3] == "heads 6-7"


def test_replicas_are_compared_bit_for_bit():
    """NaN equals NaN bit for bit (not a finding); bfloat16 differences are measured as floats."""
    nan = np.array([[np.nan, 1.0]], np.float32)
    assert sharding.unshard("layers.0.out", [nan, nan.copy()], "float32", kv_heads=1)[1] == []
    one, other = np.array([[0x3F80]], np.uint16), np.array([[0x3F81]], np.uint16)  # 1.0, 1.0078125
    (found,) = sharding.unshard("logits", [one, other], "bfloat16", kv_heads=1)[1]
    assert found.ranks == (0, 1) and found.max_abs_diff == pytest.approx(0.0078125)


def _rows(name, array, request=0, step=0, start=0):
    return RankRows(TensorSite(name, request, step, start), "float32", array.shape, array.tobytes()).to_plain()


def test_rank_gather_shows_whole_tensors_and_keeps_disagreements_as_findings():
    seen = {}

    def show(site, tensor):
        seen[site.name] = tensor.numpy()

    gather = RankGather(ParallelInfo(tensor_parallel_size=2, heads=4, kv_heads=2), show)
    out = np.arange(6, dtype=np.float32).reshape(3, 2)
    drifted = out.copy()
    drifted[2, 1] = 9.0
    q = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    gather.deliver([[_rows("layers.0.q", q[:, :2]), _rows("layers.0.out", out, start=4)],
                    [_rows("layers.0.q", q[:, 2:]), _rows("layers.0.out", drifted, start=4)]])
    np.testing.assert_array_equal(seen["layers.0.q"], q)
    np.testing.assert_array_equal(seen["layers.0.out"], out)  # rank 0's copy
    layout = gather.layout({"layers.0.q", "layers.0.out"}, num_layers=1, moe_layers=())
    (finding,) = layout.replica_findings
    assert (finding.tensor, finding.ranks, finding.positions, finding.max_abs_diff) == ("layers.0.out", (0, 1), (6,), 4.0)
    assert [t.name for t in layout.tensors] == ["layers.0.q", "layers.0.out"]
    assert layout.tensors[0].shards == ("heads 0-1", "heads 2-3")


def test_rank_gather_refuses_ranks_that_kept_different_tensors():
    gather = RankGather(ParallelInfo(tensor_parallel_size=2, heads=4, kv_heads=2), lambda *_: None)
    out = np.zeros((1, 2), np.float32)
    with pytest.raises(Exception, match="different numbers of tensors"):
        gather.deliver([[_rows("layers.0.out", out)], []])
    with pytest.raises(Exception, match="different tensors at one place"):
        gather.deliver([[_rows("layers.0.out", out)], [_rows("layers.0.attn", out)]])


def test_vllm_binds_rank_threads_unless_the_user_did(example_model, monkeypatch):
    """ptrace's binding is recorded as ptrace's and removed when the engine closes; a user's own
    binding is kept and recorded as the user's (no engine starts: the layout is checked first)."""
    from ptrace.backends.base import LoadOptions
    from ptrace.backends.model_dir import read_config
    from ptrace.backends.vllm import VllmBackend

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    options = LoadOptions(example_model, "float32", "cpu", {"tensor_parallel_size": 1,
                                                            "distributed_executor_backend": "mp"})
    engine = VllmBackend()
    layout = engine._parallel_layout(options, read_config(example_model))
    assert (layout.thread_binding, layout.thread_binding_source) == (hardware.cpu_thread_binding(1), "ptrace")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == layout.thread_binding
    engine.close()
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    layout = VllmBackend()._parallel_layout(options, read_config(example_model))
    assert (layout.thread_binding, layout.thread_binding_source) == ("0", "user")


def test_vllm_refuses_the_ray_executor_on_the_cpu(example_model):
    from ptrace.backends.base import LoadOptions
    from ptrace.backends.model_dir import read_config
    from ptrace.backends.vllm import VllmBackend
    from ptrace.errors import BackendUnavailableError

    options = LoadOptions(example_model, "float32", "cpu", {"tensor_parallel_size": 2,
                                                            "distributed_executor_backend": "ray"})
    with pytest.raises(BackendUnavailableError, match="Ray executor does not run on the CPU"):
        VllmBackend()._parallel_layout(options, read_config(example_model))


@pytest.mark.parametrize(("size", "refusal"), [(3, "does not divide the model's 4 attention heads"),
                                               (4, "needs 4 CPUs and this process may use")])
def test_a_capture_plan_refuses_bad_tensor_parallel_sizes_before_any_engine(example_model, tmp_path, size, refusal):
    """Refused where the plan is made (no engine, not even vLLM, is needed for that)."""
    from ptrace.capture.plan import CaptureConfig, plan_captures
    from ptrace.errors import UsageError

    if size > 2 and len(hardware.usable_cpus()) >= size:
        pytest.skip(f"this machine has {len(hardware.usable_cpus())} CPUs")
    config = CaptureConfig(backend="vllm", model=example_model, output=tmp_path / "tp.zarr", random_input_ids=8,
                           engine_options={"tensor_parallel_size": str(size)})
    with pytest.raises(UsageError, match=refusal):
        plan_captures([config])
    assert not (tmp_path / "tp.zarr").exists()
