"""``ptrace settings``: the arithmetic settings a bundle's engine used, or where two bundles'
differ, before any replay (no engine is started: it reads ``meta/settings``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import options as opt
from ptrace.cli.console import console

_BUNDLE_HELP = "Bundle: *.zarr directory or *.zarr.zip file."


def settings(
    bundle: Annotated[Path, typer.Argument(help=_BUNDLE_HELP)],
    other: Annotated[Path | None, typer.Argument(help="A second bundle: show where the two differ.")] = None,
    as_json: opt.Json = False,
    fail_on_diff: Annotated[bool, typer.Option(
        "--fail-on-diff", help="Exit 1 when an arithmetic setting differs between the two bundles.")] = False,
) -> None:
    """Show the arithmetic settings a run used (norm epsilon, rope, activation, dtypes of each
    part, KV cache, attention backend, ...) and, given two bundles, the ones that differ and
    the tensor where each first acts: a pre-flight check before a long replay."""
    from ptrace.bundle_spec import open_bundle
    from ptrace.bundle_spec.settings import SETTINGS, settings_diff, show
    from ptrace.compare.settings import recorded
    from ptrace.errors import UsageError

    if fail_on_diff and other is None:
        raise UsageError("--fail-on-diff needs two bundles to compare")
    with open_bundle(bundle) as opened:
        first = recorded(opened)
    if other is None:
        if as_json:
            console.json(first)
            return
        table = console.table("setting", "group", "value", "acts at",
                              title=f"{bundle} (values {first['source']})", title_justify="left")
        for key, value in first["values"].items():
            setting = SETTINGS[key]
            where = ", ".join(setting.acts_at) or "after every tensor"
            table.add_row(key, setting.group, show(value),
                          where + (f" from position {setting.from_position}" if setting.from_position else ""))
        console.print(table)
        return
    with open_bundle(other) as opened:
        second = recorded(opened)
    differences = settings_diff(first["values"], second["values"])
    if as_json:
        console.json({"settings_diff": [d.to_dict() for d in differences], "a": first, "b": second})
    else:
        table = console.table("setting", "group", "A", "B", "acts at",
                              title=f"A {bundle} (values {first['source']}) vs B {other} "
                                    f"(values {second['source']})", title_justify="left")
        differing = {d.key: d for d in differences}
        for key, setting in SETTINGS.items():
            a, b = show(first["values"][key]), show(second["values"][key])
            where = differing[key].where if key in differing else ""
            table.add_row(key, setting.group, a, b, where, style="bold yellow" if key in differing else None)
        console.print(table)
        verb = f"{len(differences)} arithmetic setting(s) differ" if differences else "no arithmetic setting differs"
        console.print(verb)
    if fail_on_diff and differences:
        raise typer.Exit(1)
