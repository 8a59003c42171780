"""``ptrace backends``: which engines exist, and which can run here (no engine is imported)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ptrace.cli import options as opt
from ptrace.cli.console import console


def backends(as_json: opt.Json = False) -> None:
    """List the engines ptrace knows and whether each can run in this environment."""
    from ptrace.backends.registry import entries
    from ptrace.errors import BackendUnavailableError

    rows = []
    for name, entry in entries().items():
        try:
            cls = entry.load()
            reason, description, hint = cls.probe(), cls.description, cls.install_hint
        except BackendUnavailableError as exc:
            reason, description, hint = str(exc), "", ""
        rows.append({"name": name, "available": reason is None, "reason": reason,
                     "description": description, "install": hint if reason else None})
    if as_json:
        console.json(rows)
        return
    table = Table("backend", "status", "description")
    for row in rows:
        status = Text("ready", "green") if row["available"] else Text(f"{row['reason']}; {row['install']}", "yellow")
        table.add_row(row["name"], status, row["description"])
    console.print(table)
