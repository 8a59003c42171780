"""A bundle described as plain data: what ``ptrace inspect`` prints and ``--json`` emits."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ptrace.bundle_spec import stats as row_stats
from ptrace.bundle_spec.dtypes import storage_dtype
from ptrace.bundle_spec.layout import request_array, stats_array, tensor_array
from ptrace.bundle_spec.reader import Bundle


def _tensor_rows(bundle: Bundle) -> list[dict[str, Any]]:
    """One entry per captured tensor name, totals over requests."""
    rows = []
    for name in bundle.tensor_names:
        shape, dtype, nbytes = None, None, 0
        for r in range(bundle.num_requests):
            found = bundle.part_shape(tensor_array(name), r)
            if found is not None:
                shape = shape or list(found)
                dtype = bundle.array_dtype(tensor_array(name), r)
                nbytes += int(np.prod(found)) * storage_dtype(dtype).itemsize
        stats_blocks = list(bundle.stats_by_request(name).values()) \
            if bundle.part_shape(stats_array(name), 0) is not None else []
        row_size = int(np.prod(shape[1:])) if shape else 1
        summary = row_stats.summarize(np.concatenate(stats_blocks), row_size) if stats_blocks else {}
        rows.append({"name": name, "shape_request0": shape, "dtype": dtype, "bytes": nbytes,
                     "stats": summary})
    return rows


def schedule_summary(schedule: dict[str, Any]) -> dict[str, Any]:
    """``meta/schedule`` in a few numbers: steps, requests per step, prefill chunks, prefix-cache
    hits, and the steps that also ran requests the bundle does not record (fillers)."""
    steps = schedule["steps"]
    sizes = [len(step["requests"]) for step in steps]
    chunks = Counter(r for step in steps for r, p in zip(step["requests"], step["prefill"]) if p)
    return {
        "steps": len(steps),
        "requests_per_step": {"min": min(sizes, default=0), "max": max(sizes, default=0),
                              "mean": sum(sizes) / len(sizes) if sizes else 0.0},
        "tokens_per_step_max": max((sum(step["tokens"]) for step in steps), default=0),
        "prefill_chunks": sum(chunks.values()),
        "chunked_prompts": sum(n > 1 for r, n in chunks.items() if r >= 0),
        "cached_tokens": sum(sum(step["cached"]) for step in steps),
        "steps_with_unrecorded": sum(any(r < 0 for r in step["requests"]) for step in steps),
        "settings": schedule["settings"],
    }


def parallel_summary(parallel: dict[str, Any]) -> dict[str, Any]:
    """``meta/parallel`` in a few lines: sizes, executor, binding, which tensor kinds were
    sharded (dims) or replicated (how they were taken), and the replicas' disagreements."""
    kinds: dict[str, dict[str, Any]] = {}
    for tensor in parallel["tensors"]:
        kind = tensor["name"].rsplit(".", 1)[-1]
        kinds.setdefault(kind, {"kind": kind, "dims": tensor["dims"], "unsharded": tensor["unsharded"],
                                "shards": tensor["shards"]})
    return {
        "tensor_parallel_size": parallel["tensor_parallel_size"],
        "pipeline_parallel_size": parallel["pipeline_parallel_size"],
        "heads": parallel["heads"], "kv_heads": parallel["kv_heads"],
        "executor": parallel["executor"], "thread_binding": parallel["thread_binding"],
        "thread_binding_source": parallel["thread_binding_source"], "per_rank": parallel["per_rank"],
        "kinds": list(kinds.values()),
        "replica_findings": parallel["replica_findings"],
    }


def describe(bundle: Bundle) -> dict[str, Any]:
    manifest, model, run = bundle.manifest, bundle.model, bundle.run
    requests = []
    for record in bundle.requests.requests:
        requests.append({
            **record.to_dict(),
            "prompt_ids": bundle.prompt_ids(record.index).tolist(),
            "output_ids": bundle.output_ids(record.index).tolist(),
            "positions_captured": bundle.part_shape(request_array("positions"), record.index)[0],
        })
    return {
        "path": str(bundle.path),
        "bundle": {k: v for k, v in manifest.to_dict().items() if k != "arrays"},
        "model": {k: v for k, v in model.to_dict().items() if k != "config"}
                 | {"layers": model.num_layers, "hidden_size": model.config.get("hidden_size"),
                    "vocab_size": model.config.get("vocab_size")},
        "run": run.to_dict(),
        "replay": bundle.replay_info(),
        "environment": bundle.environment.to_dict(),
        "dataset": None if bundle.requests.dataset is None else bundle.requests.dataset.to_dict(),
        "requests": requests,
        "tensors": _tensor_rows(bundle),
        "schedule": bundle.schedule_info(),
        "parallel": None if (parallel := bundle.parallel_info()) is None else parallel.to_dict(),
    }
