"""Help as plain text that reads at any width: click's layout (an option's names and value on
the left, its help wrapped beside or below it; nothing cut off, flags without a placeholder),
with the options grouped under their ``rich_help_panel`` headings and the commands under theirs.

Typer's Rich panels squeeze seven columns into the terminal: at 80 columns they cut option
names, default values and examples short. Examples in docstrings stay as written when their
paragraph starts with ``\\b`` (click's mark for "do not rewrap").
"""

from __future__ import annotations

from typing import Any

import typer.core


def _panels(items: list[tuple[str | None, Any]], first: str) -> dict[str, list[Any]]:
    """Items grouped by panel, in order of first appearance; those of no panel first, under ``first``."""
    panels: dict[str, list[Any]] = {first: []}
    for panel, item in items:
        panels.setdefault(panel or first, []).append(item)
    return {name: rows for name, rows in panels.items() if rows}


class PanelCommand(typer.core.TyperCommand):
    """A command whose help lists its arguments, then its options grouped by panel."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                options.append((getattr(param, "rich_help_panel", None), record))
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        for panel, records in _panels(options, "Options").items():
            with formatter.section(panel):
                formatter.write_dl(records)


class PanelGroup(typer.core.TyperGroup):
    """A command group whose help lists its commands grouped by panel."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        commands = [(name, command) for name, command in commands if command is not None and not command.hidden]
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        rows = [(getattr(command, "rich_help_panel", None), (name, command.get_short_help_str(limit)))
                for name, command in commands]
        for panel, records in _panels(rows, "Commands").items():
            with formatter.section(panel):
                formatter.write_dl(records)
