"""From a Hugging Face checkpoint to a MindFormers model: the config translated into
MindFormers' own, and the safetensors weights loaded under MindFormers' parameter names, for
the CPU model (legacy ``LlamaForCausalLM``) and the Ascend one (the mcore inference classes).
Every conversion either reproduces HF's numerics or refuses the checkpoint with one line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptrace.errors import ModelError

#: HF ``model_type`` -> whether q/k/v projections carry a bias (the only Qwen2/Llama difference
#: MindFormers' LlamaForCausalLM needs to know; Llama's own ``attention_bias`` overrides it).
SUPPORTED_MODEL_TYPES = {"qwen2": True, "llama": False}
#: HF ``model_type`` -> (module, config class, model class) of MindFormers' own inference classes,
#: the models the Ascend path runs.
ASCEND_MODEL_CLASSES = {
    "qwen2": ("mindformers.models.qwen2", "Qwen2Config", "InferenceQwen2ForCausalLM"),
    "qwen3": ("mindformers.models.qwen3", "Qwen3Config", "InferenceQwen3ForCausalLM"),
}


#: MindFormers' precision knobs, as ``ms`` engine options (the legacy LlamaConfig's names) ->
#: the name the Ascend inference configs give the same knob.
PRECISION_OPTIONS = {
    "compute_dtype": "compute_dtype",
    "param_init_type": "params_dtype",
    "softmax_compute_type": "softmax_compute_dtype",
    "layernorm_compute_type": "layernorm_compute_dtype",
    "rotary_dtype": "rotary_dtype",
}
#: The dtypes MindFormers accepts for each of them.
PRECISION_DTYPES = ("float32", "float16", "bfloat16")


def precision(dtype: str, options: Mapping[str, Any]) -> dict[str, str]:
    """Each precision knob: the engine option where one is given, else as HF computes: the run's
    dtype for matmuls, weights and the rotary embedding, float32 for norms and the softmax."""
    defaults = {"compute_dtype": dtype, "param_init_type": dtype, "rotary_dtype": dtype,
                "softmax_compute_type": "float32", "layernorm_compute_type": "float32"}
    return {name: options.get(name) or default for name, default in defaults.items()}


def llama_config(hf: dict, dtype: str, seq_length: int, options: Mapping[str, Any] | None = None) -> Any:
    """MindFormers' LlamaConfig for an HF Qwen2/Llama config, numerics as HF computes them unless
    ``options`` (the engine options) set a precision knob."""
    from mindformers.models.llama import LlamaConfig

    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if (hf.get("head_dim") or hidden // heads) * heads != hidden:
        raise ModelError("MindFormers' LlamaForCausalLM needs head_dim = hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ModelError("MindFormers' LlamaForCausalLM needs a SiLU MLP without bias")
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise ModelError("MindFormers' LlamaForCausalLM has no sliding-window attention")
    qkv_bias = bool(hf.get("attention_bias", SUPPORTED_MODEL_TYPES[hf["model_type"]]))
    if hf.get("attention_bias") and hf["model_type"] == "llama":
        raise ModelError("MindFormers' LlamaForCausalLM has no bias on o_proj (attention_bias=true)")
    return LlamaConfig(
        batch_size=1, seq_length=seq_length, hidden_size=hidden, num_layers=hf["num_hidden_layers"],
        num_heads=heads, n_kv_heads=hf.get("num_key_value_heads", heads),
        max_position_embedding=max(hf.get("max_position_embeddings", seq_length), seq_length),
        intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), theta=rope_theta(hf), **_rope_scaling(hf),
        # MindFormers masks every key position whose token equals pad_token_id (HF does not): a
        # prompt containing that token would attend differently. No token id is negative.
        pad_token_id=-1,
        qkv_has_bias=qkv_bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        embedding_init_type=dtype, residual_dtype=dtype, **precision(dtype, options or {}),
        use_past=False, use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True,
        checkpoint_name_or_path="",
    )


def inference_config_values(hf: dict, dtype: str, seq_length: int, options: Mapping[str, Any] | None = None) -> dict:
    """MindFormers' Qwen2Config/Qwen3Config arguments: the HF config plus its own fields."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise ModelError(f"backend ms on an Ascend NPU does not pass rope_scaling type {kind!r} "
                         "to MindFormers yet", hint="it runs models with default RoPE there")
    values = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling", "dtype")}
    if hf["model_type"] == "qwen2":
        values["attention_bias"] = True  # HF Qwen2 always has q/k/v biases; MindFormers defaults off
    # A whole number of cache blocks per sequence (BlockTables: seq_length // block_size).
    block_size = 32  # Qwen2Config/Qwen3Config's own default
    seq_length = -(-seq_length // block_size) * block_size
    values.update(
        rope_theta=rope_theta(hf), rope_scaling=None, seq_length=seq_length, block_size=block_size,
        num_blocks=seq_length // block_size,  # one request at a time, each at most seq_length
        max_position_embeddings=max(hf.get("max_position_embeddings", seq_length), seq_length),
        **{PRECISION_OPTIONS[name]: value for name, value in precision(dtype, options or {}).items()},
    )
    return values


def rope_theta(hf: dict) -> float:
    return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _rope_scaling(hf: dict) -> dict:
    """MindFormers' extend_method/scaling_factor for HF's rope_scaling (default, linear, llama3)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        return {"extend_method": "linear", "scaling_factor": {"factor": float(scaling["factor"])}}
    if kind == "llama3":
        return {"extend_method": "LLAMA3", "scaling_factor": {
            "factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}}
    raise ModelError(f"backend ms does not support rope_scaling type {kind!r}",
                     hint="it supports default, linear and llama3")


def load_llama_weights(model: Any, model_dir: Path, config: Any) -> None:
    """HF safetensors -> MindFormers names, cast to each parameter's dtype; every parameter
    must be loaded and every checkpoint tensor used."""
    import mindspore as ms
    from mindformers.models.llama import LlamaForCausalLM

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights (the ms backend reads only those)")
    state: dict[str, Any] = {}
    for path in files:
        state.update(ms.load_checkpoint(str(path), format="safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed
    converted = LlamaForCausalLM.convert_weight_dict(state, model_config=config)
    params = model.parameters_dict()
    missing = sorted(set(params) - set(converted))
    unexpected = sorted(set(converted) - set(params))
    if missing or unexpected:
        raise ModelError(f"{model_dir} does not fit MindFormers' LlamaForCausalLM: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, value in converted.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ModelError(f"{name}: checkpoint shape {tuple(value.shape)}, model expects "
                             f"{tuple(params[name].shape)}")
    cast = {name: ms.Parameter(value.astype(params[name].dtype), name=name) for name, value in converted.items()}
    not_loaded, _ = ms.load_param_into_net(model, cast, strict_load=True)
    if not_loaded:
        raise ModelError(f"MindSpore did not load {not_loaded[:5]}")


def load_inference_weights(model: Any, model_dir: Path, model_class: str) -> None:
    """HF safetensors through MindFormers' own mapping; every parameter must be loaded.
    (``InferModelMixin.load_weights`` step by step, to see which parameters it loaded.)"""
    files = model.get_weights_files(str(model_dir))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights (the ms backend reads only those)")
    gpt = model.model
    loaded = gpt.load_weights(model._safetensors_weights_iterator(files), model.generate_mapping(),
                              model.check_hf_weight(weights_files=files))
    model.process_weights_after_loading(gpt)
    missing = sorted(set(gpt.get_params_dict()) - set(loaded or ()))
    if missing:
        raise ModelError(f"{model_dir} does not fit MindFormers' {model_class}: not loaded {missing[:5]}")
