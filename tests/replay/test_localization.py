"""Localization that holds: a planted fault in one branch of one layer is named exactly, on two
architectures and two engines; dtype changes are judged against a calibration run; results stay
per request; --localize measures local error and bisects the layers that restore the tokens."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ptrace.bundle_spec import open_bundle
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, whatif
from ptrace.compare import compare
from ptrace.replay.plan import TEACHER, ReplayConfig
from ptrace.replay.session import replay
from tests.replay.test_cross_engine import vllm_env

#: The weight each branch's fault perturbs, and the canonical tensor that must be named.
BRANCHES = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
ENGINES = [pytest.param("torch"), pytest.param("vllm", marks=vllm_env)]


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory, example_model):
    """A second architecture: Llama layout, tied embeddings, grouped-query attention (4 query
    heads share 1 key/value head), 6 layers, random weights at a larger scale than the example's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("llama") / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                         initializer_range=0.08, rms_norm_eps=1e-5, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        shutil.copy(example_model / name, target / name)
    return target


def _plant(model_dir, target, layer: int, branch: str, scale: float):
    """A copy of ``model_dir`` with one weight matrix perturbed by ``scale`` of its mean |w|."""
    shutil.copytree(model_dir, target)
    weights = load_file(target / "model.safetensors")
    key = f"model.layers.{layer}.{BRANCHES[branch]}.weight"
    w = weights[key]
    noise = np.random.default_rng(layer).standard_normal(w.shape) * scale * np.abs(w).mean()
    weights[key] = (w + noise).astype(w.dtype)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _source(model, out, **settings):
    return capture(CaptureConfig(backend="torch", model=model, output=out, random_input_ids=24, num_requests=2,
                                 sampling=SamplingParams(max_new_tokens=4, seed=42),
                                 settings=CaptureSettings(tensors=("*",)), command=("test",), **settings))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, example_model, llama_model):
    folder = tmp_path_factory.mktemp("sources")
    return {"qwen2": (example_model, _source(example_model, folder / "qwen2.zarr")),
            "llama": (llama_model, _source(llama_model, folder / "llama.zarr"))}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch, layer, branch", [
    ("qwen2", 0, "mlp"), ("qwen2", 2, "attn"), ("qwen2", 3, "mlp"),
    ("llama", 0, "attn"), ("llama", 3, "mlp"), ("llama", 5, "attn"),
])
def test_a_planted_fault_is_named_exactly(sources, tmp_path, engine, arch, layer, branch):
    """A 2% perturbation of one branch's output projection: the first divergent tensor is that
    branch, whatever the engine's own rounding (vLLM differs from torch everywhere, far below
    the noise floor)."""
    model, source = sources[arch]
    faulty = _plant(model, tmp_path / "faulty", layer, branch, 0.02)
    c = replay(ReplayConfig(bundle=source, backend=engine, model=faulty, allow_model_mismatch=True,
                            modes=(TEACHER,), output=tmp_path / "r")).primary
    assert c.first_divergent_tensor == f"layers.{layer}.{branch}", c.summary
    assert all(r.first_divergent_tensor == f"layers.{layer}.{branch}" for r in c.requests)
    assert "runs part ways at" in c.summary and "the noise floor" in c.summary


@vllm_env
def test_bfloat16_vllm_replay_of_a_faulty_model_still_names_the_layer(sources, tmp_path):
    model, source = sources["qwen2"]
    faulty = _plant(model, tmp_path / "faulty", 2, "mlp", 0.05)
    c = replay(ReplayConfig(bundle=source, backend="vllm", dtype="bfloat16", model=faulty,
                            allow_model_mismatch=True, output=tmp_path / "r")).primary
    assert c.calibration is not None and not c.calibration.within, c.summary
    assert c.first_divergent_tensor == "layers.2.mlp", c.summary
    assert c.localized_by == "calibration" and "makes" in c.calibration.sentence


def test_results_stay_per_request(example_model, tmp_path):
    """Four prompts, a difference in request 2 only: request 2's position is reported, and the
    other requests report none."""
    config = dict(backend="torch", model=example_model, random_input_ids=16, num_requests=4,
                  sampling=SamplingParams(max_new_tokens=3), settings=CaptureSettings(tensors=("*",)), command=("t",))
    source = capture(CaptureConfig(output=tmp_path / "a.zarr", **config))
    changed = capture(CaptureConfig(output=tmp_path / "b.zarr", **config,
                                    whatifs=(whatif.parse("noise:layers.1.mlp:rel=0.01:requests=2:positions=9-"),)))
    with open_bundle(source) as a, open_bundle(changed) as b:
        c = compare(a, b)
    assert (c.first_divergent_request, c.first_divergent_tensor, c.first_divergent_position) == (2, "layers.1.mlp", 9)
    assert [r.first_divergent_tensor for r in c.requests] == [None, None, "layers.1.mlp", None]


def test_localize_measures_local_error_and_bisects_the_layers(sources, tmp_path):
    """A fault big enough to change the tokens: the measured local error is largest in the
    faulty branch, and restoring that one layer's output restores every request."""
    model, source = sources["qwen2"]
    faulty = _plant(model, tmp_path / "faulty", 2, "mlp", 0.5)
    c = replay(ReplayConfig(bundle=source, backend="torch", model=faulty, allow_model_mismatch=True,
                            localize=True, output=tmp_path / "r")).primary
    assert c.local_error_source == "measured" and c.largest_local_error == "layers.2.mlp", c.local_errors
    local = {e.tensor: e for e in c.local_errors}
    assert local["layers.1.out"].local_error == 0 and local["layers.2.mlp"].local_error > 0
    assert local["layers.3.out"].propagated_error > local["layers.3.out"].local_error, "layer 3 inherits"
    assert any(r.first_divergent_step is not None for r in c.requests), "the fault must change tokens"
    assert c.bisection is not None and c.bisection.layers == [2], c.bisection
    assert c.bisection.restored_requests == c.bisection.total_requests == 2
    assert c.bisection.sentence == "restoring layer 2 to the reference's output fixes 2/2 requests"


def test_localize_refuses_a_source_without_full_tensors(example_model, tmp_path):
    from ptrace.errors import UsageError

    source = _source(example_model, tmp_path / "s.zarr")
    stats = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "st.zarr",
                                  random_input_ids=8, settings=CaptureSettings(mode="stats"), command=("t",)))
    with pytest.raises(UsageError, match="--localize needs"):
        replay(ReplayConfig(bundle=stats, backend="torch", localize=True, output=tmp_path / "r"))
    assert source.exists() and not list(tmp_path.glob("r.*"))
