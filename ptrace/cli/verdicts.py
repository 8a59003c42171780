"""What ``replay`` and ``compare`` share: thresholds in, report / JSON / exit code out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from ptrace.cli.console import console

VERDICT = "Verdict and outputs"

Report = Annotated[Path | None, typer.Option(
    "--report", rich_help_panel=VERDICT, help="HTML report to write (self-contained, opens offline).")]
JsonOut = Annotated[Path | None, typer.Option(
    "--json", rich_help_panel=VERDICT, help="Write the results as JSON here ('-' for stdout).")]
FailOn = Annotated[str | None, typer.Option(
    rich_help_panel=VERDICT, help="Exit 1 if the verdict is at least this bad: warn or fail (for CI gates).")]
ThresholdsFile = Annotated[Path | None, typer.Option(
    "--thresholds", rich_help_panel=VERDICT,
    help="JSON file of thresholds: pass_mean_abs, pass_cos, warn_mean_abs, warn_cos, tie_margin.")]
MetricsFile = Annotated[Path | None, typer.Option(
    "--metrics-file", rich_help_panel=VERDICT,
    help="Write the results as Prometheus metrics here (text format, replaced atomically: for "
         "node_exporter's textfile collector, name it *.prom).")]
PassCos = Annotated[float | None, typer.Option(rich_help_panel=VERDICT, help="Override: pass needs cos sim above this.")]
PassMeanAbs = Annotated[float | None, typer.Option(rich_help_panel=VERDICT, help="Override: pass needs mean abs error below this.")]


def threshold_overrides(path: Path | None, pass_cos: float | None, pass_mean_abs: float | None) -> dict[str, float]:
    from ptrace.compare.thresholds import load_overrides

    return load_overrides(path, {"pass_cos": pass_cos, "pass_mean_abs": pass_mean_abs})


def check_fail_on(fail_on: str | None) -> None:
    if fail_on not in (None, "warn", "fail"):
        raise typer.BadParameter("use warn or fail", param_hint="--fail-on")


def emit(comparison, *, report: Path | None, json_out: Path | None, metrics_file: Path | None,
         fail_on: str | None) -> None:
    """Print the verdict, write the report, JSON and metrics, and exit non-zero when asked to gate."""
    from ptrace.compare.thresholds import at_least

    style = {"pass": "green", "warn": "yellow", "fail": "red"}[comparison.verdict]
    *whatifs, verdict = comparison.summary.split("\n")  # what-if lines lead; the verdict is the last
    for line in whatifs:
        console.print(Text(line))
    console.print(Text(verdict, style=style))
    if report is not None:
        from ptrace.reports.html import write_report  # jinja2 and the plots: only for a report

        write_report(comparison, report)
        console.print(f"report: {report}")
    if json_out is not None:
        text = comparison.to_json()
        if str(json_out) == "-":
            console.json_text(text)
        else:
            json_out.write_text(text)
            console.print(f"json: {json_out}")
    if metrics_file is not None:
        from ptrace.monitor.textfile import write_comparison_metrics

        write_comparison_metrics(comparison, metrics_file)
        console.print(f"metrics: {metrics_file}")
    if fail_on is not None and at_least(comparison.verdict, fail_on):
        raise typer.Exit(1)
