"""Load for the canary (``ptrace monitor --load N``): N concurrent streams of filler completions
sent to the endpoint while the canary's own prompts run, so that its answers are computed in a
busy server's batches, as production traffic's are.

A batched server computes a request together with whatever else it scheduled in that step (the
batch size, chunked prefill and the shapes of the matrix products change the arithmetic): an
idle server's answers need not be a busy one's. Each stream sends one streamed completion after
another, each of a new seeded filler prompt of random tokens and mixed length (the batch
what-ifs' own, :func:`ptrace.capture.batching.filler_prompts`). The canary's requests start
only once every stream is generating (its first token has come back), so each of them is batched
with N fillers from its first step. The fillers' answers are read and dropped: nothing of theirs
reaches the canary's comparison.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import closing
from dataclasses import dataclass

from ptrace.capture.batching import filler_prompts
from ptrace.errors import EndpointError
from ptrace.monitor.client import BAD_RESPONSE, TIMEOUT, Endpoint

#: Seconds a stream waits before its next filler after one failed (a down server is not hammered).
RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class FillerShape:
    """What the fillers look like: token ids below ``vocab_size``, prompts of 1 to
    ``longest_prompt`` tokens, ``max_tokens`` generated each (``ignore_eos``: all of them), so
    that a filler fits wherever the golden bundle's longest request does."""

    vocab_size: int
    longest_prompt: int
    max_tokens: int


class Load:
    """``streams`` filler streams against ``endpoint``'s ``model`` for as long as the block runs.

    Entering returns once every stream is generating, or raises the first stream's problem (an
    :class:`EndpointError`) if one fails before, or a timeout if they are not all generating
    within the endpoint's timeout. ``serial`` numbers the fillers across loads (each filler prompt
    is drawn with its number as seed), so that no filler repeats an earlier one and finds it in
    the prefix cache. Leaving waits for each stream's next event (at most the endpoint's timeout).
    """

    def __init__(self, endpoint: Endpoint, model: str, streams: int, shape: FillerShape,
                 serial: itertools.count) -> None:
        self.endpoint, self.model, self.streams, self.shape, self._serial = endpoint, model, streams, shape, serial
        #: fillers answered to the end, and fillers that failed, while the block ran
        self.answered = self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._generating = [threading.Event() for _ in range(streams)]
        self._problem: EndpointError | None = None
        self._threads = [threading.Thread(target=self._stream, args=(index,), daemon=True,
                                          name=f"ptrace-filler-{index}") for index in range(streams)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + self.endpoint.timeout
        while not all(event.is_set() for event in self._generating):
            if self._problem is not None or time.monotonic() > deadline:
                self._end()
                raise self._start_failure()
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end()

    def _end(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _start_failure(self) -> EndpointError:
        if self._problem is not None:
            return EndpointError(self._problem.result, f"a filler stream failed: {self._problem}",
                                 status=self._problem.status)
        generating = sum(event.is_set() for event in self._generating)
        return EndpointError(TIMEOUT, f"{generating} of {self.streams} filler streams generating after "
                                      f"{self.endpoint.timeout:g} s")

    def _stream(self, index: int) -> None:
        """One stream: a filler after another until the block ends; a filler still generating
        then is abandoned (its connection closed: the server aborts it)."""
        while not self._stop.is_set():
            try:
                with closing(self.endpoint.stream(self._filler())) as events:
                    streamed = False
                    for _ in events:
                        streamed = True
                        self._generating[index].set()
                        if self._stop.is_set():
                            return
                if not streamed:
                    raise EndpointError(BAD_RESPONSE, f"{self.endpoint.base_url}/completions answered a streamed "
                                                      "completion without server-sent events")
                with self._lock:
                    self.answered += 1
            except EndpointError as exc:
                with self._lock:
                    self.failed += 1
                    self._problem = self._problem or exc
                self._stop.wait(RETRY_SECONDS)

    def _filler(self) -> dict[str, object]:
        shape = self.shape
        [prompt] = filler_prompts(1, next(self._serial), shape.vocab_size, shape.longest_prompt, shape.longest_prompt)
        return {"model": self.model, "prompt": prompt.tolist(), "max_tokens": shape.max_tokens, "temperature": 0.0,
                "ignore_eos": True}
