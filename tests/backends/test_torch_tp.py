"""Tensor-parallel capture on HF transformers (``--backend torch -E tensor_parallel_size=2``):
ptrace's process is rank 0 and starts the other rank (gloo on the CPU). A TP=2 run's tensors are
stored as a TP=1 run records them and compare with a TP=1 capture of the same engine.

Three engines start in this file: TP=2 (three runs on it), TP=1, and a TP=2 one whose rank 1
fails on purpose. The refusals start none.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from ptrace import hardware
from ptrace.backends import torch_parallel
from ptrace.backends.base import EngineTensor, Interceptor, TensorSite
from ptrace.backends.model_dir import read_config
from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.schema import CaptureSettings, SamplingParams
from ptrace.bundle_spec.validation import validate_bundle
from ptrace.capture import whatif
from ptrace.capture.session import CaptureConfig, capture_runs
from ptrace.compare import compare
from ptrace.errors import BackendError, UsageError

pytest.importorskip("accelerate")
TP2 = {"tensor_parallel_size": "2"}
needs_two_cpus = pytest.mark.skipif(len(hardware.usable_cpus()) < 2, reason="TP=2 on the CPU needs 2 usable CPUs")
#: Noise on rank 1's shard of layer 1's q only, and on every rank's copy of layer 2's mlp_norm.
RANK1_NOISE = (whatif.parse("noise:layers.1.q:std=0.5:ranks=1"), whatif.parse("noise:layers.2.mlp_norm:std=0.5"))


def _capture(model, directory, name, **options):
    return CaptureConfig(backend="torch", model=model, output=directory / f"{name}.zarr", random_input_ids=12,
                         num_requests=2, sampling=SamplingParams(max_new_tokens=5, logprobs=3, seed=3),
                         settings=CaptureSettings(tensors=("*",)), engine_options=options, command=("test",))


@pytest.fixture(scope="module")
def tp2_bundles(example_model, tmp_path_factory):
    """One TP=2 engine: a free run, the same run with rank 1's q shard perturbed and every
    rank's shards kept, and the free run again."""
    base = _capture(example_model, tmp_path_factory.mktemp("tp2"), "free", **TP2)
    perturbed = replace(base, output=base.output.with_name("rank1.zarr"), whatifs=RANK1_NOISE,
                        settings=CaptureSettings(tensors=("*",), per_rank=True))
    again = replace(base, output=base.output.with_name("again.zarr"))
    return capture_runs([base, perturbed, again])


@pytest.fixture(scope="module")
def tp1_bundle(example_model, tmp_path_factory):
    return capture_runs([_capture(example_model, tmp_path_factory.mktemp("tp1"), "free")])[0]


@needs_two_cpus
def test_tp2_capture_records_its_layout_and_unsharded_tensors(tp2_bundles, tp1_bundle, example_model):
    tp2_bundle = tp2_bundles[0]
    assert validate_bundle(tp2_bundle) == []
    config = read_config(example_model)
    with open_bundle(tp2_bundle) as two, open_bundle(tp1_bundle) as one:
        layout = two.parallel_info()
        assert layout is not None and one.parallel_info() is None
        assert (layout.tensor_parallel_size, layout.heads, layout.kv_heads, layout.executor) == (
            2, config["num_attention_heads"], config["num_key_value_heads"], "gloo")
        assert layout.replica_findings == () and not layout.per_rank
        by_name = {t.name: t for t in layout.tensors}
        assert set(by_name) == set(two.manifest.tensor_names) == set(one.manifest.tensor_names)
        assert by_name["layers.0.q"].shards == ("heads 0-1", "heads 2-3")
        assert by_name["layers.0.k"].unsharded == "concat_heads" and by_name["logits"].unsharded == "all_gathered"
        assert by_name["embed"].unsharded == "replicated"  # transformers' plan does not split it
        for name in two.manifest.tensor_names:
            assert two.tensor(0, name).shape == one.tensor(0, name).shape, name
        assert two.settings_info().values["tensor_parallel_size"] == 2


