"""``ptrace whatif`` end to end: a KV-noise sweep over 8 prompts in one command, on torch and on
vLLM, compared with an unperturbed baseline on the same engine."""

from __future__ import annotations

import json

import pytest

from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, whatif
from ptrace.compare import Comparison
from ptrace.errors import UsageError
from ptrace.replay.plan import ReplayConfig
from ptrace.replay.whatif import WhatIfConfig, run_whatifs
from tests.conftest import needs_fp8_kv_cache, run_cli, write_sharegpt
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
    assert rates[-1] > rates[0] and rates[-1] >= 0.5, rates  # KV-cache noise: more noise, more divergence
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
    # the summary names the what-ifs first, one line each; the baseline's own check comes below
    said = " ".join(result.stdout.split())  # the console wraps long lines
    where = [said.find(" ".join(f"what-if {w['sentence']}".split())) for w in data["whatifs"]]
    where.append(said.find("baseline (torch float32, no injection) against the source: PASS"))
    assert -1 not in where and where == sorted(where), said
    assert all("layers." in w["sentence"] for w in data["whatifs"]), "each sentence names its what-if"
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


#: Decode steps of the long prompts: few, their prefill is the long part.
LONG_STEPS = 4


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory, example_model):
    """The long-sequence stage at small scale: 8 ShareGPT-layout conversations of 1100 to 2300
    tokens, captured in stats mode as the long runs are."""
    folder = tmp_path_factory.mktemp("long")
    data = write_sharegpt(folder / "sharegpt.json", [400 + 60 * i for i in range(8)])
    return capture(CaptureConfig(backend="torch", model=example_model, output=folder / "long.zarr",
                                 dataset=f"sharegpt:{data}", num_requests=8, min_prompt_tokens=1000,
                                 max_prompt_tokens=2500, command=("t",),
                                 sampling=SamplingParams(max_new_tokens=LONG_STEPS, seed=1),
                                 settings=CaptureSettings(tensors=("logits",), mode="stats")))


def test_kv_noise_over_a_dataset_bundle_gives_curves_against_prompt_length(long_prompts, tmp_path):
    """What-ifs against prompt length: KV-cache noise at two levels over the long set, reported per
    prompt-length bucket in the JSON and as curves in the report."""
    out, report = tmp_path / "w.json", tmp_path / "w.html"
    result = run_cli("whatif", long_prompts, "-b", "torch", "-o", tmp_path / "w", "--json", out, "--report", report,
                     "-i", "noise:layers.*.k,layers.*.v:std=1e-2", "--sweep", "std=1e-2,1")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    lengths = sorted(r["prompt_len"] for r in data["requests"])
    assert len(set(lengths)) == 8 and 1000 <= lengths[0] and lengths[-1] <= 2500
    small, large = data["whatifs"]
    for w in (small, large):
        # A stats capture compares rows by their scale: the injection point is still found.
        assert w["first_affected_tensor"] == "layers.0.k" and "no tensor changed" not in w["sentence"]
        buckets = w["stability"]["buckets"]
        assert [(b["min_len"], b["max_len"], b["requests"]) for b in buckets] == [
            (lengths[0], lengths[3], 4), (lengths[4], lengths[7], 4)]
        assert all(0 <= b["divergence_rate"] <= 1 and b["mean_kl"] > 0 for b in buckets)
        # KL against absolute position: from the shortest prompt's first step to the longest's last.
        first, *_, last = w["stability"]["positions"]
        assert first["min_pos"] <= lengths[0] <= first["max_pos"]
        assert last["min_pos"] <= lengths[-1] + LONG_STEPS - 1 <= last["max_pos"]
    assert [b["divergence_rate"] for b in large["stability"]["buckets"]] == [1.0, 1.0]
    assert all(b["mean_kl"] > a["mean_kl"] for a, b in zip(small["stability"]["buckets"],
                                                           large["stability"]["buckets"]))
    html = report.read_text()
    for label in ("requests that diverge against prompt length, per what-if",
                  "mean KL per step against prompt length, per what-if"):
        assert f'aria-label="{label}"' in html


@vllm_env
@needs_fp8_kv_cache
def test_an_fp8_kv_cache_over_a_dataset_bundle_per_prompt_length(long_prompts, tmp_path):
    """An fp8 KV cache, the other long-context cause, as a what-if on vLLM against its own float32 cache."""
    c = run_whatifs(WhatIfConfig(ReplayConfig(bundle=long_prompts, backend="vllm", output=tmp_path / "w"),
                                 ((whatif.parse("engine:kv_cache_dtype=fp8"),),)))
    (fp8,) = c.whatifs
    assert fp8.first_affected_tensor is not None
    assert [(b.requests, b.min_len < b.max_len) for b in fp8.stability.buckets] == [(4, True), (4, True)]
    assert all(b.mean_kl > 0 and 0 <= b.divergence_rate <= 1 for b in fp8.stability.buckets)
