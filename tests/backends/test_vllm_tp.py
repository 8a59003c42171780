"""Tensor-parallel capture on vLLM: a TP=2 run's tensors stored as a TP=1 run records them,
checked against HF transformers and against vLLM at TP=1, and TP=1 bundles replayed at TP=2.

Runs in the vLLM environment (``.venvs/vllm``), like the other vLLM tests. A TP=2 engine starts
its rank processes (a minute or two on a small, busy machine): the file starts two, one per
module-scoped fixture. The refusals start none.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.backend("vllm")

from ptrace import hardware  # noqa: E402
from ptrace.backends.base import LoadOptions  # noqa: E402
from ptrace.backends.model_dir import read_config  # noqa: E402
from ptrace.backends.registry import create_backend  # noqa: E402
from ptrace.bundle_spec import open_bundle  # noqa: E402
from ptrace.bundle_spec.schema import CaptureSettings, SamplingParams  # noqa: E402
from ptrace.bundle_spec.validation import validate_bundle  # noqa: E402
from ptrace.capture import whatif  # noqa: E402
from ptrace.capture.session import CaptureConfig, capture_runs  # noqa: E402
from ptrace.compare import compare  # noqa: E402
from ptrace.errors import UsageError  # noqa: E402
from ptrace.replay.plan import ReplayConfig  # noqa: E402
from ptrace.replay.session import replay  # noqa: E402
from tests.backends.test_moe import MOE_MODEL  # noqa: E402

TP2 = {"tensor_parallel_size": "2"}
needs_two_cpus = pytest.mark.skipif(len(hardware.usable_cpus()) < 2, reason="TP=2 on the CPU needs 2 usable CPUs")


#: Noise on rank 1's shard of layer 1's q (sharded) and its copy of layer 2's mlp_norm (replicated).
RANK1_NOISE = tuple(whatif.parse(text) for text in ("noise:layers.1.q:std=0.5:ranks=1",
                                                    "noise:layers.2.mlp_norm:std=0.5:ranks=1"))
#: Fed to a teacher-forced run instead of the engine's own choices (which then differ from them).
FORCED = ((5, 6, 7, 8), (900, 901, 902, 903))


def _captures(model, directory, **options):
    """A free-running capture of every tensor and a teacher-forced one, on one engine."""
    base = CaptureConfig(backend="vllm", model=model, output=directory / "free.zarr", random_input_ids=12,
                         num_requests=2, sampling=SamplingParams(max_new_tokens=5, logprobs=3, seed=3),
                         settings=CaptureSettings(tensors=("*",)), engine_options=options, command=("test",))
    forced = replace(base, output=directory / "forced.zarr", forced_tokens=FORCED,
                     settings=CaptureSettings(tensors=("logits",)))
    runs = [base, forced]
    if options:  # one rank's shards perturbed, every rank's kept
        runs.append(replace(base, output=directory / "rank1.zarr", whatifs=RANK1_NOISE,
                            settings=CaptureSettings(tensors=("*",), per_rank=True)))
    return capture_runs(runs)


@pytest.fixture(scope="module")
def tp2_bundles(example_model, tmp_path_factory):
    return _captures(example_model, tmp_path_factory.mktemp("tp2"), **TP2)


@pytest.fixture(scope="module")
def tp1_bundles(example_model, tmp_path_factory):
    return _captures(example_model, tmp_path_factory.mktemp("tp1"))


@pytest.fixture(scope="module")
def tp2_bundle(tp2_bundles):
    return tp2_bundles[0]


@pytest.fixture(scope="module")
def tp1_bundle(tp1_bundles):
    return tp1_bundles[0]


@needs_two_cpus
def test_tp2_capture_records_its_layout_and_unsharded_tensors(tp2_bundle, tp1_bundle, example_model):
    """Every tensor is stored in the shape a TP=1 run records (q/k/v concatenated over the
    ranks' heads), the layout says how, and the ranks' replicas agree."""
    assert validate_bundle(tp2_bundle) == []
    config = read_config(example_model)
    with open_bundle(tp2_bundle) as two, open_bundle(tp1_bundle) as one:
        layout = two.parallel_info()
        assert layout is not None and one.parallel_info() is None
        assert (layout.tensor_parallel_size, layout.heads, layout.kv_heads) == (
            2, config["num_attention_heads"], config["num_key_value_heads"])
        assert layout.executor == "mp" and layout.thread_binding and layout.replica_findings == ()
        by_name = {t.name: t for t in layout.tensors}
        assert set(by_name) == set(two.manifest.tensor_names) == set(one.manifest.tensor_names)
        assert by_name["layers.0.q"].dims == "t h(tp) d" and by_name["layers.0.q"].unsharded == "concat_heads"
        assert by_name["layers.0.k"].shards == ("heads 0-0", "heads 1-1")
        assert by_name["layers.0.attn"].unsharded == "all_reduced"
        assert by_name["logits"].unsharded == "all_gathered"
        for name in two.manifest.tensor_names:
            assert two.tensor(0, name).shape == one.tensor(0, name).shape, name
        # the same engine and arithmetic but for the split: tokens identical, heads close
        assert two.output_ids(1).tolist() == one.output_ids(1).tolist()
        np.testing.assert_allclose(two.tensor(1, "layers.2.q"), one.tensor(1, "layers.2.q"), atol=1e-4)
        assert two.settings_info().values["tensor_parallel_size"] == 2


@needs_two_cpus
def test_tp2_capture_replays_on_torch_with_every_tensor_compared(tp2_bundle, tmp_path):
    result = replay(ReplayConfig(bundle=tp2_bundle, backend="torch", output=tmp_path / "hf"))
    comparison = result.primary
    assert comparison.verdict == "pass", comparison.summary
    assert comparison.token_match_rate == 1.0 and comparison.missing == []
    with open_bundle(tp2_bundle) as bundle:
        assert {t.name for t in comparison.tensors} == set(bundle.manifest.tensor_names)
    assert any(d["key"] == "tensor_parallel_size" for d in comparison.settings_diff)
    assert comparison.a["parallel"]["tensor_parallel_size"] == 2


@needs_two_cpus
def test_a_moe_model_at_tp2_replays_on_torch_with_the_same_expert_choices(tmp_path):
    """A mixture-of-experts model at TP=2 (the experts' intermediate size split over the ranks,
    the router replicated): its routing tensors are recorded unsharded, and HF transformers at
    TP=1 chooses the same experts for every token."""
    bundle, = capture_runs([CaptureConfig(
        backend="vllm", model=MOE_MODEL, output=tmp_path / "moe.zarr", random_input_ids=12, num_requests=2,
        sampling=SamplingParams(max_new_tokens=5), settings=CaptureSettings(tensors=("*",)),
        engine_options=TP2, command=("test",))])
    with open_bundle(bundle) as recorded:
        parallel = recorded.parallel_info()
        layout = {t.name: t.unsharded for t in parallel.tensors}
        assert {layout[f"layers.0.{part}"] for part in ("router", "experts", "expert_weights")} == {"replicated"}
        assert layout["layers.0.mlp"] == "all_reduced" and parallel.replica_findings == ()
    comparison = replay(ReplayConfig(bundle=bundle, backend="torch", output=tmp_path / "hf")).primary
    assert comparison.verdict == "pass", comparison.summary
    assert comparison.token_match_rate == 1.0 and comparison.missing == []
    assert comparison.routing["choices"] > 0 and comparison.routing["flip_count"] == 0, comparison.routing


@needs_two_cpus
def test_tp1_bundle_replays_at_tp2_with_teacher_forcing(tp1_bundle, tmp_path):
    """Teacher forcing's processor runs in the ranks' processes; its greedy choices come back."""
    result = replay(ReplayConfig(bundle=tp1_bundle, backend="vllm", engine_options=TP2, output=tmp_path / "tp2"))
    comparison = result.primary
    assert comparison.verdict == "pass", comparison.summary
    assert comparison.token_match_rate == 1.0 and comparison.missing == []
    assert comparison.b["parallel"]["tensor_parallel_size"] == 2


@needs_two_cpus
def test_teacher_forcing_at_tp2_records_the_ranks_greedy_choices(tp2_bundles, tp1_bundles):
    """The forcing processor runs in each rank's process: the choices it records there come
    back, so a forced run's outputs are the engine's own choices, as at TP=1."""
    with open_bundle(tp2_bundles[1]) as two, open_bundle(tp1_bundles[1]) as one, \
            open_bundle(tp2_bundles[0]) as free:
        for request, fed in enumerate(FORCED):
            chosen = two.output_ids(request).tolist()
            assert chosen == one.output_ids(request).tolist()
            assert chosen[0] == free.output_ids(request)[0]  # nothing fed yet: the free run's choice
            assert chosen[:len(fed)] != list(fed)  # the choices, not the tokens fed
            assert two.input_ids(request).tolist()[-len(fed):] == list(fed)


@needs_two_cpus
def test_per_rank_shards_localize_an_injection_on_one_rank(tp2_bundles):
    """Noise on rank 1 only: its own shard of q differs, rank 0's does not; its copy of a
    replicated tensor disagrees with rank 0's, which is a finding, not an error."""
    free, _, perturbed = tp2_bundles
    with open_bundle(free) as clean, open_bundle(perturbed) as noisy:
        layout = noisy.parallel_info()
        assert layout.per_rank and not clean.parallel_info().per_rank
        assert "x.rank1.layers.0.q" in noisy.tensor_names and "x.rank0.logits" not in noisy.tensor_names
        prompt = len(clean.prompt_ids(0))
        q_clean = clean.tensor(0, "layers.1.q")[:prompt]
        heads = q_clean.shape[1] // 2
        own = [noisy.tensor(0, f"x.rank{rank}.layers.1.q")[:prompt] for rank in (0, 1)]
        np.testing.assert_array_equal(own[0], q_clean[:, :heads])  # rank 0 untouched
        assert np.abs(own[1] - q_clean[:, heads:]).max() > 0.1  # rank 1 perturbed
        np.testing.assert_array_equal(noisy.tensor(0, "layers.1.q")[:prompt], np.concatenate(own, axis=1))
        np.testing.assert_array_equal(noisy.tensor(0, "layers.0.out")[:prompt], clean.tensor(0, "layers.0.out")[:prompt])
        assert compare(clean, noisy).missing == []  # shards of a per-rank run have no counterpart to miss
    assert {(f.tensor, f.ranks) for f in layout.replica_findings} == {("layers.2.mlp_norm", (0, 1))}
    assert all(f.max_abs_diff > 0.1 and f.positions for f in layout.replica_findings)


# -- refused before any engine starts --------------------------------------------------------------

def _load(model, **options):
    engine = create_backend("vllm")
    try:
        engine.load(LoadOptions(model, "float32", "cpu", {k: str(v) for k, v in options.items()}))
    finally:
        engine.close()


def test_tp_size_that_does_not_divide_the_heads_is_refused(example_model):
    heads = read_config(example_model)["num_attention_heads"]
    size = next(n for n in range(2, heads + 2) if heads % n)
    with pytest.raises(UsageError, match=f"does not divide the model's {heads} attention heads"):
        _load(example_model, tensor_parallel_size=size)


def test_more_ranks_than_usable_cpus_is_refused(example_model, monkeypatch):
    cpus = len(hardware.usable_cpus())
    heads = read_config(example_model)["num_attention_heads"]
    size = next((n for n in range(cpus + 1, heads + 1) if heads % n == 0), None)
    if size is None:
        pytest.skip(f"this machine has {cpus} CPUs: no head-dividing size exceeds them")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with pytest.raises(UsageError, match=f"needs {size} CPUs and this process may use {cpus}"):
        _load(example_model, tensor_parallel_size=size)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # refused before binding anything
