"""``ptrace validate``: structure, spec version and every checksum of a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import options as opt
from ptrace.cli.console import console


def validate(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle: *.zarr directory or *.zarr.zip file.")],
    as_json: opt.Json = False,
) -> None:
    """Check a bundle completely (reads every chunk); exit 1 if anything is wrong."""
    from ptrace.bundle_spec import validate_bundle

    problems = validate_bundle(bundle)
    if as_json:
        console.json({"path": str(bundle), "valid": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            console.error(f"{bundle}: {problem}")
    else:
        console.success(f"{bundle}: valid ptrace bundle")
    if problems:
        raise typer.Exit(1)