@needs_two_cpus
def test_tp2_compares_with_tp1_same_tokens_every_tensor(tp2_bundles, tp1_bundle):
    with open_bundle(tp2_bundles[0]) as two, open_bundle(tp1_bundle) as one:
        comparison = compare(two, one)
    assert comparison.verdict == "pass", comparison.summary
    assert comparison.token_match_rate == 1.0 and comparison.missing == []
    with open_bundle(tp1_bundle) as bundle:
        assert {t.name for t in comparison.tensors} == set(bundle.manifest.tensor_names)
    assert any(d["key"] == "tensor_parallel_size" for d in comparison.settings_diff)
    # the split changes the summation order only: heads close, the rest within rounding
    assert max(t.max_abs_err for t in comparison.tensors) < 1e-4


@needs_two_cpus
def test_a_what_if_on_one_rank_stays_on_its_shard(tp2_bundles):
    """Noise on rank 1's q heads: its own shard differs, rank 0's does not. Noise on a replicated
    tensor draws the same on every rank: the replicas still agree. The ranks stay in lockstep
    (the run after it is bit for bit the first one)."""
    free, perturbed, again = tp2_bundles
    with open_bundle(free) as clean, open_bundle(perturbed) as noisy, open_bundle(again) as repeat:
        assert noisy.parallel_info().per_rank and noisy.parallel_info().replica_findings == ()
        assert not np.array_equal(noisy.tensor(0, "layers.2.mlp_norm"), clean.tensor(0, "layers.2.mlp_norm"))
        whole = clean.tensor(0, "layers.1.q")
        heads = whole.shape[1] // 2
        np.testing.assert_array_equal(noisy.tensor(0, "x.rank0.layers.1.q"), whole[:, :heads])
        assert not np.array_equal(noisy.tensor(0, "x.rank1.layers.1.q"), whole[:, heads:])
        np.testing.assert_array_equal(noisy.tensor(0, "layers.0.q"), clean.tensor(0, "layers.0.q"))
        for name in clean.manifest.tensor_names:
            np.testing.assert_array_equal(repeat.tensor(1, name), clean.tensor(1, name))


class _FailOnRank1(Interceptor):
    """Raises in rank 1's process at the first layer-2 q it sees (a rank that dies mid-run)."""

    on_ranks = True

    def wants(self, name: str) -> bool:
        return name == "layers.2.q"

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> None:
        if site.rank == 1:
            raise RuntimeError("rank 1 broke on purpose")


@needs_two_cpus
def test_a_rank_that_dies_ends_the_capture_with_its_error(example_model, tmp_path):
    config = _capture(example_model, tmp_path, "broken", **TP2)
    with pytest.raises(BackendError, match="rank 1: RuntimeError: rank 1 broke on purpose"):
        capture_runs([config], interceptors=[_FailOnRank1()])
    assert not config.output.exists()


def test_bad_sizes_are_refused_in_one_line_before_any_engine_starts(example_model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ptrace", "capture", "--backend", "torch", "-m", str(example_model),
                             "--random-input-ids", "8", "-E", "tensor_parallel_size=3", "-o", str(tmp_path / "x.zarr")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert "tensor_parallel_size=3 does not divide the model's 4 attention heads" in lines[0], result.stderr
    assert len([line for line in lines if not line.startswith("hint")]) == 1, result.stderr
    assert not (tmp_path / "x.zarr").exists()
    many = 2 * len(hardware.usable_cpus())
    with pytest.raises(UsageError, match=f"needs {many} CPUs"):
        torch_parallel.check(many, example_model, {"num_attention_heads": many, "num_key_value_heads": many}, "cpu")
    with pytest.raises(UsageError, match="2 KV heads"):
        torch_parallel.check(4, example_model, {"num_attention_heads": 4, "num_key_value_heads": 2}, "cpu")
