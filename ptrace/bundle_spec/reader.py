"""Reading and validating bundles.

``open_bundle`` checks, before anything else is trusted: that the path is a ptrace bundle, that
its spec version is one this code reads, and that its writer finished (SPEC.md section 7).
Everything read afterwards is checksummed chunk by chunk by Zarr's ``crc32c`` codec;
``validate_bundle`` additionally re-computes every array's whole-content CRC-32C.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c
import msgpack
import numpy as np
import zarr

from ptrace.bundle_spec import dtypes, layout
from ptrace.bundle_spec.layout import request_array, stats_array, tensor_array
from ptrace.bundle_spec.schema import (
    ROOT_ATTRIBUTE,
    SPEC_VERSION,
    Document,
    EnvironmentInfo,
    Manifest,
    ModelInfo,
    ReplayInfo,
    RequestsInfo,
    RunInfo,
    WhatIfInfo,
)
from ptrace.bundle_spec.store import open_read_store
from ptrace.errors import (
    BundleCorruptError,
    BundleError,
    BundleIncompleteError,
    BundleVersionError,
    NotABundleError,
)

D = TypeVar("D", bound=Document)

def _logical_dtype(node: zarr.Array) -> str:
    return node.attrs.get("ptrace", {}).get("dtype") or np.dtype(node.dtype).name


class Bundle:
    """A complete, readable bundle. Open with :func:`open_bundle`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._store = open_read_store(self.path)
        self._nodes: dict[str, zarr.Array] = {}
        try:
            self._root = zarr.open_group(self._store, mode="r")
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError) as exc:
            raise NotABundleError(f"{self.path} is not a ptrace bundle (no Zarr group: {exc})") from None
        marker = self._root.attrs.get(ROOT_ATTRIBUTE)
        if not isinstance(marker, dict) or not isinstance(marker.get("spec_version"), int):
            raise NotABundleError(f"{self.path} is a Zarr store but not a ptrace bundle")
        self.spec_version: int = marker["spec_version"]
        if self.spec_version > SPEC_VERSION:
            raise BundleVersionError(
                f"{self.path} uses bundle spec version {self.spec_version}; this ptrace reads up to "
                f"version {SPEC_VERSION}", hint="upgrade ptrace: pip install -U ptrace")
        if self.spec_version < 1:
            raise NotABundleError(f"{self.path} claims an invalid spec version {self.spec_version}")
        try:
            manifest = self._read_document(Manifest)
        except KeyError:
            raise BundleIncompleteError(
                f"{self.path} has no manifest: its capture was interrupted and it is incomplete",
                hint="capture it again") from None
        if not manifest.complete:
            raise BundleIncompleteError(f"{self.path} is marked incomplete", hint="capture it again")
        self.manifest: Manifest = manifest

    # -- low level ---------------------------------------------------------------------------
    def _node(self, path: str) -> zarr.Array:
        """The array at ``path`` (KeyError if absent); opened once, since opening reads metadata."""
        node = self._nodes.get(path)
        if node is None:
            node = self._root[path]
            if not isinstance(node, zarr.Array):
                raise BundleCorruptError(f"{self.path}: {path} is a group, expected an array")
            self._nodes[path] = node
        return node

    def _read(self, path: str, selection: Any = Ellipsis) -> np.ndarray:
        try:
            node = self._node(path)
        except KeyError:
            raise BundleCorruptError(f"{self.path}: array {path} is missing") from None
        try:
            data = node[selection]
        except (ValueError, OSError) as exc:
            raise BundleCorruptError(f"{self.path}: {path} is corrupted ({exc})",
                                     hint="run `ptrace validate` for a full check") from None
        return dtypes.from_storage(np.asarray(data), _logical_dtype(node))

    def _read_document(self, kind: type[D]) -> D:
        raw = self._read(kind.path) if kind.path in self._root else None
        if raw is None:
            raise KeyError(kind.path)
        try:
            data = msgpack.unpackb(raw.tobytes(), raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as exc:
            raise BundleCorruptError(f"{self.path}: {kind.path} is not valid msgpack ({exc})") from None
        return kind.from_dict(data)

    def _document(self, kind: type[Document]) -> Any:
        try:
            return self._read_document(kind)
        except KeyError:
            raise BundleCorruptError(f"{self.path}: {kind.path} is missing") from None

    # -- metadata ----------------------------------------------------------------------------
    @cached_property
    def model(self) -> ModelInfo:
        return self._document(ModelInfo)

    @cached_property
    def run(self) -> RunInfo:
        return self._document(RunInfo)

    @cached_property
    def environment(self) -> EnvironmentInfo:
        return self._document(EnvironmentInfo)

    @cached_property
    def requests(self) -> RequestsInfo:
        return self._document(RequestsInfo)

    @property
    def num_requests(self) -> int:
        return len(self.requests.requests)

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.manifest.tensor_names

    # -- per request data --------------------------------------------------------------------
    def prompt_ids(self, request: int) -> np.ndarray:
        return self._read(request_array(request, "prompt_ids"))

    def output_ids(self, request: int) -> np.ndarray:
        return self._read(request_array(request, "output_ids"))

    def topk(self, request: int) -> tuple[np.ndarray, np.ndarray]:
        """Per decode step, the top-k token ids and their logprobs: two ``[N, k]`` arrays."""
        return (self._read(request_array(request, "topk_ids")),
                self._read(request_array(request, "topk_logprobs")))

    def positions(self, request: int) -> np.ndarray:
        return self._read(request_array(request, "positions"))

    def input_ids(self, request: int) -> np.ndarray | None:
        """Tokens fed at every position, where they differ from prompt + outputs (teacher forcing)."""
        path = request_array(request, "input_ids")
        return self._read(path) if path in self.manifest.arrays else None

    def whatif_info(self) -> dict[str, Any] | None:
        """``meta/whatif`` if this run was perturbed on purpose (SPEC.md section 3.7)."""
        return self._read_document(WhatIfInfo).to_dict() if WhatIfInfo.path in self._root else None

    def replay_info(self) -> dict[str, Any] | None:
        """``meta/replay`` if this bundle is a replay of another one (SPEC.md section 3.6)."""
        return self._read_document(ReplayInfo).to_dict() if ReplayInfo.path in self._root else None

    def has_tensor(self, request: int, name: str) -> bool:
        return tensor_array(request, name) in self.manifest.arrays

    def tensor(self, request: int, name: str) -> np.ndarray:
        """The full tensor ``[rows, ...]`` in its captured dtype (needs a ``--mode full`` capture)."""
        if not self.has_tensor(request, name):
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --mode full --tensors '{name}'")
        return self._read(tensor_array(request, name))

    def stats(self, request: int, name: str) -> np.ndarray:
        """Per-row statistics ``[rows, 7]`` (columns: ``bundle_spec.stats.COLUMNS``)."""
        path = stats_array(request, name)
        if path not in self.manifest.arrays:
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --tensors '{name}'")
        return self._read(path)

    def tensor_rows(self, request: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a full tensor (reads only the chunks they live in)."""
        if not self.has_tensor(request, name):
            raise BundleError(self._missing_tensor_message(request, name),
                              hint=f"capture with --mode full --tensors '{name}'")
        return self._read(tensor_array(request, name), slice(start, stop))

    def _missing_tensor_message(self, request: int, name: str) -> str:
        return f"{self.path}: request {request} has no tensor {name!r} (captured: " \
               f"{', '.join(self.tensor_names) or 'none'}; mode {self.mode})"

    # -- housekeeping ------------------------------------------------------------------------
    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a complete bundle (directory or zip), or raise a :class:`~ptrace.errors.BundleError`."""
    return Bundle(path)


def _list_arrays(group: zarr.Group) -> list[str]:
    return sorted(name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array))


def validate_bundle(path: str | os.PathLike[str]) -> list[str]:
    """Every problem found in a bundle, as one line each; an empty list means valid.

    Opening problems (not a bundle, newer spec, incomplete) raise, as they do for every reader.
    """
    problems: list[str] = []
    with open_bundle(path) as bundle:
        for document in (ModelInfo, RunInfo, EnvironmentInfo, RequestsInfo):
            try:
                bundle._document(document)
            except BundleError as exc:
                problems.append(str(exc))
        expected = bundle.manifest.arrays
        present = [p for p in _list_arrays(bundle._root) if not layout.is_metadata(p)]
        problems += [f"unexpected array {p} (not in the manifest)" for p in present if p not in expected]
        for array_path, record in expected.items():
            problems += _check_array(bundle, array_path, record)
        if not problems:
            problems += _check_requests(bundle)
    return problems


def _check_array(bundle: Bundle, path: str, record: Any) -> list[str]:
    try:
        node = bundle._node(path)
    except KeyError:
        return [f"array {path} is missing"]
    logical = _logical_dtype(node)
    if tuple(node.shape) != tuple(record.shape) or logical != record.dtype:
        return [f"array {path} is {logical}{list(node.shape)}, the manifest says "
                f"{record.dtype}{list(record.shape)}"]
    crc = 0
    try:
        for start in range(0, node.shape[0], node.chunks[0]):
            block = node[start:start + node.chunks[0]]
            crc = google_crc32c.extend(crc, np.ascontiguousarray(block).reshape(-1).view(np.uint8))
    except (ValueError, OSError) as exc:
        return [f"array {path}: corrupted chunk ({exc})"]
    if crc != record.crc32c:
        return [f"array {path}: content checksum {crc:#010x} != manifest {record.crc32c:#010x} "
                "(a chunk is missing or was replaced)"]
    return []


def _check_requests(bundle: Bundle) -> list[str]:
    problems = []
    arrays = bundle.manifest.arrays
    for record in bundle.requests.requests:
        r = record.index
        for leaf in layout.REQUIRED_REQUEST_ARRAYS:
            if request_array(r, leaf) not in arrays:
                problems.append(f"request {r}: array {leaf} is missing")
        if problems:
            continue
        rows = arrays[request_array(r, "positions")].shape[0]
        for name in bundle.tensor_names:
            for kind, path in ((layout.STATS, stats_array(r, name)), (layout.TENSORS, tensor_array(r, name))):
                entry = arrays.get(path)
                if entry is None and (kind == layout.STATS or bundle.mode == "full"):
                    problems.append(f"request {r}: {kind}/{name} is missing")
                elif entry is not None and entry.shape[0] != rows:
                    problems.append(f"request {r}: {kind}/{name} has {entry.shape[0]} rows, "
                                    f"positions has {rows}")
        if arrays[request_array(r, "output_ids")].shape[0] != record.output_len:
            problems.append(f"request {r}: output_ids length differs from meta/requests")
    return problems
