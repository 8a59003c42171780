"""``ptrace envs``: the engines' own Python environments (list them, create them)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from ptrace.cli import options as opt
from ptrace.cli.console import console
from ptrace.cli.help import PanelCommand, PanelGroup

envs = typer.Typer(help="Engine environments: each engine in its own Python environment, because "
                        "their pins exclude each other (MindSpore: numpy<2; vLLM: numpy 2, transformers 5).",
                   no_args_is_help=True, cls=PanelGroup, rich_markup_mode=None)


@envs.command("list", cls=PanelCommand)
def list_environments(
    as_json: opt.Json = False,
    pythons: Annotated[bool, typer.Option(
        "--pythons", help="Print only 'NAME PYTHON' of each environment that exists (for scripts).")] = False,
) -> None:
    """Where each engine environment is, and whether it exists."""
    from ptrace.backends import environments
    from ptrace.backends.registry import engine_environments

    rows = [{**spec.to_dict(), "path": str(environments.location(name)),
             "python": str(p) if (p := environments.python_of(name)) else None}
            for name, spec in engine_environments().items()]
    if pythons:
        for row in rows:
            if row["python"]:
                console.print(Text(f"{row['name']} {row['python']}"))
        return
    if as_json:
        console.json(rows)
        return
    table = console.table("environment", "status", "path", "what")
    for row in rows:
        status = Text("ready", "green") if row["python"] else Text(f"missing: ptrace envs create {row['name']}", "yellow")
        table.add_row(row["name"], status, row["path"], row["note"])
    console.print(table)


@envs.command("create", cls=PanelCommand)
def create_environment(
    names: Annotated[list[str] | None, typer.Argument(
        metavar="NAME", help="Environments to create (see `ptrace envs list`).")] = None,
    every: Annotated[bool, typer.Option(
        "--all", help="Every environment this machine can use (those of NPU-only engines only on request).")] = False,
    python: Annotated[str | None, typer.Option(help="Python interpreter for the new environment.")] = None,
    requirement: Annotated[list[str] | None, typer.Option(
        "--requirement", "-r", metavar="SPEC",
        help="Install these instead of the default pins, repeatable (e.g. vllm==0.11.0 for CUDA).")] = None,
    also: Annotated[list[str] | None, typer.Option(
        "--with", metavar="SPEC", help="Install these too, repeatable (e.g. pytest).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show pip's output.")] = False,
) -> None:
    """Create (or update) engine environments with their engine and ptrace installed: minutes, GBs.

    Example: ptrace envs create vllm   then   ptrace capture --backend vllm ... from anywhere.
    """
    import sys

    from ptrace.backends import environments
    from ptrace.backends.registry import engine_environment, engine_environments
    from ptrace.errors import UsageError

    if every == bool(names):
        raise UsageError("name the environments to create, or pass --all", hint="see `ptrace envs list`")
    specs = ([s for s in engine_environments().values() if s.default] if every
             else [engine_environment(name) for name in names or ()])
    for spec in specs:
        console.print(f"creating {spec.name} in {environments.location(spec.name)}: "
                      f"{' '.join(requirement or spec.requirements)}")
        created = environments.create(spec, python=python or sys.executable, requirements=tuple(requirement or ()),
                                      also=tuple(also or ()), quiet=not verbose)
        console.success(f"ready: {created}")
