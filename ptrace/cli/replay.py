"""``ptrace replay``: re-run a bundle on another engine, dtype or device, and report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import options as opt
from ptrace.cli import verdicts as v
from ptrace.cli.console import console


def replay(
    bundle: Annotated[Path, typer.Argument(help="The captured bundle (*.zarr or *.zarr.zip).")],
    backend: opt.Backend,
    dtype: Annotated[str | None, typer.Option(rich_help_panel=opt.ENGINE, help="Override the captured dtype.")] = None,
    device: Annotated[str | None, typer.Option(rich_help_panel=opt.ENGINE, help="Override the captured device.")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", rich_help_panel=opt.ENGINE,
        help="Model directory (default: the path recorded in the bundle).")] = None,
    allow_model_mismatch: Annotated[bool, typer.Option(
        "--allow-model-mismatch", rich_help_panel=opt.ENGINE, help="Replay even if the weights' fingerprint differs (recorded).")] = False,
    engine_option: opt.EngineOption = None,
    kv_cache_dtype: opt.KvCacheDtype = None,
    mode: Annotated[list[str] | None, typer.Option(
        metavar="MODE", help="teacher-forced (fed the captured tokens: tensors stay aligned) and/or free-running "
             "(own tokens: token agreement). Default: both.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Prefix of the replay bundles (default: next to BUNDLE).")] = None,
    overwrite: opt.Overwrite = False,
    report: v.Report = None,
    json_out: v.JsonOut = None,
    metrics_file: v.MetricsFile = None,
    fail_on: v.FailOn = None,
    thresholds: v.ThresholdsFile = None,
    pass_cos: v.PassCos = None,
    pass_mean_abs: v.PassMeanAbs = None,
) -> None:
    """Replay a bundle on another engine, dtype or device; compare and write an HTML report.

    Examples: does vLLM reproduce a MindSpore capture; in bfloat16; with an fp8 KV cache?

        ptrace replay ms.zarr --backend vllm --report report.html

        ptrace replay ms.zarr --backend vllm --dtype bfloat16

        ptrace replay ms.zarr --backend vllm --kv-cache-dtype fp8
    """
    from ptrace.replay.session import MODES, ReplayConfig
    from ptrace.replay.session import replay as run_replay

    v.check_fail_on(fail_on)
    config = ReplayConfig(
        bundle=bundle, backend=backend, output=output, dtype=dtype, device=device, model=model,
        allow_model_mismatch=allow_model_mismatch, modes=tuple(mode or MODES),
        engine_options=opt.engine_options(engine_option, kv_cache_dtype), overwrite=overwrite,
        threshold_overrides=v.threshold_overrides(thresholds, pass_cos, pass_mean_abs),
        command=("ptrace", *sys.argv[1:]))
    with console.progress(f"replay on {backend}") as update:
        result = run_replay(config, progress=update)
    for mode, path in result.bundles.items():
        console.print(f"{mode} replay: {path}")
    target = report or next(iter(result.bundles.values())).with_suffix("").with_suffix(".report.html")
    v.emit(result.primary, report=target, json_out=json_out, metrics_file=metrics_file, fail_on=fail_on)
