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
    rich_help_panel=ENGINE, help="Compute dtype: float32, float16, bfloat16 or float64.")]
Device = Annotated[str, typer.Option(rich_help_panel=ENGINE, help="cpu, cuda, cuda:1, ...")]
EngineOption = Annotated[list[str] | None, typer.Option(
    "--engine-option", "-E", rich_help_panel=ENGINE, metavar="KEY=VALUE",
    help="Engine-specific option, repeatable (torch: attn_implementation=eager|sdpa).")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Bundle to write (a *.zarr directory).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of text.")]


def parse_key_values(items: list[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--engine-option {item!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return options
