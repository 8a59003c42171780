"""The vocabulary of arithmetic settings (SPEC.md section 3.8): the one place that says which
settings change what an inference engine computes, and where each first acts.

Two runs of the same weights part ways where a setting is read differently: a norm epsilon a
decade off, a rope theta an engine fell back to its default for, a tied LM head, a softmax in
float16. ``compare`` localizes *where*; this vocabulary lets it say *why*: each backend records
the values its engine actually used (``meta/settings``), and :func:`settings_diff` names every
key whose values differ, the canonical tensor where that key first acts, and whether that is
where the runs part ways.

Plain data and pure functions only: backends, compare, the report and ``ptrace settings`` all
read it, and none of them needs an engine for it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ptrace.bundle_spec.names import all_names, forward_key
from ptrace.bundle_spec.records import plain

#: What a backend records for a key its engine cannot report: never a guess.
UNKNOWN = "unknown"
#: Where a bundle's values came from: read back from the loaded engine, or (a bundle without
#: ``meta/settings``) from the recorded config.json as written.
RESOLVED, AS_READ = "resolved", "as read"
GROUPS = ("model", "numerics", "engine")


@dataclass(frozen=True)
class Setting:
    """One arithmetic setting: its group, what it means, and where it first acts.

    ``acts_at`` are canonical-name globs (SPEC.md section 5) of the tensors the setting changes
    first; empty means after every tensor (which token is drawn, which logprobs are reported).
    ``from_position`` is the first absolute position it can change (rope leaves position 0
    alone: its rotation there is the identity); :func:`first_position` refines it from the two
    values (a sliding window acts only once a query has more keys than the smaller window).
    ``arithmetic`` is False for settings recorded for completeness that change no number
    (pipeline stages, the engine's own seed of a greedy run): they are never in a diff.
    """

    key: str
    group: str
    acts_at: tuple[str, ...]
    help: str
    from_position: int = 0
    arithmetic: bool = True


_QK = ("layers.*.q", "layers.*.k")
_QKV = ("layers.*.q", "layers.*.k", "layers.*.v")
_ATTN = ("layers.*.attn",)
_MLP = ("layers.*.mlp",)

VOCABULARY: tuple[Setting, ...] = (
    # -- model: what the config says the network is --------------------------------------------
    Setting("norm_eps", "model", ("layers.*.attn_norm",), "epsilon of the RMS/LayerNorm (rms_norm_eps, layer_norm_eps)"),
    Setting("rope_theta", "model", _QK, "rotary embedding base", from_position=1),
    Setting("rope_type", "model", _QK, "rotary scaling kind: default, linear, dynamic, yarn, llama3, ...",
            from_position=1),
    Setting("rope_scaling_factor", "model", _QK, "rotary scaling factor (None: no scaling)", from_position=1),
    Setting("partial_rotary_factor", "model", _QK, "share of each head's dimensions that is rotated",
            from_position=1),
    Setting("rope_layout", "model", _QK, "half-split (rotate_half, GPT-NeoX) or interleaved (GPT-J) pairs",
            from_position=1),
    Setting("hidden_act", "model", _MLP, "the MLP's activation"),
    Setting("tie_word_embeddings", "model", ("logits",), "the LM head is the embedding matrix"),
    Setting("attention_scale", "model", _ATTN, "the factor on q·k before the softmax"),
    Setting("attn_logit_softcap", "model", _ATTN, "tanh cap on attention scores (None: off)"),
    Setting("final_logit_softcap", "model", ("logits",), "tanh cap on the logits (None: off)"),
    Setting("sliding_window", "model", _ATTN, "keys a query sees, per layer that uses a window (None: all)"),
    Setting("qkv_bias", "model", _QKV, "the q/k/v projections carry a bias"),
    Setting("moe_top_k", "model", _MLP, "experts per token (None: not a mixture of experts)"),
    Setting("moe_norm_topk_prob", "model", _MLP, "the top-k expert weights are renormalized to sum to 1"),
    # -- numerics: in which dtype each part is computed ----------------------------------------
    Setting("param_dtype", "numerics", ("embed",), "dtype the weights are held in"),
    Setting("matmul_dtype", "numerics", _QKV, "dtype of the projections' matrix multiplications"),
    Setting("matmul_precision", "numerics", _QKV, "float32 matmul precision (torch: highest, high = TF32, medium)"),
    Setting("softmax_dtype", "numerics", _ATTN, "dtype the attention softmax is computed in"),
    Setting("norm_dtype", "numerics", ("layers.*.attn_norm",), "dtype the norms are computed in"),
    Setting("rotary_dtype", "numerics", _QK, "dtype the rotary embedding is applied in", from_position=1),
    Setting("residual_dtype", "numerics", ("layers.*.out",), "dtype of the residual stream's additions"),
    Setting("kv_cache_dtype", "numerics", _ATTN, "dtype keys and values are cached in (acts on cached positions)"),
    Setting("kv_cache_scales", "numerics", _ATTN, "how a quantized KV cache is scaled (None: not quantized)"),
    # -- engine: how the engine schedules the arithmetic ---------------------------------------
    Setting("attention_backend", "engine", _ATTN, "attention implementation or kernel"),
    Setting("chunked_prefill", "engine", _ATTN, "a long prompt is split across steps"),
    Setting("max_num_batched_tokens", "engine", _ATTN, "tokens per engine step (None: no limit)"),
    Setting("prefix_caching", "engine", _ATTN, "a repeated prefix's keys and values are reused"),
    Setting("batch_invariant", "engine", ("*",), "kernels give the same bits whatever the batch"),
    Setting("deterministic_algorithms", "engine", ("*",), "the framework's deterministic-algorithms switch"),
    Setting("tensor_parallel_size", "engine", _ATTN, "ranks a layer's matmuls are split over (all-reduced)"),
    Setting("pipeline_parallel_size", "engine", ("*",), "stages the layers are split over", arithmetic=False),
    Setting("logprobs_mode", "engine", (), "which logprobs are recorded: raw_logprobs (the model's) or processed"),
    Setting("seed", "engine", (), "the engine's own seed (token draws of sampled runs)", arithmetic=False),
)
SETTINGS: dict[str, Setting] = {s.key: s for s in VOCABULARY}


# -- values as written in config.json ------------------------------------------------------------

def _rope(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The rope map as transformers 5 writes it (``rope_parameters``), else 4.x's ``rope_scaling``."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_theta(config: Mapping[str, Any]) -> Any:
    return _rope(config).get("rope_theta", config.get("rope_theta", UNKNOWN))


def _sliding_window(config: Mapping[str, Any]) -> Any:
    layer_types = config.get("layer_types")
    if layer_types is not None:
        return config.get("sliding_window") if "sliding_attention" in layer_types else None
    if "use_sliding_window" in config:
        return config.get("sliding_window") if config["use_sliding_window"] else None
    return config.get("sliding_window", UNKNOWN)


_AS_WRITTEN: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "norm_eps": lambda c: c.get("rms_norm_eps", c.get("layer_norm_eps", c.get("layer_norm_epsilon", UNKNOWN))),
    "rope_theta": _rope_theta,
    "rope_type": lambda c: _rope(c).get("rope_type", _rope(c).get("type", "default")),
    "rope_scaling_factor": lambda c: _rope(c).get("factor"),
    "partial_rotary_factor": lambda c: c.get("partial_rotary_factor", 1.0),
    "hidden_act": lambda c: c.get("hidden_act", c.get("hidden_activation", UNKNOWN)),
    "tie_word_embeddings": lambda c: c.get("tie_word_embeddings", UNKNOWN),
    "attn_logit_softcap": lambda c: c.get("attn_logit_softcapping"),
    "final_logit_softcap": lambda c: c.get("final_logit_softcapping"),
    "sliding_window": _sliding_window,
    "moe_top_k": lambda c: c.get("num_experts_per_tok"),
    "moe_norm_topk_prob": lambda c: c.get("norm_topk_prob") if c.get("num_experts_per_tok") else None,
    "param_dtype": lambda c: c.get("dtype", c.get("torch_dtype", UNKNOWN)),
}


def as_written(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every vocabulary key's value as ``config.json`` writes it (``"unknown"`` where it says
    nothing): what a bundle without ``meta/settings`` can tell, not what its engine used."""
    return {s.key: _AS_WRITTEN[s.key](config) if s.key in _AS_WRITTEN else UNKNOWN for s in VOCABULARY}


def complete(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` over the whole vocabulary, in its order: ``"unknown"`` for the keys an engine
    did not report. Keys outside the vocabulary are dropped."""
    return {s.key: _plain(values.get(s.key, UNKNOWN)) for s in VOCABULARY}


def _plain(value: Any) -> Any:
    """Numbers as a reader expects them: a float that is a whole number stays a float, numpy
    scalars become Python ones."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value


# -- the diff ------------------------------------------------------------------------------------

def same(a: Any, b: Any) -> bool:
    """Whether two recorded values are the same setting (floats to 6 significant digits: a value
    derived from a float32 table, such as rope theta from inv_freq, keeps about 7)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    return a == b


def first_position(setting: Setting, a: Any, b: Any) -> int:
    """The first absolute position at which the two values can give different numbers."""
    if setting.key == "sliding_window":
        windows = [w for w in (a, b) if isinstance(w, int) and not isinstance(w, bool)]
        # a query at position p sees at most the window's keys; a lower bound over engines'
        # off-by-one conventions (whether the window counts the query itself)
        return max(min(windows) - 1, 0) if windows else 0
    return setting.from_position


def acts_at(setting: Setting, num_layers: int) -> str | None:
    """The earliest canonical tensor the setting acts at (``layers.0.attn_norm``), None for the
    ones that act after every tensor."""
    if not setting.acts_at:
        return None
    return next((n for n in all_names(num_layers) if _matches(n, setting.acts_at)), setting.acts_at[0])


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def consistent(setting: Setting, a: Any, b: Any, compared: Sequence[str], first_tensor: str | None,
               first_position_seen: int | None) -> bool | None:
    """Whether the localized first divergent tensor is where ``setting`` acts: it is one of the
    setting's tensors, or the first tensor compared at or after the earliest of them (the
    setting's own tensor was not captured), at a position the setting can change. None when the
    runs do not part ways above the noise floor (nothing to be consistent with)."""
    if first_tensor is None:
        return None
    if not setting.acts_at:
        return False  # it acts after every tensor, yet a tensor diverged
    if first_position_seen is not None and first_position_seen < first_position(setting, a, b):
        return False
    if _matches(first_tensor, setting.acts_at):
        return True
    layers = 1 + max((forward_key(n)[1] for n in compared if forward_key(n)[0] == 1), default=0)
    earliest = acts_at(setting, layers)
    after = [n for n in compared if forward_key(n) >= forward_key(earliest)]
    return bool(after) and min(after, key=forward_key) == first_tensor


@dataclass(frozen=True)
class Difference:
    """One arithmetic setting whose values differ between two runs (``settings_diff``)."""

    key: str
    group: str
    a: Any
    b: Any
    #: the earliest canonical tensor it acts at (None: after every tensor)
    acts_at: str | None
    #: the first absolute position it can change there
    from_position: int
    #: the localized first divergent tensor is where it acts (None: the runs do not part ways)
    consistent: bool | None

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @property
    def where(self) -> str:
        """``layers.0.q from position 1``: where it acts, in words."""
        if self.acts_at is None:
            return "after every tensor"
        return self.acts_at + (f" from position {self.from_position}" if self.from_position else "")

    def sentence(self, first_tensor: str | None) -> str:
        """``norm_eps 1e-05 vs 1e-06, which acts at layers.0.attn_norm, where the runs part ways``."""
        where = f", which acts at {self.where}" if self.acts_at else ", which acts after every tensor"
        if self.consistent:
            tail = ", where the runs part ways"
        elif self.consistent is False:
            tail = f", though the runs part ways at {first_tensor}"
        else:
            tail = ""
        return f"{self.key} {show(self.a)} vs {show(self.b)}{where}{tail}"


def show(value: Any) -> str:
    """A value as the summary writes it (``1e-06``, ``1000000.0``, ``None``)."""
    return repr(value) if isinstance(value, float) else str(value)


def settings_diff(a: Mapping[str, Any], b: Mapping[str, Any], *, compared: Sequence[str] = (),
                  first_tensor: str | None = None, first_position_seen: int | None = None) -> list[Difference]:
    """The arithmetic settings whose known values differ between runs ``a`` and ``b``, in
    vocabulary order. A key unknown on either side is not a difference: nobody can say.
    ``compared`` are the canonical tensors the comparison measured (forward order), and
    ``first_tensor``/``first_position_seen`` where it localized the divergence."""
    layers = 1 + max((forward_key(n)[1] for n in compared if forward_key(n)[0] == 1), default=0)
    differences = []
    for setting in VOCABULARY:
        va, vb = a.get(setting.key, UNKNOWN), b.get(setting.key, UNKNOWN)
        if not setting.arithmetic or UNKNOWN in (va, vb) or same(va, vb):
            continue
        differences.append(Difference(setting.key, setting.group, va, vb, acts_at(setting, layers),
                                      first_position(setting, va, vb),
                                      consistent(setting, va, vb, compared, first_tensor, first_position_seen)))
    return differences
