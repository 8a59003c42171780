"""The canary against endpoints that are down, slow, trickling, erroring or speaking another
dialect: it keeps running, labels each cycle with the problem, logs it once with its time, marks
its measurements stale, and holds no growing memory. A golden bundle that cannot be a reference is
refused at start. (The endpoint problems of a real vLLM server, another model and a refused
request, are in test_live.py.)"""

from __future__ import annotations

import gc
import json
import math
import re
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest

from ptrace.monitor.canary import Canary, load_golden
from ptrace.monitor.client import Endpoint
from ptrace.monitor.metrics import CanaryMetrics
from tests.conftest import GOLDEN, ROOT, run_cli
from tests.monitor.servers import HOST, free_port, get, misbehaving_server, wait_until

#: How every cycle line starts: its time in ISO 8601, UTC.
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
#: The canary's measurements: the last cycle's, NaN when it could not compare.
MEASUREMENTS = ("ptrace_token_agreement_ratio", "ptrace_first_divergence_step", "ptrace_kl_divergence_max_nats",
                "ptrace_logprob_max_abs_error_nats")

def _lines(stderr: str) -> list[str]:
    """stderr without the start line ("canary: N request(s) of ...")."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("canary: ")]


def test_a_bad_golden_bundle_or_endpoint_is_refused_at_start():
    down = f"http://{HOST}:{free_port()}/v1"
    for golden, words in ((GOLDEN, "not a ptrace bundle"), (GOLDEN / "replay.teacher.zarr", "teacher-forced"),
                          (GOLDEN / "missing.zarr", "no bundle")):
        done = run_cli("monitor", golden, "--endpoint", down, "--once")
        lines = done.stderr.strip().splitlines()
        assert done.returncode in (1, 2) and len(lines) == 1 and words in lines[0], (golden, done.stderr)
    bad_url = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", "ftp://example/v1", "--once")
    assert bad_url.returncode == 2 and "not an http(s) URL" in bad_url.stderr


@pytest.mark.parametrize(("mode", "result", "words"), [
    ("down", "unreachable", "Connection refused"),
    ("error", "http_error", "HTTP 500: engine died badly"),
    ("garbage", "bad_response", "not JSON"),
    ("text-tokens", "bad_response", "return_tokens_as_token_ids"),
    ("slow", "timeout", "no complete answer within 1 s"),
])
def test_once_labels_the_problem_and_logs_one_line(mode, result, words, tmp_path):
    with misbehaving_server(mode) as server:
        url = f"http://{HOST}:{free_port()}/v1" if mode == "down" else server.url
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", url, "--once", "--json", "--timeout", "1",
                       "--metrics-file", tmp_path / "canary.prom")
    assert done.returncode == 3, done.stderr
    cycle = json.loads(done.stdout)
    assert cycle["result"] == result and words in cycle["message"]
    assert cycle["token_match_rate"] is None and cycle["requests"] == []
    assert STAMP.match(cycle["started_at"] + " ")
    lines = _lines(done.stderr)
    assert len(lines) == 1 and result in lines[0] and words in lines[0], done.stderr
    assert STAMP.match(lines[0].split(": ", 1)[1]), "the problem's line starts with its time"
    metrics = (tmp_path / "canary.prom").read_text()
    assert "ptrace_canary_runs_total" in metrics and "_created" not in metrics


@pytest.mark.parametrize("mode", ["trickle", "trickle-body"])
def test_timeout_is_a_deadline_whatever_the_server_sends(mode):
    """A server that sends a byte every half second, from its status line or from its body's
    first byte, never lets a socket timeout expire: the whole answer has a deadline."""
    timeout = 2
    with misbehaving_server(mode) as server:
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", server.url, "--once", "--json",
                       "--timeout", timeout, timeout=30)
        ended = time.monotonic()
        asked = server.first_request
    assert done.returncode == 3, done.stderr
    cycle = json.loads(done.stdout)
    assert cycle["result"] == "timeout" and f"no complete answer within {timeout} s" in cycle["message"]
    assert asked is not None and ended - asked < timeout + 1, f"returned {ended - asked:.2f} s after its request"


def _metric(url: str, sample: str) -> float | None:
    for line in get(url).decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def test_the_canary_keeps_running_while_the_endpoint_is_down():
    port, down = free_port(), f"http://{HOST}:{free_port()}/v1"
    canary = subprocess.Popen(
        [sys.executable, "-m", "ptrace", "monitor", GOLDEN / "torch.zarr", "--endpoint", down, "--interval", "0.1",
         "--metrics-port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = f"http://{HOST}:{port}/metrics"
    try:
        wait_until(lambda: (_metric(metrics, 'ptrace_canary_runs_total{result="unreachable"}') or 0) >= 4,
                   timeout=60, what="four failed cycles", process=canary)
        assert _metric(metrics, "ptrace_canary_up") == 0
        assert _metric(metrics, 'ptrace_canary_runs_total{result="pass"}') == 0
        assert canary.poll() is None, "the canary must keep running"
    finally:
        canary.send_signal(signal.SIGTERM)
        out, err = canary.communicate(timeout=30)
    assert canary.returncode == 0, err
    lines = _lines(err)
    assert len(lines) == 1 and "unreachable" in lines[0] and "next try in 0.2 s" in lines[0], err
    assert out == ""


def _golden_completion(golden) -> dict:
    """The golden bundle's own answer to its one request, as vLLM's /completions writes it."""
    [request] = golden.requests
    steps = [{f"token_id:{token}": logprob for token, logprob in zip(ids.tolist(), logprobs.tolist())}
             for ids, logprobs in zip(request.topk_ids, request.topk_logprobs)]
    tokens = request.output_ids.tolist()
    return {"choices": [{"index": 0, "text": "", "token_ids": tokens, "logprobs": {
        "tokens": [f"token_id:{token}" for token in tokens], "top_logprobs": steps}}]}


def test_after_the_endpoint_dies_the_measurements_are_stale_not_the_last_good_ones():
    """A server gives the golden answers (pass, agreement 1), then dies: the next cycles say
    ``ptrace_canary_up 0`` and every measurement is NaN, on the canary's own /metrics."""
    port = free_port()
    metrics = f"http://{HOST}:{port}/metrics"
    with misbehaving_server("golden") as server:
        server.completion = _golden_completion(load_golden(GOLDEN / "torch.zarr"))
        server.model = "/models/" + "a-long-path-to-the-served-model/" * 4 + "tiny"  # a cycle line of 200+ characters
        canary = subprocess.Popen(
            [sys.executable, "-m", "ptrace", "monitor", GOLDEN / "torch.zarr", "--endpoint", server.url,
             "--interval", "0.2", "--metrics-port", str(port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: (_metric(metrics, 'ptrace_canary_runs_total{result="pass"}') or 0) >= 1,
                       timeout=60, what="a passing cycle", process=canary)
            assert _metric(metrics, "ptrace_canary_up") == 1
            assert _metric(metrics, "ptrace_token_agreement_ratio") == 1
            assert _metric(metrics, "ptrace_first_divergence_step") == -1
            assert _metric(metrics, "ptrace_kl_divergence_max_nats") == 0
        except BaseException:
            canary.kill()
            raise
    try:
        wait_until(lambda: (_metric(metrics, 'ptrace_canary_runs_total{result="unreachable"}') or 0) >= 1,
                   timeout=60, what="a cycle against the dead endpoint", process=canary)
        assert _metric(metrics, "ptrace_canary_up") == 0
        for name in MEASUREMENTS:
            assert math.isnan(_metric(metrics, name)), f"{name} keeps a value the endpoint no longer gives"
        assert _metric(metrics, "ptrace_last_success_timestamp_seconds") > 0, "when it last compared stays"
        exposition = get(metrics).decode()
        assert "ptrace_canary_runs_total" in exposition and "_created" not in exposition
    finally:
        canary.send_signal(signal.SIGTERM)
        out, err = canary.communicate(timeout=30)
    assert canary.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines and all(re.fullmatch(STAMP.pattern + r"PASS: tokens identical for 3/3 steps; .* \(1 request to "
                                      r"'/models/.*/tiny' in \d+\.\d\d s\)", line) for line in lines), out
    # A connection the dying server had accepted may end as bad_response before refusals begin.
    problems = _lines(err)
    assert any("unreachable" in line for line in problems), err
    assert all(STAMP.match(line.split(": ", 1)[1]) for line in problems), err


def test_memory_stays_bounded_through_hundreds_of_failed_cycles():
    """Bounded, not merely small: once caches have settled, 1000 more failed cycles may keep no more
    than a few bytes each. Before each reading, garbage cycles (exceptions hold their tracebacks)
    are collected and CPython's method cache is emptied: it holds up to 4096 attribute names, such
    as the ones urllib builds on every request, and would read as slow growth."""
    golden = load_golden(GOLDEN / "torch.zarr")
    metrics = CanaryMetrics(golden)

    def held_after(cycles: int) -> int:
        for _ in range(cycles):
            metrics.record(canary.cycle())
        sys._clear_type_cache()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    with misbehaving_server("error") as server:
        for url in (server.url, f"http://{HOST}:{free_port()}/v1"):
            canary = Canary(golden, Endpoint(url, timeout=5))
            tracemalloc.start()
            try:
                started = time.monotonic()
                settled = held_after(150)
                grown = held_after(1000) - settled
            finally:
                tracemalloc.stop()
            assert grown < 1000 * 8, f"{grown} bytes more after 1000 cycles against {url}"
            assert time.monotonic() - started < 120
