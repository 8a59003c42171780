"""Where everything lives in a bundle (SPEC.md section 2): the one module that spells out paths.

Every reader and writer asks this module for a node's path, so the hierarchy is written down
once in code, as it is once in the spec.

Since spec version 2, each kind of per-request data is one array over all requests (its rows
are the requests' rows, segment by segment), named here by its **array path**
(``requests/prompt_ids``, ``stats/{name}``, ``tensors/{name}``); its segment table says which
rows belong to which request. Version 1 gave every request its own arrays
(``requests/{r}/...``): :func:`v1_array` maps an array path to one request's array there.
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
#: The arithmetic settings the engine actually used (optional: older bundles lack it).
SETTINGS = "meta/settings"
#: Which requests a batched engine ran together, step by step (optional).
SCHEDULE = "meta/schedule"
#: How a parallel run's ranks held each tensor, and where its replicas disagreed (optional).
PARALLEL = "meta/parallel"

#: Arrays every request has.
REQUIRED_REQUEST_ARRAYS = ("prompt_ids", "output_ids", "topk_ids", "topk_logprobs", "positions")
#: Arrays a request MAY have (prompt logprobs; the fed tokens of a teacher-forced run).
OPTIONAL_REQUEST_ARRAYS = ("prompt_logprobs", "prompt_topk_ids", "prompt_topk_logprobs", "input_ids")
#: The two per-tensor kinds: statistics (always) and the tensor itself (mode "full").
STATS, TENSORS = "stats", "tensors"
#: The group of segment tables, one per data array (spec version 2).
SEGMENTS = "segments"
#: Columns of a segment table: the request, the rows ``[start, stop)`` of the data array, and
#: the CRC-32C of those rows' content.
SEGMENT_COLUMNS = ("request", "start", "stop", "crc32c")


def request_array(leaf: str) -> str:
    """``requests/{leaf}``: token ids, logprobs or positions of every request."""
    return f"requests/{leaf}"


def tensor_array(name: str) -> str:
    """``tensors/{name}``: the captured tensor itself, every request's rows."""
    return f"{TENSORS}/{name}"


def stats_array(name: str) -> str:
    """``stats/{name}``: the tensor's per-position statistics, every request's rows."""
    return f"{STATS}/{name}"


def segment_table(array: str) -> str:
    """``segments/{array}``: which rows of the data array ``array`` belong to which request."""
    return f"{SEGMENTS}/{array}"


def is_segment_table(path: str) -> bool:
    return path.startswith(SEGMENTS + "/")


def v1_array(array: str, request: int) -> str:
    """Spec version 1's array for one request's part of ``array``: ``requests/{r}/{leaf}``,
    ``requests/{r}/stats/{name}``, ``requests/{r}/tensors/{name}``."""
    return f"requests/{request}/{array.removeprefix('requests/')}"


def is_metadata(path: str) -> bool:
    return path == META or path.startswith(META + "/")
