"""``ptrace backends``: which engines exist, and which can run here (no engine is imported)."""

from __future__ import annotations

from rich.text import Text

from ptrace.cli import options as opt
from ptrace.cli.console import console


def backends(as_json: opt.Json = False) -> None:
    """List the engines ptrace knows, whether each can run, and where (here or its engine environment)."""
    from ptrace.backends.registry import engine_python, entries
    from ptrace.errors import BackendUnavailableError

    rows = []
    for name, entry in entries().items():
        description, runs_in, reason = "", None, None
        try:
            description = entry.load().description
            python = engine_python(name)
            runs_in = "this environment" if python is None else str(python)
        except BackendUnavailableError as exc:
            reason = str(exc)
        rows.append({"name": name, "available": reason is None, "runs_in": runs_in, "reason": reason,
                     "description": description})
    if as_json:
        console.json(rows)
        return
    table = console.table("backend", "status", "description")
    for row in rows:
        status = Text(f"ready ({row['runs_in']})", "green") if row["available"] else Text(row["reason"], "yellow")
        table.add_row(row["name"], status, row["description"])
    console.print(table)
