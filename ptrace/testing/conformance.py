"""The conformance suite every backend passes (like zarr's StoreTests).

Subclass :class:`BackendTests`, set ``backend`` (and ``model_path`` if not the example
model): every engine must lay out tensors the same way, let interceptors replace them, and
produce well-formed outputs. Nothing here knows which engine it runs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from ptrace.backends.base import Backend, EngineTensor, Interceptor, LoadOptions, TensorSite
from ptrace.backends.decoding import log_softmax
from ptrace.backends.registry import create_backend
from ptrace.bundle_spec import moe
from ptrace.bundle_spec.names import all_names
from ptrace.bundle_spec.schema import SamplingParams
from ptrace.errors import UsageError

PROMPTS = [np.array([11, 400, 1200, 1999, 7], np.int64), np.array([300, 301, 302, 303, 304, 305, 306, 1500, 9], np.int64)]
NEW_TOKENS = 4
#: The sampling of the run that observes everything: prompt logprobs too, so the logits of every
#: prompt position.
EVERYTHING = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=5, prompt_logprobs=True)


class Keep(Interceptor):
    """Keeps a copy of every tensor it sees, by (name, request, step)."""

    def __init__(self, names: set[str] | None = None) -> None:
        self.names = names
        self.seen: dict[tuple[str, int, int], tuple[TensorSite, np.ndarray]] = {}

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> None:
        key, rows = (site.name, site.request, site.step), tensor.numpy()
        if key in self.seen:  # a step in chunks (chunked prefill) must continue where it stopped
            first, earlier = self.seen[key]
            assert site.start == first.start + earlier.shape[0], f"{key}: chunk at {site.start} leaves a gap"
            site, rows = first, np.concatenate([earlier, rows])
        self.seen[key] = (site, rows)

    def rows(self, name: str, request: int) -> np.ndarray:
        steps = sorted(s for (n, r, s) in self.seen if n == name and r == request)
        return np.concatenate([self.seen[(name, request, s)][1] for s in steps])


class Replace(Interceptor):
    """Replaces one tensor at one step with a function of it."""

    def __init__(self, name: str, step: int, fn) -> None:
        self.name, self.step, self.fn = name, step, fn

    def wants(self, name: str) -> bool:
        return name == self.name

    def on_tensor(self, site: TensorSite, tensor: EngineTensor) -> np.ndarray | None:
        return self.fn(tensor.numpy()) if site.step == self.step else None


class BackendTests:
    backend: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    #: The model to run; None: the test session's ``example_model`` fixture (any small HF
    #: Qwen2/Llama-family directory whose vocabulary covers the prompts' ids).
    model_path: Path | None = None

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, request: pytest.FixtureRequest) -> Path:
        return cls.model_path or request.getfixturevalue("example_model")

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, model_dir) -> Backend:
        engine = create_backend(cls.backend)
        engine.set_seed(0)
        engine.load(LoadOptions(model_dir, cls.dtype, cls.device))
        yield engine
        engine.close()

    @pytest.fixture(scope="class")
    @classmethod
    def config(cls, engine):
        from ptrace.backends.model_dir import read_config

        return read_config(engine.load_options.model_dir)

    @pytest.fixture(scope="class")
    @classmethod
    def everything(cls, engine):
        """One run with every canonical tensor observed, prompt logprobs too (so the logits of
        every prompt position)."""
        keep = Keep()
        generations = engine.generate(PROMPTS, EVERYTHING, [keep])
        return keep, generations

    def test_prefill_logits_without_prompt_logprobs_end_at_the_last_prompt_position(self, engine):
        """Without prompt logprobs an engine MAY run the LM head on the last prompt position
        alone; whatever rows it shows, they end there (SPEC.md section 6)."""
        keep = Keep({"logits"})
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, logprobs=0), [keep])
        for request, prompt in enumerate(PROMPTS):
            site, rows = keep.seen[("logits", request, 0)]
            assert site.start + rows.shape[0] == len(prompt), (site.start, rows.shape)

    def test_observing_changes_nothing(self, engine, everything):
        """A run with every tensor observed is bit-identical to a run with none (and the same
        sampling: the LM head over more rows MAY round the last one differently)."""
        _, observed = everything
        plain = engine.generate(PROMPTS, EVERYTHING)
        for a, b in zip(observed, plain, strict=True):
            assert a.output_ids.tolist() == b.output_ids.tolist()
            assert len(a.output_ids) == NEW_TOKENS
            assert a.topk_logprobs.tobytes() == b.topk_logprobs.tobytes()

    def test_every_canonical_tensor_arrives_with_rows_as_positions(self, everything, config):
        keep, _ = everything
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
        head_dim = config.get("head_dim") or hidden // heads
        experts, top_k = moe.num_experts(config), moe.top_k(config)
        row_shape = defaultdict(lambda: (hidden,), {"q": (heads, head_dim), "k": (kv_heads, head_dim),
                                                    "v": (kv_heads, head_dim), "logits": (vocab,),
                                                    "router": (experts,), "experts": (top_k,),
                                                    "expert_weights": (top_k,)})
        for name in all_names(config["num_hidden_layers"], moe.moe_layers(config)):
            for request, prompt in enumerate(PROMPTS):
                for step in range(NEW_TOKENS):
                    site, rows = keep.seen[(name, request, step)]
                    expected_start = 0 if step == 0 else len(prompt) + step - 1
                    expected_rows = len(prompt) if step == 0 else 1
                    assert (site.start, rows.shape[0]) == (expected_start, expected_rows), (name, request, step)
                    assert rows.shape[1:] == row_shape[name.rsplit(".", 1)[-1]], name

    def test_layer_output_is_the_full_residual_stream(self, everything, config):
        """out[i] = out[i-1] + attn[i] + mlp[i]: catches engines that defer the residual add."""
        keep, _ = everything
        previous = keep.rows("embed", 1)
        for i in range(config["num_hidden_layers"]):
            expected = previous + keep.rows(f"layers.{i}.attn", 1) + keep.rows(f"layers.{i}.mlp", 1)
            out = keep.rows(f"layers.{i}.out", 1)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(out).max())
            previous = out

    def test_outputs_are_well_formed(self, everything):
        _, generations = everything
        for prompt, gen in zip(PROMPTS, generations, strict=True):
            assert gen.topk_ids.shape == gen.topk_logprobs.shape == (NEW_TOKENS, 5)
            assert (np.diff(gen.topk_logprobs, axis=1) <= 0).all(), "top-k must be sorted"
            assert (gen.topk_logprobs <= 0).all()
            for step, token in enumerate(gen.output_ids):  # greedy picks a top-1 (ties: any of them)
                chosen = gen.topk_logprobs[step][gen.topk_ids[step] == token]
                assert chosen.size == 1 and chosen[0] == gen.topk_logprobs[step, 0]
            if gen.prompt_logprobs is not None:
                assert gen.prompt_logprobs.shape == (len(prompt),) and np.isnan(gen.prompt_logprobs[0])
                assert (gen.prompt_logprobs[1:] <= 0).all()

    def test_logits_agree_with_logprobs(self, everything):
        keep, generations = everything
        logits = keep.rows("logits", 0).astype(np.float64)
        last_prompt_row = len(PROMPTS[0]) - 1
        logprobs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        got = logprobs[last_prompt_row + np.arange(NEW_TOKENS)]
        ids = generations[0].topk_ids
        np.testing.assert_allclose(np.take_along_axis(got, ids, 1), generations[0].topk_logprobs, atol=1e-4)

    def test_prompt_logprobs_agree_with_logits(self, everything):
        keep, generations = everything
        prompt, generation = PROMPTS[1], generations[1]
        if generation.prompt_logprobs is None:
            pytest.skip("this engine gives no prompt logprobs")
        expected = log_softmax(keep.rows("logits", 1)[: len(prompt) - 1].astype(np.float64))
        np.testing.assert_allclose(generation.prompt_logprobs[1:],
                                   expected[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
        np.testing.assert_allclose(generation.prompt_topk_logprobs[1:],
                                   np.take_along_axis(expected, generation.prompt_topk_ids[1:], 1), atol=1e-4)

    def test_replacing_a_tensor_changes_what_follows(self, engine, everything):
        baseline, _ = everything
        after = Keep({"layers.0.mlp", "layers.0.out"})
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, logprobs=0),
                        [Replace("layers.0.mlp", 0, np.zeros_like), after])
        assert not after.seen[("layers.0.mlp", 0, 0)][1].any(), "later interceptors see the replacement"
        assert not np.allclose(after.seen[("layers.0.out", 0, 0)][1], baseline.seen[("layers.0.out", 0, 0)][1])

    def test_replaced_value_stays_in_the_kv_cache(self, engine, everything):
        """A value replaced at the prefill changes attention at later steps (what-ifs on the cache)."""
        baseline, _ = everything
        after = Keep({"layers.0.attn"})
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, logprobs=0),
                        [Replace("layers.0.v", 0, lambda v: v + 1.0), after])
        step1 = after.seen[("layers.0.attn", 0, 1)][1]
        assert not np.allclose(step1, baseline.seen[("layers.0.attn", 0, 1)][1])

    # -- mixture of experts (skipped for dense models) ---------------------------------------------
    @staticmethod
    def _moe(config) -> tuple[int, int, int]:
        """(first MoE layer, experts, top-k), or a skip for a dense model."""
        layers = moe.moe_layers(config)
        if not layers:
            pytest.skip("a dense model: no routing tensors")
        return layers[0], moe.num_experts(config), moe.top_k(config)

    def test_routing_is_the_top_k_of_the_router_logits(self, everything, config):
        """``experts`` are int32 ids of the ``top_k`` largest router logits, and ``expert_weights``
        their softmax probabilities (renormalised where the model says so)."""
        self._moe(config)
        keep, _ = everything
        for layer in moe.moe_layers(config):
            for request in range(len(PROMPTS)):
                logits = keep.rows(f"layers.{layer}.router", request).astype(np.float64)
                ids = keep.rows(f"layers.{layer}.experts", request)
                weights = keep.rows(f"layers.{layer}.expert_weights", request).astype(np.float64)
                assert ids.dtype == np.int32 and ((ids >= 0) & (ids < moe.num_experts(config))).all()
                top = np.argsort(-logits, axis=1, kind="stable")[:, : ids.shape[1]]
                assert (np.sort(top, axis=1) == np.sort(ids, axis=1)).all(), (layer, request)
                probs = np.take_along_axis(np.exp(log_softmax(logits)), ids, 1)
                if config.get("norm_topk_prob", True):
                    probs = probs / probs.sum(axis=1, keepdims=True)
                np.testing.assert_allclose(weights, probs, rtol=1e-3, atol=1e-5)

    def test_forced_experts_route_the_token(self, engine, everything, config):
        """Expert ids handed back are the ones used (the ``route`` what-if): the MoE block's
        output changes, and the weights are the router's for the forced experts."""
        layer, experts, _ = self._moe(config)
        baseline, _ = everything
        name = f"layers.{layer}.experts"
        after = Keep({f"layers.{layer}.expert_weights", f"layers.{layer}.mlp", f"layers.{layer}.router"})
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, logprobs=0),
                        [Replace(name, 0, lambda ids: (experts - 1 - ids).astype(np.int32)), after])
        original = baseline.seen[(name, 0, 0)][1]
        logits = after.seen[(f"layers.{layer}.router", 0, 0)][1].astype(np.float64)
        probs = np.take_along_axis(np.exp(log_softmax(logits)), experts - 1 - original, 1)
        if config.get("norm_topk_prob", True):
            probs = probs / probs.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(after.seen[(f"layers.{layer}.expert_weights", 0, 0)][1], probs, rtol=1e-3,
                                   atol=1e-5)
        assert not np.allclose(after.seen[(f"layers.{layer}.mlp", 0, 0)][1],
                               baseline.seen[(f"layers.{layer}.mlp", 0, 0)][1])

    def test_replaced_router_logits_choose_again(self, engine, config):
        """Router logits handed back decide the experts (``noise``/``cast`` on ``layers.*.router``)."""
        layer, experts, _ = self._moe(config)
        after = Keep({f"layers.{layer}.experts"})

        def favour_last(logits: np.ndarray) -> np.ndarray:
            logits = logits.copy()
            logits[:, experts - 1] = logits.max() + 10
            return logits
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, logprobs=0),
                        [Replace(f"layers.{layer}.router", 0, favour_last), after])
        assert (after.seen[(f"layers.{layer}.experts", 0, 0)][1] == experts - 1).any(axis=1).all()

    def test_out_of_vocabulary_prompt_is_refused(self, engine):
        with pytest.raises(UsageError, match="vocabulary"):
            engine.generate([np.array([engine.vocab_size], np.int64)], SamplingParams(max_new_tokens=1))

    def test_seeded_sampling_is_reproducible(self, engine):
        sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=6, logprobs=0)
        engine.set_seed(0)
        first = engine.generate(PROMPTS[:1], sampling)[0].output_ids
        engine.set_seed(0)
        assert engine.generate(PROMPTS[:1], sampling)[0].output_ids.tolist() == first.tolist()
