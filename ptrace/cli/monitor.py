"""``ptrace monitor``: the canary against a live OpenAI-compatible endpoint, with Prometheus metrics."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import verdicts as v
from ptrace.cli.console import console, safe_text

CANARY = "Canary"
METRICS = "Metrics"
#: ``--once``'s exit status when the endpoint could not be compared at all (down, errors...).
NO_COMPARISON = 3


def monitor(
    golden: Annotated[Path, typer.Argument(metavar="GOLDEN", help="The golden bundle: a capture of the served model and settings.")],
    endpoint: Annotated[str, typer.Option(
        rich_help_panel=CANARY, help="The server's OpenAI API root, e.g. http://127.0.0.1:8000/v1.")],
    model: Annotated[str | None, typer.Option(
        rich_help_panel=CANARY, help="Served model name (default: the one model the endpoint lists).")] = None,
    interval: Annotated[float, typer.Option(
        rich_help_panel=CANARY,
        help="Seconds between cycles (doubling while the endpoint fails, up to 5 min).")] = 60.0,
    once: Annotated[bool, typer.Option(
        "--once", rich_help_panel=CANARY,
        help="Run one cycle (per --load level) and exit with the worst verdict: 0 pass, 1 as bad as "
             "--fail-on, 3 no comparison (cron, CI).")] = False,
    timeout: Annotated[float, typer.Option(
        rich_help_panel=CANARY,
        help="Seconds each request may take, in wall time, however slowly the server answers.")] = 30.0,
    prompt_format: Annotated[str, typer.Option(
        rich_help_panel=CANARY, help="auto (token ids, else text), ids, or text (checked to tokenize as the "
                                     "bundle's ids).")] = "auto",
    logprobs: Annotated[int | None, typer.Option(
        rich_help_panel=CANARY,
        help="Top-k logprobs to ask for (default: the bundle's; lower for capped servers).")] = None,
    load: Annotated[str | None, typer.Option(
        rich_help_panel=CANARY, metavar="N[,N...]",
        help="Send the prompts while N concurrent filler streams (seeded random prompts of mixed "
             "lengths) keep the server busy; a cycle per level: 0,8 compares an idle and a busy "
             "server. Metrics get a load label.")] = None,
    metrics_port: Annotated[int, typer.Option(
        rich_help_panel=METRICS,
        help="Serve Prometheus metrics on this port (0: any free port; not with --once).")] = 9441,
    metrics_host: Annotated[str, typer.Option(
        rich_help_panel=METRICS, help="Address to serve metrics on (0.0.0.0 for every interface).")] = "127.0.0.1",
    metrics_file: v.MetricsFile = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print each cycle as one JSON object per line on stdout.")] = False,
    fail_on: v.FailOn = "fail",
    thresholds: v.ThresholdsFile = None,
) -> None:
    """Watch a serving endpoint for numerical drift against a golden bundle; export Prometheus metrics.

    Every --interval seconds the canary sends the golden bundle's prompts, compares tokens and top-k logprobs.

    \b
        ptrace monitor golden.zarr --endpoint http://127.0.0.1:8000/v1
        ptrace monitor golden.zarr --endpoint http://127.0.0.1:8000/v1 \\
            --once --metrics-file canary.prom
        ptrace monitor golden.zarr --endpoint http://127.0.0.1:8000/v1 \\
            --once --load 0,8 --json

    The endpoint must return top-k logprobs as token ids (vLLM's return_tokens_as_token_ids).

    Endpoint problems never stop the canary: they are counted, logged once, and retried with back-off.
    """
    from ptrace.compare.thresholds import at_least
    from ptrace.errors import UsageError
    from ptrace.monitor.canary import Canary, load_golden, run
    from ptrace.monitor.client import Endpoint
    from ptrace.monitor.metrics import CanaryMetrics

    v.check_fail_on(fail_on)
    if interval <= 0:
        raise UsageError(f"--interval must be positive, not {interval:g}")
    loads = None if load is None else _load_levels(load)
    reference = load_golden(golden)
    canary = Canary(reference, Endpoint(endpoint, timeout=timeout), model=model, prompt_format=prompt_format,
                    top_logprobs=logprobs, threshold_overrides=v.threshold_overrides(thresholds, None, None))
    metrics = CanaryMetrics(reference, loads)
    where = ""
    if not once:
        port = metrics.serve(metrics_host, metrics_port)
        where = f"; metrics on http://{metrics_host}:{port}/metrics"
    levels = "" if loads is None else f" at load {','.join(map(str, loads))} (filler streams)"
    console.err.print(safe_text(f"canary: {len(reference.requests)} request(s) of {golden} against {endpoint}"
                                + levels + ("" if once else f" every {interval:g} s") + where))

    def report(cycle) -> None:
        metrics.record(cycle)
        if metrics_file is not None:
            metrics.write(metrics_file)
        if json_out:
            console.json(cycle.to_dict(), indent=None, allow_nan=False)
        elif cycle.compared:
            style = {"pass": "green", "warn": "yellow"}.get(cycle.result, "red")
            at = "" if loads is None else f"load {cycle.load}: "
            # One line per cycle however long (a log line): the terminal may wrap it, rich must not.
            console.out.print(safe_text(f"{cycle.started_at} {at}{cycle.message}", style=style), soft_wrap=True)

    def starting(load: int) -> None:
        if once and loads is not None:  # a CI job waiting on filler streams sees where it is
            console.err.print(safe_text(f"canary: load {load} ({loads.index(load) + 1} of {len(loads)}): "
                                        f"{load} filler streams, then the golden prompts"))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with console.data_on_stdout(json_out):
        last = run(canary, interval=interval, once=once, stop=stop, on_cycle=report, loads=loads or (0,),
                   before_cycle=starting)
    if once and not all(cycle.compared for cycle in last):
        raise typer.Exit(NO_COMPARISON)
    if once and fail_on is not None and any(at_least(cycle.result, fail_on) for cycle in last):
        raise typer.Exit(1)


def _load_levels(text: str) -> tuple[int, ...]:
    """``--load``'s levels: distinct whole numbers of filler streams, 0 or more, in the order given."""
    from ptrace.errors import UsageError

    levels = [item.strip() for item in text.split(",")]
    if not all(level.isdigit() for level in levels) or len(set(map(int, levels))) != len(levels):
        raise UsageError(f"--load {text!r} is not a list of distinct numbers of filler streams",
                         hint="e.g. --load 8, or --load 0,8 for an idle and a busy server")
    return tuple(map(int, levels))
