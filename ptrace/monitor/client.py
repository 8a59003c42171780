"""An OpenAI-compatible serving endpoint (vLLM, SGLang, vLLM-MindSpore), spoken to over the
standard library's HTTP client: the canary needs two calls, ``GET /models`` and
``POST /completions`` (streamed for the load's fillers), and no dependency is worth that. It connects to the endpoint directly,
without the environment's proxy settings.

Every way an answer can be unusable becomes one :class:`~ptrace.errors.EndpointError` whose
``result`` is one of :data:`PROBLEMS`: a fixed, small set, because the canary counts them as a
Prometheus label. A request never outlives its deadline, ``timeout`` seconds of wall time from
connecting to the answer's last byte, and never reads more than :data:`MAX_RESPONSE_BYTES`, so a
broken server cannot make the canary hang or grow. A socket timeout alone bounds each wait for
the next bytes, not the answer: a server that sends a byte every half second would hold a
request for as long as it likes. So a timer shuts the connection's socket down at the deadline,
which ends whatever read is waiting on it (:class:`_Deadline`). Connecting comes before the
watch (the TCP connection, and an https endpoint's TLS handshake): the socket timeout bounds each
of its waits, and a deadline that passed meanwhile ends the request as soon as it is connected.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from typing import Any

from ptrace.errors import EndpointError, UsageError

UNREACHABLE, TIMEOUT, HTTP_ERROR, BAD_RESPONSE, MODEL_MISMATCH = (
    "unreachable", "timeout", "http_error", "bad_response", "model_mismatch")
#: Every kind of problem an endpoint can have, as the canary labels it.
PROBLEMS = (UNREACHABLE, TIMEOUT, HTTP_ERROR, BAD_RESPONSE, MODEL_MISMATCH)
#: The largest answer read: a canary's completions with top-20 logprobs are a few hundred KiB.
MAX_RESPONSE_BYTES = 16 << 20
#: The longest server message quoted in a log line.
_MAX_MESSAGE = 200
#: Environment variable holding the endpoint's API key (vLLM's ``--api-key``), if it needs one.
API_KEY_VARIABLE = "OPENAI_API_KEY"


def one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` on one line, cut to ``limit`` characters: what a server says goes into log lines."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _server_message(body: bytes) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else its text."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return one_line(message if isinstance(message, str) else body.decode("utf-8", "replace"))


class Endpoint:
    """``base_url`` is the API root that ``/models`` and ``/completions`` hang off
    (``http://HOST:PORT/v1``)."""

    def __init__(self, base_url: str, *, timeout: float, api_key: str | None = None) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"endpoint {base_url!r} is not an http(s) URL",
                             hint="pass the API root, e.g. --endpoint http://127.0.0.1:8000/v1")
        if timeout <= 0:
            raise UsageError(f"timeout must be positive, not {timeout}")
        self.base_url = base_url.rstrip("/")
        self._connection = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._root = parsed.hostname, parsed.port, parsed.path.rstrip("/")
        self.timeout = timeout
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE)

    def models(self) -> list[str]:
        """The ids of the models the endpoint serves."""
        data = self._request("GET", "/models")
        try:
            return [str(model["id"]) for model in data["data"]]
        except (KeyError, TypeError) as exc:
            raise EndpointError(BAD_RESPONSE, f"{self.base_url}/models: no model list in the answer "
                                              f"({type(exc).__name__}: {one_line(str(exc))})") from None

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One ``/completions`` request; the decoded JSON answer."""
        data = self._request("POST", "/completions", body)
        if not isinstance(data, dict):
            raise EndpointError(BAD_RESPONSE, f"{self.base_url}/completions answered {type(data).__name__}, "
                                              "not a JSON object")
        return data

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """One streamed ``/completions`` request (``"stream": true``): each server-sent event's
        data, decoded, as it arrives, until ``[DONE]``; the deadline covers the whole stream."""
        url = self.base_url + "/completions"
        with self._exchange("POST", "/completions", {**body, "stream": True}) as response:
            if response.status >= 300:
                raise EndpointError(HTTP_ERROR, f"{url}: HTTP {response.status}: "
                                                f"{_server_message(_read_bounded(response, url))}",
                                    status=response.status)
            while line := response.readline(MAX_RESPONSE_BYTES):
                data = line.strip().removeprefix(b"data:").strip() if line.startswith(b"data:") else b""
                if data == b"[DONE]":
                    return
                if data:
                    try:
                        yield json.loads(data)
                    except ValueError as exc:
                        raise EndpointError(BAD_RESPONSE, f"{url}: a streamed event is not JSON "
                                                          f"({one_line(str(exc))})") from None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        with self._exchange(method, path, body) as response:
            raw = _read_bounded(response, url)
        if response.status >= 300:
            raise EndpointError(HTTP_ERROR, f"{url}: HTTP {response.status}: {_server_message(raw)}",
                                status=response.status)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise EndpointError(BAD_RESPONSE, f"{url}: the answer is not JSON ({one_line(str(exc))})") from None

    @contextmanager
    def _exchange(self, method: str, path: str, body: dict[str, Any] | None) -> Iterator[http.client.HTTPResponse]:
        """Connect, send, and yield the response to be read, all within the deadline; a failed
        exchange (in here or in the reading) becomes the problem's :class:`EndpointError`."""
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        connection = self._connection(self._host, self._port, timeout=self.timeout)
        with closing(connection), _Deadline(self.timeout) as deadline:
            try:
                connection.connect()
                deadline.watch(connection.sock)
                connection.request(method, self._root + path, None if body is None else json.dumps(body).encode(),
                                   headers)
                yield connection.getresponse()
            except EndpointError:  # an OSError too (ConnectionError), but already the problem's own
                raise
            except (OSError, http.client.HTTPException) as exc:
                raise _connection_error(url, exc, self.timeout, timed_out=deadline.passed.is_set()) from None
            if deadline.passed.is_set():  # an answer without a length just ends when its socket is shut down
                raise _connection_error(url, TimeoutError(), self.timeout, timed_out=True)


class _Deadline:
    """Shuts the watched socket down ``seconds`` after the block starts, unless it has ended;
    ``passed`` says whether it did. Shutting a socket down wakes every read blocked on it (closing
    it would not), so the request ends at its deadline however the server sends. The socket is
    held here, not read from the connection: http.client hands it to the response and forgets it
    when the answer ends with the connection."""

    def __init__(self, seconds: float) -> None:
        self.passed = threading.Event()
        self._socket: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        self._socket = sock
        if self.passed.is_set():  # the deadline passed while connecting
            self._shut_down()

    def _expire(self) -> None:
        self.passed.set()
        self._shut_down()

    def _shut_down(self) -> None:
        if self._socket is not None:
            with suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()


def _read_bounded(response: http.client.HTTPResponse, url: str) -> bytes:
    chunks, size = [], 0
    while chunk := response.read(1 << 16):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise EndpointError(BAD_RESPONSE, f"{url}: the answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _connection_error(url: str, reason: Any, timeout: float, *, timed_out: bool) -> EndpointError:
    """The problem behind a failed exchange; past the deadline, whatever the shut-down socket made
    the read raise, the deadline is the cause."""
    if timed_out or isinstance(reason, TimeoutError):
        return EndpointError(TIMEOUT, f"{url}: no complete answer within {timeout:g} s")
    if isinstance(reason, http.client.HTTPException):
        return EndpointError(BAD_RESPONSE, f"{url}: malformed HTTP answer ({type(reason).__name__}: "
                                           f"{one_line(str(reason))})")
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return EndpointError(UNREACHABLE, f"{url}: {one_line(text)}")
