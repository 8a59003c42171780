"""``ptrace pack`` / ``ptrace unpack``: one zip file to attach to a bug report, and back."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptrace.cli import options as opt
from ptrace.cli.console import console


def pack(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory (*.zarr).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Zip to write, *.zarr.zip (default: BUNDLE.zip).")] = None,
    overwrite: opt.Overwrite = False,
) -> None:
    """Pack a bundle directory into one zip file. Every ptrace command reads the zip directly."""
    from ptrace.bundle_spec import pack as pack_bundle
    from ptrace.bundle_spec.store import ZIP_SUFFIX, check_bundle_name

    if output is not None:
        check_bundle_name(output, (ZIP_SUFFIX,))
    target = pack_bundle(bundle, output or bundle.with_name(bundle.name + ".zip"), overwrite=overwrite)
    console.success(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")


def unpack(
    archive: Annotated[Path, typer.Argument(metavar="ARCHIVE", help="Zipped bundle (*.zarr.zip).")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Directory to write, *.zarr (default: without .zip).")] = None,
    overwrite: opt.Overwrite = False,
) -> None:
    """Unpack a zipped bundle into a *.zarr directory."""
    from ptrace.bundle_spec import unpack as unpack_bundle
    from ptrace.bundle_spec.store import DIRECTORY_SUFFIX, check_bundle_name

    if output is not None:
        check_bundle_name(output, (DIRECTORY_SUFFIX,))
    default = archive.with_suffix("") if archive.suffix == ".zip" else archive.with_name(archive.name + ".zarr")
    target = unpack_bundle(archive, output or default, overwrite=overwrite)
    console.success(f"wrote {target}")
