"""The writer's memory stays bounded however many requests a batched engine runs at once, and
arrays written out early (partial chunks, rewritten as rows arrive) read back exactly.

The budget (``writer.PENDING_BYTES``) and the streamed chunk rows are made small here, so that a
few MB exercise what a long vLLM run does with hundreds of MB.
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
from ptrace.bundle_spec.stats import row_stats
from tests.bundle_spec.test_roundtrip import finish_minimal
from tests.conftest import run_cli

TENSORS = ("embed", "layers.0.out", "logits")


def _write_batched(path: Path, requests: int, prompt: int, steps: int, *, full: bool = False,
                   keep: bool = True) -> dict[str, np.ndarray]:
    """What the recorder writes for a batched engine: each request's prefill rows, then one row per
    request per decode step, for every tensor. Returns what was written, by array path (if ``keep``)."""
    rng = np.random.default_rng(0)
    written: dict[str, list[np.ndarray]] = {}

    def append(request: int, rows: int) -> None:
        for name in TENSORS:
            tensor = rng.standard_normal((rows, 5)).astype(ml_dtypes.bfloat16)
            blocks = {f"requests/{request}/stats/{name}": row_stats(tensor)}
            if full:
                blocks[f"requests/{request}/tensors/{name}"] = tensor
            for array, block in blocks.items():
                writer.append_rows(array, block)
                if keep:
                    written.setdefault(array, []).append(block)

    with BundleWriter(path) as writer:
        for request in range(requests):
            append(request, prompt)
        for _ in range(steps):
            for request in range(requests):
                append(request, 1)
        finish_minimal(writer, prompt + steps, requests=requests, mode="full" if full else "stats",
                       tensor_names=list(TENSORS))
    return {array: np.concatenate(blocks) for array, blocks in written.items()}


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


@pytest.mark.parametrize("full", [False, True], ids=["stats", "full"])
def test_arrays_written_out_in_partial_chunks_read_back_exactly(tmp_path, monkeypatch, full):
    # A budget of one byte writes every array out at every append; chunks of 4 rows with blocks
    # of 1 and 7 rows make most write-outs partial and rewrite chunks written before.
    monkeypatch.setattr(writer_module, "PENDING_BYTES", 1)
    monkeypatch.setattr(writer_module, "STREAM_CHUNK_ROWS", 4)
    written = _write_batched(tmp_path / "b.zarr", requests=3, prompt=7, steps=6, full=full)
    assert validate_bundle(tmp_path / "b.zarr") == []  # every chunk's CRC and each array's whole CRC
    with open_bundle(tmp_path / "b.zarr") as bundle:
        for array, data in written.items():
            request, kind, name = int(array.split("/")[1]), array.split("/")[2], array.split("/")[3]
            back = bundle.stats(request, name) if kind == "stats" else bundle.tensor(request, name)
            assert back.dtype == data.dtype and back.tobytes() == data.tobytes(), array


def test_partial_write_outs_store_the_same_bytes_as_whole_chunks(tmp_path, monkeypatch):
    """The bundle does not depend on memory pressure: every array file is byte-identical."""
    monkeypatch.setattr(writer_module, "STREAM_CHUNK_ROWS", 4)
    _write_batched(tmp_path / "roomy.zarr", requests=3, prompt=7, steps=6, full=True)
    monkeypatch.setattr(writer_module, "PENDING_BYTES", 1)
    _write_batched(tmp_path / "tight.zarr", requests=3, prompt=7, steps=6, full=True)

    def array_files(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in (root / "requests").rglob("*") if f.is_file()}

    roomy, tight = array_files(tmp_path / "roomy.zarr"), array_files(tmp_path / "tight.zarr")
    assert len(roomy) > 3 * len(TENSORS) * 2 * 3  # several chunks per array
    assert roomy == tight
    done = run_cli("validate", tmp_path / "tight.zarr")
    assert done.returncode == 0, done.stderr
