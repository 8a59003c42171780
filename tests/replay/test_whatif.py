"""``ptrace whatif`` end to end: a KV-noise sweep over 8 prompts in one command, on torch and on
vLLM, compared with an unperturbed baseline on the same engine."""

from __future__ import annotations

import json

import pytest

from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, whatif
from ptrace.compare import Comparison
from ptrace.errors import UsageError
from ptrace.replay.session import ReplayConfig
from ptrace.replay.whatif import WhatIfConfig, run_whatifs
from tests.conftest import run_cli
from tests.replay.test_cross_engine import vllm_env

LEVELS = (1e-3, 1e-2, 1e-1, 1.0)


@pytest.fixture(scope="module")
def eight_prompts(tmp_path_factory, example_model):
    return capture(CaptureConfig(backend="torch", model=example_model,
                                 output=tmp_path_factory.mktemp("whatif") / "eight.zarr", random_input_ids=24,
                                 num_requests=8, sampling=SamplingParams(max_new_tokens=8, seed=1),
                                 settings=CaptureSettings(tensors=("layers.*.out", "layers.*.k", "logits")),
                                 command=("t",)))


@pytest.mark.parametrize("engine", [pytest.param("torch"), pytest.param("vllm", marks=vllm_env)])
def test_a_kv_noise_sweep_runs_in_one_command(eight_prompts, tmp_path, engine):
    spec = whatif.parse("noise:layers.*.k,layers.*.v:std=1e-3:positions=0-99")
    c = run_whatifs(WhatIfConfig(ReplayConfig(bundle=eight_prompts, backend=engine, output=tmp_path / "w"),
                                 ((spec,),), sweep=("std", LEVELS)))
    assert [w.sweep_value for w in c.whatifs] == list(LEVELS)
    assert all(w.first_affected_tensor == "layers.0.k" for w in c.whatifs), [w.first_affected_tensor for w in c.whatifs]
    rates = [w.divergence_rate for w in c.whatifs]
    kls = [w.mean_kl for w in c.whatifs]
    assert rates[-1] > rates[0] and rates[-1] >= 0.5, rates  # the seed's case 3.2: more noise, more divergence
    assert kls == sorted(kls) and kls[0] > 0, kls
    assert all(len(w.first_divergent_step) == 8 and 0 <= w.divergence_rate <= 1 for w in c.whatifs)
    # the baseline is this engine's own replay of the capture, and the JSON is strict
    assert c.b["backend"] == engine and Comparison.from_dict(json.loads(json.dumps(c.to_dict(), allow_nan=False)))


def test_the_cli_runs_whatifs_and_refuses_without_one(eight_prompts, tmp_path):
    out = tmp_path / "w.json"
    result = run_cli("whatif", eight_prompts, "-b", "torch", "-o", tmp_path / "w", "--json", out,
                     "-i", "cast:layers.2.attn:dtype=bfloat16", "-i", "scale:layers.1.mlp:factor=1.5:requests=3")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    first = [w["first_affected_tensor"] for w in data["whatifs"]]
    assert first == ["layers.2.attn", "layers.1.mlp"]
    assert [s is None for s in data["whatifs"][1]["first_divergent_step"]].count(False) <= 1, "only request 3"
    refused = run_cli("whatif", eight_prompts, "-b", "torch")
    assert refused.returncode == 2 and "at least one what-if" in refused.stderr
    bad = run_cli("whatif", eight_prompts, "-b", "torch", "-i", "noise:layers.*.k:sigma=1")
    assert bad.returncode == 2 and "has no parameter sigma" in bad.stderr and "Traceback" not in bad.stderr


def test_a_sweep_of_a_parameter_no_whatif_has_is_refused(eight_prompts, tmp_path):
    with pytest.raises(UsageError, match="no what-if has a parameter factor"):
        run_whatifs(WhatIfConfig(ReplayConfig(bundle=eight_prompts, backend="torch", output=tmp_path / "w"),
                                 ((whatif.parse("noise:layers.0.k:std=1"),),), sweep=("factor", (1.0, 2.0))))
