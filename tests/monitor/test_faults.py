"""The canary against endpoints that are down, slow, erroring or speaking another dialect: it keeps
running, labels each cycle with the problem, logs it once, and holds no growing memory. A golden
bundle that cannot be a reference is refused at start. (The endpoint problems of a real vLLM
server, another model and a refused request, are in test_live.py.)"""

from __future__ import annotations

import gc
import json
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
def test_once_labels_the_problem_and_logs_one_line(mode, result, words):
    with misbehaving_server(mode) as server:
        url = f"http://{HOST}:{free_port()}/v1" if mode == "down" else server.url
        done = run_cli("monitor", GOLDEN / "torch.zarr", "--endpoint", url, "--once", "--json", "--timeout", "1")
    assert done.returncode == 3, done.stderr
    cycle = json.loads(done.stdout)
    assert cycle["result"] == result and words in cycle["message"]
    assert cycle["token_match_rate"] is None and cycle["requests"] == []
    lines = _lines(done.stderr)
    assert len(lines) == 1 and result in lines[0] and words in lines[0], done.stderr


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
