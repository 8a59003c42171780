"""Option groups shared by commands (capture now; replay reuses the engine group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptrace.errors import UsageError

ENGINE = "Engine"
INPUTS = "Inputs"
SAMPLING = "Sampling"
WHAT = "What to capture"

Backend = Annotated[str, typer.Option(
    "--backend", "-b", rich_help_panel=ENGINE,
    help="Engine to run: see `ptrace backends` (torch = PyTorch + HF transformers).")]
Model = Annotated[Path, typer.Option(
    "--model", "-m", rich_help_panel=ENGINE,
    help="Model directory: config.json, *.safetensors and tokenizer files (Hugging Face layout).")]
Dtype = Annotated[str, typer.Option(
    rich_help_panel=ENGINE, help="Compute dtype: float32, float16, bfloat16 or float64 (or fp32, fp16, bf16, fp64).")]
Device = Annotated[str, typer.Option(rich_help_panel=ENGINE, help="cpu, cuda, cuda:1, ...")]
#: Replaced by :func:`engine_option_help` when help is shown (reading every backend's schema
#: costs an import of each backend module, which plain commands need not pay).
ENGINE_OPTION_PARAMETER = "engine_option"
EngineOption = Annotated[list[str] | None, typer.Option(
    "--engine-option", "-E", rich_help_panel=ENGINE, metavar="KEY=VALUE",
    help="Engine option, repeatable: see `ptrace backends` for each engine's keys.")]
KvCacheDtype = Annotated[str | None, typer.Option(
    rich_help_panel=ENGINE, metavar="DTYPE",
    help="KV cache dtype (vLLM: auto, fp8, fp8_e4m3, fp8_e5m2): a common cause of long-sequence "
         "drift. Same as -E kv_cache_dtype=DTYPE.")]
Output = Annotated[Path, typer.Option(
    "--output", "-o", help="Bundle to write: a *.zarr directory, or a *.zarr.zip file.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of text.")]


def engine_option_help() -> str:
    """``-E``'s help, from every backend's declared option schema."""
    from ptrace.backends.registry import loadable

    engines = [f"{name}: " + ", ".join(o.describe().split(":")[0] for o in cls.options)
               for name, cls in loadable().items() if cls.options]
    return ("Engine option, repeatable. " + "; ".join(engines) +
            ". Their meanings: `ptrace backends`.")


def engine_options(items: list[str] | None, kv_cache_dtype: str | None = None) -> dict[str, str]:
    """``-E KEY=VALUE`` items, plus the dedicated engine flags that are shortcuts for them."""
    options = parse_key_values(items)
    if kv_cache_dtype is not None:
        options["kv_cache_dtype"] = kv_cache_dtype
    return options


def parse_key_values(items: list[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--engine-option {item!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


WHATIF = "What-ifs (error injection)"

Inject = Annotated[list[str] | None, typer.Option(
    "--inject", "-i", rich_help_panel=WHATIF, metavar="SPEC",
    help="A what-if, repeatable (each one run on its own): KIND:GLOBS[:KEY=VALUE]..., e.g. "
         "noise:layers.*.k:std=1e-3:positions=0-99 (kinds: noise, ulp, cast, scale, zero, "
         "splice, config, engine; selectors steps=, positions=, layers=, requests=, ranks=, seed=). Join "
         "injections that act together with '+'.")]
InjectFile = Annotated[Path | None, typer.Option(
    rich_help_panel=WHATIF, metavar="FILE",
    help="JSON list of what-ifs; each one a spec map (SPEC.md 3.7) or a list of them applied together.")]
Sweep = Annotated[str | None, typer.Option(
    rich_help_panel=WHATIF, metavar="PARAM=V1,V2,...",
    help="Run every what-if once per value of one numeric parameter (e.g. std=1e-5,1e-4,1e-3,1e-2).")]
Repeats = Annotated[int, typer.Option(
    rich_help_panel=WHATIF, min=1, help="Runs per what-if and sweep value, each with another noise seed.")]
