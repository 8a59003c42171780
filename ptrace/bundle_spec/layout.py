"""Where everything lives in a bundle (SPEC.md section 2): the one module that spells out paths.

Every reader and writer asks this module for a node's path, so the hierarchy is written down
once in code, as it is once in the spec.
"""

from __future__ import annotations

#: The group holding the metadata documents.
META = "meta"
MANIFEST = "meta/manifest"
MODEL = "meta/model"
RUN = "meta/run"
ENVIRONMENT = "meta/environment"
REQUESTS = "meta/requests"
REPLAY = "meta/replay"
WHATIF = "meta/whatif"

#: Arrays every request has.
REQUIRED_REQUEST_ARRAYS = ("prompt_ids", "output_ids", "topk_ids", "topk_logprobs", "positions")
#: Arrays a request MAY have (prompt logprobs; the fed tokens of a teacher-forced run).
OPTIONAL_REQUEST_ARRAYS = ("prompt_logprobs", "prompt_topk_ids", "prompt_topk_logprobs", "input_ids")
#: The two per-tensor kinds: statistics (always) and the tensor itself (mode "full").
STATS, TENSORS = "stats", "tensors"


def request_array(request: int, leaf: str) -> str:
    """``requests/{r}/{leaf}``: one of the request's own arrays."""
    return f"requests/{request}/{leaf}"


def tensor_array(request: int, name: str) -> str:
    """``requests/{r}/tensors/{name}``: the captured tensor itself."""
    return request_array(request, f"{TENSORS}/{name}")


def stats_array(request: int, name: str) -> str:
    """``requests/{r}/stats/{name}``: the tensor's per-position statistics."""
    return request_array(request, f"{STATS}/{name}")


def is_metadata(path: str) -> bool:
    return path == META or path.startswith(META + "/")
