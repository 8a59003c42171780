"""``pack`` and ``unpack``: a bundle directory to one zip file and back, each checked by opening it.

They sit above the reader (:func:`~ptrace.bundle_spec.structure.open_bundle`): what is packed
must read as a complete bundle, and what is unpacked is the content of an archive that the
checks of :mod:`~ptrace.bundle_spec.store` accepted.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from ptrace.bundle_spec.store import (
    ZIP_HINT,
    DirectoryStore,
    claim_output,
    replace_path,
)
from ptrace.bundle_spec.structure import open_bundle
from ptrace.errors import BundleCorruptError, BundleError


def pack(bundle_dir: Path, zip_path: Path, *, overwrite: bool = False) -> Path:
    """Write a bundle directory as one zip (members stored, not deflated: chunks are compressed).

    A symbolic link or special file anywhere in the directory is refused, never followed: a
    zip made for a bug report must not carry a file the link points to.
    """
    claim_output(zip_path, overwrite)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory")
    open_bundle(bundle_dir).close()  # refuse to pack something that does not read as complete
    files = DirectoryStore(bundle_dir.resolve()).stored_keys()  # refuses links and special files
    staged = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(staged, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key in files:
            archive.write(bundle_dir / key, key)
    replace_path(staged, zip_path)
    return zip_path


def unpack(zip_path: Path, bundle_dir: Path, *, overwrite: bool = False) -> Path:
    """Extract a zipped bundle into a directory.

    ``open_bundle`` checks the archive first (:func:`~ptrace.bundle_spec.store.check_archive`), so what is written is at
    most the archive's own size and stays inside ``bundle_dir``.
    """
    claim_output(bundle_dir, overwrite)
    open_bundle(zip_path).close()
    staged = bundle_dir.with_name(bundle_dir.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staged)
    except (zipfile.BadZipFile, EOFError) as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise BundleCorruptError(f"{zip_path}: cannot extract ({exc})", hint=ZIP_HINT) from None
    replace_path(staged, bundle_dir)
    return bundle_dir
