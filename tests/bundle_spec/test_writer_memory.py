"""The writer's memory stays bounded however many requests a batched engine runs at once, and
arrays appended early (many segments per request, partial chunks rewritten as rows arrive) read
back exactly.

The budget (``writer.PENDING_BYTES``) and the chunk rows are made small here, so that a few MB
exercise what a long vLLM run does with hundreds of MB.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ptrace.bundle_spec import BundleWriter, open_bundle, validate_bundle
from ptrace.bundle_spec import writer as writer_module
from ptrace.bundle_spec.layout import stats_array, tensor_array
from ptrace.bundle_spec.stats import row_stats
from tests.bundle_spec.test_roundtrip import finish_minimal
from tests.conftest import run_cli

TENSORS = ("embed", "layers.0.out", "logits")


def _write_batched(path: Path, requests: int, prompt: int, steps: int, *, full: bool = False,
                   keep: bool = True) -> dict[str, np.ndarray]:
    """What the recorder writes for a batched engine: each request's prefill rows, then one row per
    request per decode step, for every tensor. Returns what was written, by (array path, request)
    (if ``keep``)."""
    rng = np.random.default_rng(0)
    written: dict[tuple[str, int], list[np.ndarray]] = {}

    def append(request: int, rows: int) -> None:
        for name in TENSORS:
            tensor = rng.standard_normal((rows, 5)).astype(ml_dtypes.bfloat16)
            blocks = {stats_array(name): row_stats(tensor)}
            if full:
                blocks[tensor_array(name)] = tensor
            for array, block in blocks.items():
                writer.append(array, request, block)
                if keep:
                    written.setdefault((array, request), []).append(block)

    with BundleWriter(path) as writer:
        for request in range(requests):
            append(request, prompt)
        for _ in range(steps):
            for request in range(requests):
                append(request, 1)
        finish_minimal(writer, prompt + steps, requests=requests, mode="full" if full else "stats",
                       tensor_names=list(TENSORS))
    return {key: np.concatenate(blocks) for key, blocks in written.items()}


PROMPT, STEPS = 2000, 2


def _peak_bytes(tmp_path: Path, requests: int) -> int:
    """Peak of what Python allocated while a batched run of ``requests`` was written."""
    gc.collect()
    tracemalloc.start()
    try:
        _write_batched(tmp_path / f"{requests}.zarr", requests, PROMPT, STEPS, keep=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writer_memory_does_not_grow_with_the_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "PENDING_BYTES", 1 << 20)
    small, large = _peak_bytes(tmp_path, 10), _peak_bytes(tmp_path, 40)
    stats_bytes = 30 * len(TENSORS) * (PROMPT + STEPS) * 7 * 8  # what the 30 more requests add: 10 MB
    # Held until the end, they would raise the peak by all of that; bounded, by a small part
    # (what each array costs to keep open, not its rows).
    assert large - small < 0.2 * stats_bytes, (small, large, stats_bytes)


def _segments(path: Path) -> int:
    with open_bundle(path) as bundle:
        return sum(len(parts) for parts in bundle._segments(stats_array("logits")).values())


@pytest.mark.parametrize("full", [False, True], ids=["stats", "full"])
def test_arrays_appended_in_many_segments_read_back_exactly(tmp_path, monkeypatch, full):
    # A budget of one byte appends every array at every row; chunks of 4 rows with blocks of 1
    # and 7 rows make most write-outs partial and rewrite chunks written before.
    monkeypatch.setattr(writer_module, "PENDING_BYTES", 1)
    monkeypatch.setattr(writer_module, "MAX_CHUNK_ROWS", 4)
    written = _write_batched(tmp_path / "b.zarr", requests=3, prompt=7, steps=6, full=full)
    assert _segments(tmp_path / "b.zarr") == 3 * (1 + 6)  # the prefill, then one per step
    assert validate_bundle(tmp_path / "b.zarr") == []  # every chunk's, segment's and array's CRC
    with open_bundle(tmp_path / "b.zarr") as bundle:
        for (array, request), data in written.items():
            kind, name = array.split("/")
            back = bundle.stats(request, name) if kind == "stats" else bundle.tensor(request, name)
            assert back.dtype == data.dtype and back.tobytes() == data.tobytes(), (array, request)
            if kind == "tensors":
                blocks = [block.copy() for _, block in bundle.tensor_blocks(request, name, 5)]
                assert np.concatenate(blocks).tobytes() == data.tobytes(), (array, request)


def test_memory_pressure_changes_segments_not_what_requests_read(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "MAX_CHUNK_ROWS", 4)
    _write_batched(tmp_path / "roomy.zarr", requests=3, prompt=7, steps=6, full=True)
    monkeypatch.setattr(writer_module, "PENDING_BYTES", 1)
    _write_batched(tmp_path / "tight.zarr", requests=3, prompt=7, steps=6, full=True)
    assert _segments(tmp_path / "roomy.zarr") == 3  # with room, one segment per request
    with open_bundle(tmp_path / "roomy.zarr") as roomy, open_bundle(tmp_path / "tight.zarr") as tight:
        for name in TENSORS:
            for request in range(3):
                assert roomy.tensor(request, name).tobytes() == tight.tensor(request, name).tobytes()
                assert roomy.stats(request, name).tobytes() == tight.stats(request, name).tobytes()
    done = run_cli("validate", tmp_path / "tight.zarr")
    assert done.returncode == 0, done.stderr


def test_files_do_not_grow_with_the_requests(tmp_path):
    """One array per tensor over all requests: 40 requests make no more files than 4 (section 9)."""
    _write_batched(tmp_path / "few.zarr", requests=4, prompt=7, steps=2, full=True, keep=False)
    _write_batched(tmp_path / "many.zarr", requests=40, prompt=7, steps=2, full=True, keep=False)

    def files(root: Path) -> int:
        return sum(1 for f in root.rglob("*") if f.is_file())

    assert files(tmp_path / "many.zarr") == files(tmp_path / "few.zarr")
