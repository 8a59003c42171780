"""``ptrace backends``: which engines exist, what each can do, and where each runs (no engine
is imported: only the backends' declarations are read)."""

from __future__ import annotations

from rich.text import Text

from ptrace.cli import options as opt
from ptrace.cli.console import console


def backends(as_json: opt.Json = False) -> None:
    """List the engines ptrace knows: whether each can run and where (here or its engine
    environment), its capabilities and its --engine-option keys."""
    from ptrace.backends.registry import engine_python, entries
    from ptrace.errors import BackendUnavailableError

    rows = []
    for name, entry in entries().items():
        row = {"name": name, "available": False, "runs_in": None, "reason": None, "description": "",
               "environment": None, "capabilities": None, "options": []}
        try:
            cls = entry.load()
            row.update(description=cls.description, capabilities=cls.capabilities.to_dict(),
                       options=[o.to_dict() for o in cls.options],
                       environment=cls.environment.name if cls.environment else None)
            python = engine_python(name)
            row.update(available=True, runs_in="this environment" if python is None else str(python))
        except BackendUnavailableError as exc:
            row["reason"] = str(exc)
        rows.append(row)
    if as_json:
        console.json(rows)
        return
    table = console.table("backend", "status", "description", "can", "engine options")
    for row in rows:
        status = Text(f"ready ({row['runs_in']})", "green") if row["available"] else Text(row["reason"], "yellow")
        caps = row["capabilities"] or {}
        can = ", ".join([*(["tensors"] if caps.get("tensors") else ["tokens only"]),
                         *(["what-ifs"] if caps.get("replace") else []),
                         *(["batches"] if caps.get("batched") else []),
                         "/".join(caps.get("devices", [])), "/".join(caps.get("dtypes", []))])
        options = "\n".join(f"{o['name']} ({o['type']}): {o['help']}" for o in row["options"])
        table.add_row(Text(row["name"], style="bold"), status, Text(row["description"]), Text(can), Text(options or "-"))
    console.print(table)

