"""An OpenAI-compatible serving endpoint (vLLM, SGLang, vLLM-MindSpore), spoken to over the
standard library's HTTP client: the canary needs two calls, ``GET /models`` and
``POST /completions``, and no dependency is worth that.

Every way an answer can be unusable becomes one :class:`~ptrace.errors.EndpointError` whose
``result`` is one of :data:`PROBLEMS`: a fixed, small set, because the canary counts them as a
Prometheus label. A request never outlives its deadline (``timeout`` seconds for the whole
answer, not per socket read: a server trickling bytes is as stuck as a silent one), and never
reads more than :data:`MAX_RESPONSE_BYTES`, so a broken server cannot make the canary hang or
grow.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
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

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(url, method=method, headers=headers,
                                         data=None if body is None else json.dumps(body).encode())
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = _read_bounded(response, url, deadline)
        except EndpointError:
            raise
        except urllib.error.HTTPError as exc:
            with exc:
                detail = _server_message(exc.read(64 << 10))
            raise EndpointError(HTTP_ERROR, f"{url}: HTTP {exc.code}: {detail}", status=exc.code) from None
        except urllib.error.URLError as exc:
            raise _connection_error(url, exc.reason, self.timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _connection_error(url, exc, self.timeout) from None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise EndpointError(BAD_RESPONSE, f"{url}: the answer is not JSON ({one_line(str(exc))})") from None


def _read_bounded(response: Any, url: str, deadline: float) -> bytes:
    chunks, size = [], 0
    while chunk := response.read(1 << 16):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise EndpointError(BAD_RESPONSE, f"{url}: the answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB")
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not finish in time")
        chunks.append(chunk)
    return b"".join(chunks)


def _connection_error(url: str, reason: Any, timeout: float) -> EndpointError:
    if isinstance(reason, TimeoutError | socket.timeout):
        return EndpointError(TIMEOUT, f"{url}: no complete answer within {timeout:g} s")
    if isinstance(reason, http.client.HTTPException):
        return EndpointError(BAD_RESPONSE, f"{url}: malformed HTTP answer ({type(reason).__name__}: "
                                           f"{one_line(str(reason))})")
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return EndpointError(UNREACHABLE, f"{url}: {one_line(text)}")
