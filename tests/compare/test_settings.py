"""Arithmetic settings: recorded as the engine resolved them, diffed and named in the verdict.

Each planted config difference is a copy of the example model whose config.json is edited, run
on the real torch backend: the comparison must name the setting with both values, the tensor
where it acts, and find that the runs part ways there.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ptrace.bundle_spec.names import all_names
from ptrace.bundle_spec.settings import GROUPS, UNKNOWN, VOCABULARY, settings_diff
from tests.conftest import GOLDEN, run_cli

Edit = Callable[[dict], None]


def model_copy(source: Path, target: Path, edit: Edit) -> Path:
    """``source``'s files linked into ``target``, its config.json edited by ``edit``. A tied head
    also drops ``lm_head.weight`` from the weights: with both matrices in the checkpoint,
    transformers 5 does not tie them whatever the config says (the engine's resolved value
    would rightly show no difference)."""
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for item in source.iterdir():
        if item.name == "model.safetensors" and config.get("tie_word_embeddings"):
            from safetensors.numpy import load_file, save_file

            weights = load_file(item)
            del weights["lm_head.weight"]
            save_file(weights, target / item.name, metadata={"format": "pt"})
        elif item.name != "config.json":
            (target / item.name).symlink_to(item.resolve())
    return target


def _flat_theta(c: dict) -> None:
    del c["rope_parameters"]
    c["rope_theta"] = 10000.0


def _nested_theta(c: dict) -> None:
    del c["rope_theta"]
    c["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}


def _sliding(c: dict) -> None:
    c.update(use_sliding_window=True, sliding_window=6, max_window_layers=0,
             layer_types=["sliding_attention"] * c["num_hidden_layers"])


#: (id, config edit, key, reference value, planted value, where it acts)
PLANTS = [
    ("epsilon", lambda c: c.update(rms_norm_eps=1e-5), "norm_eps", 1e-6, 1e-5, "layers.0.attn_norm"),
    ("rope-theta-flat", _flat_theta, "rope_theta", 1e6, 1e4, "layers.0.q"),
    ("rope-theta-nested", _nested_theta, "rope_theta", 1e6, 1e4, "layers.0.q"),
    ("activation", lambda c: c.update(hidden_act="gelu_pytorch_tanh"), "hidden_act", "silu", "gelu_pytorch_tanh",
     "layers.0.mlp"),
    ("tied-head", lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings", False, True, "logits"),
    ("sliding-window", _sliding, "sliding_window", None, 6, "layers.0.attn"),
]


def capture_on(backend: str, model: Path, output: Path) -> Path:
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture

    return capture(CaptureConfig(backend=backend, model=model, output=output, random_input_ids=16,
                                 command=("test",), sampling=SamplingParams(seed=3, max_new_tokens=3),
                                 settings=CaptureSettings(tensors=("*",))))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, example_model: Path) -> Path:
    return capture_on("torch", example_model, tmp_path_factory.mktemp("settings") / "reference.zarr")


def test_vocabulary_acts_at_canonical_tensors() -> None:
    names = all_names(2)
    assert len({s.key for s in VOCABULARY}) == len(VOCABULARY)
    for setting in VOCABULARY:
        assert setting.group in GROUPS
        for pattern in setting.acts_at:
            assert any(fnmatch.fnmatchcase(n, pattern) for n in names), (setting.key, pattern)


def test_unknown_is_never_a_difference() -> None:
    assert settings_diff({"norm_eps": UNKNOWN}, {"norm_eps": 1e-5}) == []
    assert [d.key for d in settings_diff({"norm_eps": 1e-6}, {"norm_eps": 1e-5})] == ["norm_eps"]
    assert settings_diff({"seed": 1}, {"seed": 2}) == []  # changes no arithmetic


@pytest.mark.parametrize("plant", PLANTS, ids=[p[0] for p in PLANTS])
def test_planted_config_difference_is_named_on_torch(plant: tuple, reference: Path, example_model: Path,
                                                    tmp_path: Path) -> None:
    from ptrace.bundle_spec import open_bundle
    from ptrace.compare import compare

    _, edit, key, expected_a, expected_b, site = plant
    model = model_copy(example_model, tmp_path / "model", edit)
    planted = capture_on("torch", model, tmp_path / "planted.zarr")
    with open_bundle(reference) as a, open_bundle(planted) as b:
        result = compare(a, b)
    diff = {d["key"]: d for d in result.settings_diff}
    assert key in diff, result.settings_diff
    assert (diff[key]["a"], diff[key]["b"]) == (expected_a, expected_b)
    assert diff[key]["acts_at"] == site
    assert diff[key]["consistent"] is True, (result.first_divergent_tensor, result.first_divergent_position)
    assert [d["group"] for d in result.settings_diff] == ["model"] * len(result.settings_diff)
    assert f"{key} {expected_a!r} vs {expected_b!r}" in result.summary or \
        f"{key} {expected_a} vs {expected_b}" in result.summary
    assert "where the runs part ways" in result.summary

    # the pre-flight check agrees with the comparison, without one
    cli = run_cli("settings", reference, planted, "--json", "--fail-on-diff")
    assert cli.returncode == 1, cli.stderr
    preflight = json.loads(cli.stdout)["settings_diff"]
    assert [(d["key"], d["a"], d["b"], d["acts_at"]) for d in preflight] == \
        [(d["key"], d["a"], d["b"], d["acts_at"]) for d in result.settings_diff]


def test_resolved_not_as_written(reference: Path, example_model: Path, tmp_path: Path) -> None:
    """config.json asks for a tied head, but the checkpoint has its own LM head and transformers
    keeps it: the engine computes untied, and so the settings say."""
    from ptrace.bundle_spec import open_bundle
    from ptrace.compare.settings import recorded

    model = tmp_path / "model"
    model.mkdir()
    for item in example_model.iterdir():
        if item.name != "config.json":
            (model / item.name).symlink_to(item.resolve())
    config = json.loads((example_model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with open_bundle(capture_on("torch", model, tmp_path / "b.zarr")) as bundle:
        assert bundle.model.config["tie_word_embeddings"] is True
        assert recorded(bundle)["values"]["tie_word_embeddings"] is False


def test_same_run_has_no_difference_and_report_panel(reference: Path, tmp_path: Path) -> None:
    from ptrace.bundle_spec import open_bundle
    from ptrace.compare import compare
    from ptrace.reports.html import render

    with open_bundle(reference) as a, open_bundle(reference) as b:
        result = compare(a, b)
    assert result.settings_diff == []
    assert result.a["settings"]["source"] == "resolved"
    assert result.a["settings"]["values"]["rope_theta"] == 1e6
    assert "Settings that change arithmetic" in render(result)
    cli = run_cli("settings", reference, reference, "--fail-on-diff")
    assert cli.returncode == 0, cli.stderr
    assert "no arithmetic setting differs" in cli.stdout


def test_report_names_the_difference(reference: Path, example_model: Path, tmp_path: Path) -> None:
    from ptrace.bundle_spec import open_bundle
    from ptrace.compare import Comparison, compare
    from ptrace.reports.html import render

    planted = capture_on("torch", model_copy(example_model, tmp_path / "m", lambda c: c.update(rms_norm_eps=1e-5)),
                         tmp_path / "eps.zarr")
    with open_bundle(reference) as a, open_bundle(planted) as b:
        result = compare(a, b)
    html = render(Comparison.from_dict(json.loads(json.dumps(result.to_dict()))))
    panel = html[html.index('id="settings"'):html.index('id="runs"')]
    assert "norm_eps" in panel and "1e-05" in panel and "layers.0.attn_norm" in panel
    assert html.index('id="settings"') < html.index('id="tokens"')  # near the top


def test_bundle_without_settings_node_reads_config_as_read() -> None:
    golden = sorted(GOLDEN.glob("*.zarr*"))[0]
    cli = run_cli("settings", golden, "--json")
    assert cli.returncode == 0, cli.stderr
    recorded = json.loads(cli.stdout)
    assert recorded["source"] == "as read"
    assert recorded["values"]["norm_eps"] != UNKNOWN
    assert recorded["values"]["attention_backend"] == UNKNOWN  # config.json does not say: never a guess


def test_settings_refuses_corrupt_bundle_and_lone_fail_on_diff(reference: Path, tmp_path: Path) -> None:
    cli = run_cli("settings", tmp_path / "missing.zarr")
    assert cli.returncode != 0 and "Traceback" not in cli.stderr and cli.stderr.strip().count("\n") == 0
    cli = run_cli("settings", reference, "--fail-on-diff")
    assert cli.returncode != 0 and "two bundles" in cli.stderr


def test_a_dtype_change_is_one_clause(reference: Path, example_model: Path, tmp_path: Path) -> None:
    from ptrace.bundle_spec import open_bundle
    from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
    from ptrace.compare import compare

    bfloat16 = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "bf16.zarr",
                                     dtype="bfloat16", random_input_ids=16, command=("test",),
                                     sampling=SamplingParams(seed=3, max_new_tokens=3),
                                     settings=CaptureSettings(tensors=("*",))))
    with open_bundle(reference) as a, open_bundle(bfloat16) as b:
        result = compare(a, b)
    differing = {d["key"]: d for d in result.settings_diff}
    assert {"param_dtype", "matmul_dtype", "kv_cache_dtype"} <= set(differing)
    assert "norm_dtype" not in differing  # HF's RMSNorm computes in float32 whatever the model's dtype
    assert all(d["group"] == "numerics" for d in differing.values())
    assert result.summary.count("float32 vs bfloat16") == 1
    assert "the runs compute in float32 vs bfloat16 (param_dtype, matmul_dtype" in result.summary
