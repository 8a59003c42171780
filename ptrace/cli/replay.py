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
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="The captured bundle (*.zarr or *.zarr.zip).")],
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
    calibrate: Annotated[bool | None, typer.Option(
        "--calibrate/--no-calibrate", rich_help_panel=v.VERDICT,
        help="Also replay on a trusted engine at this dtype (the capture's own, else torch, else another; "
             "never this replay's own engine, dtype and device) and test whether the error is more than "
             "the dtype explains. Default: when --dtype or --device changes.")] = None,
    localize: Annotated[bool, typer.Option(
        "--localize", rich_help_panel=v.VERDICT,
        help="Also replay with every layer fed the capture's input (its own error, measured) and, if "
             "tokens diverge, find the fewest layers whose output restores them.")] = False,
    thresholds: v.ThresholdsFile = None,
    pass_cos: v.PassCos = None,
    pass_mean_abs: v.PassMeanAbs = None,
    inject: opt.Inject = None,
    inject_file: opt.InjectFile = None,
    sweep: opt.Sweep = None,
    repeats: opt.Repeats = 1,
) -> None:
    """Replay a bundle on another engine, dtype or device; compare and write an HTML report.

    Examples: does vLLM reproduce a MindSpore capture; in bfloat16; with an fp8 KV cache?

    \b
        ptrace replay ms.zarr --backend vllm --report report.html
        ptrace replay ms.zarr --backend vllm --dtype bf16
        ptrace replay ms.zarr --backend vllm --kv-cache-dtype fp8

    With --inject the replay is also run with errors injected on purpose (see `ptrace whatif`).
    """
    from ptrace.errors import UsageError
    from ptrace.replay.plan import MODES, ReplayConfig
    from ptrace.replay.session import replay as run_replay

    v.check_fail_on(fail_on)
    whatifs = _whatifs(inject, inject_file)
    if ctx.info_name == "whatif" and not whatifs:
        raise UsageError("ptrace whatif needs at least one what-if", hint="pass --inject SPEC or --inject-file FILE")
    config = ReplayConfig(
        bundle=bundle, backend=backend, output=output, dtype=dtype, device=device, model=model,
        allow_model_mismatch=allow_model_mismatch, modes=tuple(mode or MODES),
        engine_options=opt.engine_options(engine_option, kv_cache_dtype), overwrite=overwrite,
        threshold_overrides=v.threshold_overrides(thresholds, pass_cos, pass_mean_abs),
        command=("ptrace", *sys.argv[1:]), calibrate=calibrate, localize=localize)
    with console.data_on_stdout(str(json_out) == "-"):
        if whatifs:
            _run_whatifs(config, whatifs, sweep, repeats, report=report, json_out=json_out,
                         metrics_file=metrics_file, fail_on=fail_on)
            return
        with console.progress(f"replay on {backend}") as update:
            result = run_replay(config, progress=update)
        for mode, path in result.bundles.items():
            console.print(f"{mode} replay: {path}")
        target = report or next(iter(result.bundles.values())).with_suffix("").with_suffix(".report.html")
        v.emit(result.primary, report=target, json_out=json_out, metrics_file=metrics_file, fail_on=fail_on)


def _run_whatifs(config, whatifs: tuple, sweep: str | None, repeats: int, *, report: Path | None,
                 json_out: Path | None, metrics_file: Path | None, fail_on: str | None) -> None:
    from ptrace.capture.whatif import sweep_values
    from ptrace.replay.whatif import WhatIfConfig, default_output, run_whatifs

    with console.progress(f"what-ifs on {config.backend}") as update:
        comparison = run_whatifs(WhatIfConfig(config, whatifs, sweep and sweep_values(sweep), repeats),
                                 progress=update)
    folder = config.output or default_output(config.bundle, config.backend, comparison.b["dtype"],
                                             comparison.b["device"])
    v.emit(comparison, report=report or folder / "report.html", json_out=json_out, metrics_file=metrics_file,
           fail_on=fail_on)


def _whatifs(inject: list[str] | None, inject_file: Path | None) -> tuple:
    """Every what-if given: ``--inject`` texts ('+' joins injections of one run), then the file's."""
    from ptrace.capture import whatif

    runs = [tuple(whatif.parse(part) for part in whatif.split_joined(text)) for text in inject or []]
    if inject_file is not None:
        runs += whatif.read_file(inject_file)
    return tuple(runs)


WHATIF_HELP = """Replay a bundle with errors injected on purpose, and watch them propagate.

Each --inject is one what-if, run (teacher-forced and free-running) next to an unperturbed baseline replay on the same engine, dtype and device; the report and --json say, per what-if, how many requests diverge and where, the KL, the first affected tensor and how the error grows through the layers. --sweep and --repeats make curves.

Noise in the KV cache of the first 100 positions (how often do generations diverge?), four levels:

\b
    ptrace whatif run.zarr -b vllm \\
        -i 'noise:layers.*.k,layers.*.v:std=1:positions=0-99' \\
        --sweep std=1e-3,1e-2,1e-1,1

Would float16 rounding of one layer's attention explain a difference there?

\b
    ptrace whatif run.zarr -b torch -i 'cast:layers.2.attn:dtype=fp16' \\
        -i 'cast:layers.2.q,layers.2.k:dtype=fp16'

Also: splice (the reference's value), config (rms_norm_eps=...), engine (kv_cache_dtype=fp8). """
