"""``ptrace inspect``: what a bundle holds, for people (or ``--json`` for machines)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ptrace.cli import options as opt
from ptrace.cli.console import console


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _short(text: str | None, limit: int = 100) -> str:
    if text is None:
        return "(token ids)"
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _at(document: Any, *keys: str) -> Any:
    """A value inside a free-form metadata map (section 3.4 of SPEC.md), or "?" where it is absent."""
    for key in keys:
        if not isinstance(document, dict) or key not in document:
            return "?"
        document = document[key]
    return document


def _fields(title: str, items: dict[str, Any]) -> Table:
    table = console.table(title=title, show_header=False, title_justify="left", title_style="bold")
    table.add_column(style="cyan")
    table.add_column()
    for key, value in items.items():
        table.add_row(key, value)
    return table


def _dataset_fields(dataset: dict[str, Any], requests: list[dict[str, Any]]) -> dict[str, Any]:
    built = [r["source"]["built"] for r in requests if r.get("source")]
    longest = dataset["max_prompt_tokens"]
    return {
        "file": dataset["file"] + (" (truncated: its complete records)" if dataset["truncated"] else ""),
        "sha256": dataset["sha256"][:16], "records": dataset["records"], "rendering": dataset["rendering"],
        "selection": f"seed {dataset['seed']}, {dataset['min_prompt_tokens']} to "
                     f"{'any' if longest is None else longest} tokens",
        "prompts": f"{built.count('conversation')} single conversations, "
                   f"{built.count('concatenated')} built from consecutive ones"}


def _schedule_fields(schedule: dict[str, Any]) -> dict[str, Any]:
    from ptrace.bundle_spec.summary import schedule_summary

    summary = schedule_summary(schedule)
    sizes = summary["requests_per_step"]
    return {
        "steps": summary["steps"],
        "requests per step": f"{sizes['min']} to {sizes['max']} (mean {sizes['mean']:.1f})",
        "most tokens in a step": summary["tokens_per_step_max"],
        "prefill chunks": f"{summary['prefill_chunks']} ({summary['chunked_prompts']} prompts split over steps)",
        "prefix-cache hits": f"{summary['cached_tokens']} tokens",
        "steps with unrecorded requests": summary["steps_with_unrecorded"],
        "settings": ", ".join(f"{k}={v}" for k, v in summary["settings"].items()),
    }


def _parallel_fields(parallel: dict[str, Any]) -> dict[str, Any]:
    from ptrace.bundle_spec.summary import parallel_summary

    summary = parallel_summary(parallel)
    findings = summary["replica_findings"]
    binding = summary["thread_binding"]
    return {
        "tensor / pipeline parallel": f"{summary['tensor_parallel_size']} / {summary['pipeline_parallel_size']}",
        "heads / KV heads": f"{summary['heads']} / {summary['kv_heads']}",
        "executor": summary["executor"],
        "thread binding": f"{binding} ({summary['thread_binding_source']})" if binding else "none",
        "per-rank shards": "kept" if summary["per_rank"] else "not kept",
        "tensors": "; ".join(f"{k['kind']} [{k['dims']}] {k['unsharded']}: {', '.join(k['shards'])}"
                             for k in summary["kinds"]) or "none",
        "replicas": "agree" if not findings else "; ".join(
            f"{f['tensor']} ranks {f['ranks'][0]}/{f['ranks'][1]} request {f['request']} at "
            f"{len(f['positions'])} positions (max |diff| {f['max_abs_diff']:.3g})" for f in findings[:5])
            + (f" ... {len(findings)} in all" if len(findings) > 5 else ""),
    }


def inspect(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle: *.zarr directory or *.zarr.zip file.")],
    as_json: opt.Json = False,
) -> None:
    """Show a bundle: model, run, environment, inputs, generated text and captured tensors."""
    from ptrace.bundle_spec import open_bundle
    from ptrace.bundle_spec.summary import describe

    with open_bundle(bundle) as opened:
        info = describe(opened)
    if as_json:
        console.json(info)
        return
    meta, model, run, env = info["bundle"], info["model"], info["run"], info["environment"]
    console.print(_fields("Bundle", {
        "path": info["path"], "spec version": meta["spec_version"], "bundle id": meta["bundle_id"],
        "created": meta["created"], "written by": f"ptrace {meta['ptrace_version']}",
        "mode": meta["mode"], "command": shlex.join(meta["command"]),
        **({"replay of": f"{info['replay']['source_path']} ({info['replay']['mode']}"
                         f"{', different weights' if info['replay']['model_mismatch'] else ''})"}
           if info["replay"] else {})}))
    console.print(_fields("Model", {
        "name": model["name"], "architecture": model["architecture"],
        "layers / hidden / vocab": f"{model['layers']} / {model['hidden_size']} / {model['vocab_size']}",
        "fingerprint": model["fingerprint"][:16], "weights": ", ".join(model["weights"])}))
    sampling = run["sampling"]
    console.print(_fields("Run", {
        "backend": f"{run['backend']} {run['backend_version']}", "dtype / device": f"{run['dtype']} / {run['device']}",
        "seeds": run["seeds"], "sampling": "greedy" if sampling["temperature"] == 0 else
        f"temperature {sampling['temperature']}, top-p {sampling['top_p']}, top-k {sampling['top_k']}",
        "max new tokens": sampling["max_new_tokens"], "top logprobs": sampling["logprobs"],
        "engine": run["engine"]}))
    packages = {k: v for k, v in env["packages"].items() if v}
    accelerators = _at(env, "hardware", "accelerators")
    console.print(_fields("Environment", {
        "python": _at(env, "python", "version"), "os": _at(env, "os", "platform"), "cpu": _at(env, "hardware", "cpu"),
        "accelerators": ", ".join(str(_at(a, "name")) for a in accelerators) if isinstance(accelerators, list)
                        else accelerators,
        "packages": ", ".join(f"{k} {v}" for k, v in packages.items()),
        "numerics env": env["env"] or "none"}))
    if info["dataset"]:
        console.print(_fields("Dataset", _dataset_fields(info["dataset"], info["requests"])))
    if info["schedule"]:
        console.print(_fields("Schedule (engine steps)", _schedule_fields(info["schedule"])))
    if info["parallel"]:
        console.print(_fields("Parallel layout", _parallel_fields(info["parallel"])))
    requests = console.table(title="Requests", title_justify="left", title_style="bold")
    for column in ("#", "prompt", "tokens in", "tokens out", "generated"):
        requests.add_column(column)
    for r in info["requests"]:
        requests.add_row(r["index"], _short(r["prompt"], 40), r["prompt_len"], r["output_len"],
                         _short(r["output_text"], 60))
    console.print(requests)
    tensors = console.table(title=f"Tensors ({meta['mode']} mode)", title_justify="left", title_style="bold")
    tensors.add_column("name", no_wrap=True)
    for column in ("rows×shape (req 0)", "dtype", "size", "mean |x|", "max |x|", "NaN/Inf"):
        tensors.add_column(column, no_wrap=True)
    for t in info["tensors"]:
        s = t["stats"]
        peak = max(abs(s.get("min", 0.0)), abs(s.get("max", 0.0))) if s else float("nan")
        shape = "×".join(map(str, t["shape_request0"])) if t["shape_request0"] else "stats only"
        tensors.add_row(t["name"], shape, t["dtype"] or "-",
                        _size(t["bytes"]), f"{s.get('abs_mean', float('nan')):.4g}", f"{peak:.4g}",
                        f"{s.get('nan_count', 0)}/{s.get('inf_count', 0)}")
    console.print(tensors)
