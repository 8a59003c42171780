"""``ptrace envs``: the engines' own Python environments (list them, create one)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from ptrace.cli import options as opt
from ptrace.cli.console import console

envs = typer.Typer(help="Engine environments: each engine in its own Python environment, because "
                        "their pins exclude each other (MindSpore: numpy<2; vLLM: numpy 2, transformers 5).",
                   no_args_is_help=True)


@envs.command("list")
def list_environments(as_json: opt.Json = False) -> None:
    """Where each engine environment is, and whether it exists."""
    from ptrace.backends import environments

    rows = [{"name": name, "path": str(environments.location(name)),
             "python": str(p) if (p := environments.python_of(name)) else None,
             "variable": spec.variable, "note": spec.note} for name, spec in environments.ENVIRONMENTS.items()]
    if as_json:
        console.json(rows)
        return
    table = console.table("environment", "status", "path", "what")
    for row in rows:
        status = Text("ready", "green") if row["python"] else Text(f"missing: ptrace envs create {row['name']}", "yellow")
        table.add_row(row["name"], status, row["path"], row["note"])
    console.print(table)


@envs.command("create")
def create_environment(
    name: Annotated[str, typer.Argument(help="vllm, ms or vllm-ms (see `ptrace envs list`).")],
    python: Annotated[str | None, typer.Option(help="Python interpreter for the new environment.")] = None,
    requirement: Annotated[list[str] | None, typer.Option(
        "--requirement", "-r", metavar="SPEC",
        help="Install these instead of the default pins, repeatable (e.g. vllm==0.11.0 for CUDA).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show pip's output.")] = False,
) -> None:
    """Create (or update) an engine environment with its engine and ptrace installed: minutes, GBs.

    Example: ptrace envs create vllm   then   ptrace capture --backend vllm ... from anywhere.
    """
    import sys

    from ptrace.backends import environments

    spec = environments.environment(name)
    console.print(f"creating {name} in {environments.location(name)}: {' '.join(requirement or spec.requirements)}")
    created = environments.create(name, python=python or sys.executable,
                                  requirements=tuple(requirement or ()), quiet=not verbose)
    console.success(f"ready: {created}")
