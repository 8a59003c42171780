"""Where a bundle's bytes live: a ``*.zarr`` directory or the same content in one zip file.

The zip form exists to attach a bundle to a bug report; every reader accepts both, so users
never unpack before reading.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from zarr.abc.store import Store
from zarr.storage import LocalStore, ZipStore

from ptrace.errors import BundleError, BundleExistsError, BundleNotFoundError, NotABundleError


def open_read_store(path: str | os.PathLike[str]) -> Store:
    """A read-only Zarr store over a bundle directory or zip file."""
    path = Path(path)
    if path.is_dir():
        return LocalStore(path, read_only=True)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise NotABundleError(f"{path} is a file but not a zip: not a ptrace bundle",
                                  hint="bundles are *.zarr directories or *.zarr.zip files")
        return ZipStore(path, mode="r")
    raise BundleNotFoundError(f"no bundle at {path}")


def claim_output(path: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing path unless asked to."""
    if path.exists() and not overwrite:
        raise BundleExistsError(f"{path} already exists", hint="pass --overwrite to replace it")


def replace_path(staged: Path, final: Path) -> None:
    """Move a finished staging path over ``final``: the last, atomic step of every write."""
    if final.exists():
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.replace(staged, final)


def pack(bundle_dir: Path, zip_path: Path, *, overwrite: bool = False) -> Path:
    """Write a bundle directory as one zip (members stored, not deflated: chunks are compressed)."""
    from ptrace.bundle_spec.reader import open_bundle

    claim_output(zip_path, overwrite)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory")
    open_bundle(bundle_dir).close()  # refuse to pack something that does not read as complete
    staged = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(staged, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for file in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(bundle_dir).as_posix())
    replace_path(staged, zip_path)
    return zip_path


def unpack(zip_path: Path, bundle_dir: Path, *, overwrite: bool = False) -> Path:
    """Extract a zipped bundle into a directory, refusing members that would escape it."""
    from ptrace.bundle_spec.reader import open_bundle

    claim_output(bundle_dir, overwrite)
    open_bundle(zip_path).close()
    staged = bundle_dir.with_name(bundle_dir.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            name = PurePosixPath(member.filename)
            if name.is_absolute() or ".." in name.parts:
                raise NotABundleError(f"{zip_path}: member {member.filename!r} escapes the bundle")
        archive.extractall(staged)
    replace_path(staged, bundle_dir)
    return bundle_dir
