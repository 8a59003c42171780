"""Where a bundle's bytes live: a ``*.zarr`` directory or the same content in one zip file.

The zip form exists to attach a bundle to a bug report; every reader accepts both, so users
never unpack before reading. Bundles travel between strangers, so both stores are read
defensively (SPEC.md section 8): a directory store never follows a symbolic link nor reads
anything but regular files under its root, and a zip is refused unless every member is stored
uncompressed, once, with sizes that agree with the bytes actually in the archive, so that no
read and no ``unpack`` ever produces more bytes than the file holds.
"""

from __future__ import annotations

import abc
import bisect
import os
import shutil
import stat
import struct
import threading
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from ptrace.errors import (
    BundleCorruptError,
    BundleError,
    BundleExistsError,
    BundleNotFoundError,
    NotABundleError,
)

_LINK_HINT = "ptrace never follows links inside a bundle: replace the link by a copy of its target, or remove it"
ZIP_HINT = "make the zip with `ptrace pack` (members stored, each once)"


class BundleStore(abc.ABC):
    """A bundle's stored bytes: what is stored, and one key's bytes at a time, bounded.

    Every read of a bundle goes through this, Zarr's included (an array with codecs of another
    writer, :mod:`~ptrace.bundle_spec.zarr_fallback`), so the checks apply to every byte read.
    """

    @abc.abstractmethod
    def stored_keys(self) -> list[str]:
        """Every stored key, sorted."""

    def is_stored(self, key: str) -> bool:
        keys = self.stored_keys()
        at = bisect.bisect_left(keys, key)
        return at < len(keys) and keys[at] == key

    def count_stored(self, prefix: str) -> int:
        """How many stored keys start with ``prefix``."""
        keys = self.stored_keys()
        return bisect.bisect_left(keys, prefix + "\U0010ffff") - bisect.bisect_left(keys, prefix)

    @abc.abstractmethod
    def read_stored(self, key: str, buffer: np.ndarray) -> np.ndarray | None:
        """The bytes stored under ``key``, read in one call into the start of ``buffer`` (uint8)
        and returned as a view of it, or None if nothing is stored there. More bytes than
        ``buffer`` holds are refused before reading."""

    def close(self) -> None:  # noqa: B027 (a hook: a directory store holds nothing open)
        """Release what reading holds open."""

    def _too_large(self, location: object, key: str, size: int, limit: int) -> BundleCorruptError:
        return BundleCorruptError(f"{location}: {key} stores {size} bytes, more than a reader accepts there "
                                  f"({limit})", hint="run `ptrace validate` on it for a full check")


class DirectoryStore(BundleStore):
    """A bundle directory, read only from regular files under its root, through no link.

    Every key is resolved one path component at a time with ``lstat``: a symbolic link anywhere
    on the way (pointing anywhere, even inside the bundle) or a file that is not a regular file
    (a FIFO would block forever) is refused, so no byte from outside the bundle is ever read.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self._keys: list[str] | None = None
        #: Directories under the root already found to be directories, not links: a chunk read
        #: checks its own file, not every directory on its way again (compare reads thousands).
        self._directories: set[str] = {self._root}

    def _refuse(self, path: str, mode: int) -> BundleCorruptError:
        name = os.path.relpath(path, self._root).replace(os.sep, "/")
        if stat.S_ISLNK(mode):
            return BundleCorruptError(f"{self.root}: {name} is a symbolic link", hint=_LINK_HINT)
        return BundleCorruptError(f"{self.root}: {name} is not a regular file",
                                  hint="a bundle holds only directories and regular files: remove it")

    def lookup(self, key: str) -> tuple[str, int] | None:
        """The path of ``key`` and its ``lstat`` mode, or None when nothing is there."""
        parts = [part for part in key.split("/") if part]
        if any(part in (".", "..") or "\0" in part for part in parts):
            raise BundleCorruptError(f"{self.root}: invalid key {key!r}")
        path, mode = self._root, os.lstat(self._root).st_mode
        for depth, part in enumerate(parts, 1):
            path = f"{path}/{part}"
            if depth < len(parts) and path in self._directories:
                continue
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(mode):
                raise self._refuse(path, mode)
            if depth < len(parts):
                if not stat.S_ISDIR(mode):
                    return None
                self._directories.add(path)
        return path, mode

    def file(self, key: str) -> str | None:
        """The regular file holding ``key``, or None when nothing is stored there."""
        found = self.lookup(key)
        if found is None or stat.S_ISDIR(found[1]):
            return None
        if not stat.S_ISREG(found[1]):
            raise self._refuse(*found)
        return found[0]

    def stored_keys(self) -> list[str]:
        """Every regular file of the bundle, from one walk that follows no link (and refuses one)."""
        if self._keys is None:
            keys: list[str] = []
            pending = [(self._root, "")]
            while pending:
                directory, prefix = pending.pop()
                with os.scandir(directory) as entries:
                    for entry in entries:  # the entry's type, from the directory listing: no link followed
                        if entry.is_symlink():
                            raise self._refuse(entry.path, stat.S_IFLNK)
                        if entry.is_dir(follow_symlinks=False):
                            pending.append((entry.path, f"{prefix}{entry.name}/"))
                        elif entry.is_file(follow_symlinks=False):
                            keys.append(prefix + entry.name)
                        else:
                            raise self._refuse(entry.path, entry.stat(follow_symlinks=False).st_mode)
            self._keys = sorted(keys)
        return self._keys

    def read_stored(self, key: str, buffer: np.ndarray) -> np.ndarray | None:
        path = self.file(key)
        if path is None:
            return None
        # No link and no blocking open, even if the file was swapped since it was looked up.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb", buffering=0) as file:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise self._refuse(path, status.st_mode)
            if status.st_size > buffer.nbytes:
                raise self._too_large(self.root, key, status.st_size, buffer.nbytes)
            size = file.readinto(memoryview(buffer)[:status.st_size])
        return buffer[:size]


class ArchiveStore(BundleStore):
    """A zipped bundle whose members were checked by :func:`check_archive`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._keys: list[str] | None = None
        self._archive: zipfile.ZipFile | None = None
        self._lock = threading.Lock()  # one member read at a time: the zip shares one file handle

    def stored_keys(self) -> list[str]:
        if self._keys is None:
            with zipfile.ZipFile(self.path) as archive:
                self._keys = sorted(archive.namelist())
        return self._keys

    def read_stored(self, key: str, buffer: np.ndarray) -> np.ndarray | None:
        with self._lock:
            if self._archive is None:
                self._archive = zipfile.ZipFile(self.path)
            try:
                member = self._archive.getinfo(key)
            except KeyError:
                return None
            if member.file_size > buffer.nbytes:
                raise self._too_large(self.path, key, member.file_size, buffer.nbytes)
            try:
                with self._archive.open(member) as file:
                    size = file.readinto(memoryview(buffer)[:member.file_size])
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, NotImplementedError) as exc:
                raise member_unreadable(self.path, key, exc) from None
        return buffer[:size]

    def close(self) -> None:
        with self._lock:
            if self._archive is not None:
                self._archive.close()
                self._archive = None


def member_unreadable(path: Path, key: str, exc: BaseException) -> BundleCorruptError:
    return BundleCorruptError(f"{path}: zip member {key} cannot be read ({exc})", hint=ZIP_HINT)


def open_read_store(path: str | os.PathLike[str]) -> DirectoryStore | ArchiveStore:
    """A bundle directory or zip file, read-only and checked as described above."""
    path = Path(path)
    if path.is_dir():
        return DirectoryStore(path.resolve())
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise NotABundleError(f"{path} is a file but not a zip: not a ptrace bundle",
                                  hint="bundles are *.zarr directories or *.zarr.zip files")
        check_archive(path)
        return ArchiveStore(path)
    raise BundleNotFoundError(f"no bundle at {path}")


#: A zip local file header (APPNOTE 4.3.7): signature, version, flags, method, time, date, crc,
#: compressed size, uncompressed size, name length, extra length.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_ZIP64_SIZE = 0xFFFFFFFF
_DATA_DESCRIPTOR_FLAG = 0x08
_ENCRYPTED_FLAG = 0x01


def check_archive(path: Path) -> None:
    """Refuse a zip whose members a reader or ``unpack`` could be fooled by.

    Members must be stored (not compressed: a deflated member can inflate far beyond the
    archive), unencrypted, regular files with a relative path inside the bundle, present once
    (other zip tools may read the other copy), and their sizes in the central directory and in
    their local header must agree with each other and fit in the file: so the stored bytes of all
    members together never exceed the archive's size.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
            members = archive.infolist()
            seen: set[str] = set()
            total = 0
            for member in members:
                problem = _member_problem(member, raw, size, seen)
                if problem:
                    raise BundleCorruptError(f"{path}: zip member {member.filename!r} {problem}", hint=ZIP_HINT)
                seen.add(member.filename)
                total += member.compress_size
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, ValueError,
            NotImplementedError) as exc:  # NotImplementedError: a zip version Python's zipfile does not read
        if isinstance(exc, BundleError):
            raise
        raise BundleCorruptError(f"{path} is not a readable zip ({exc})", hint=ZIP_HINT) from None
    if total > size:
        raise BundleCorruptError(f"{path}: its members declare {total} bytes but the archive holds {size} "
                                 "(overlapping members)", hint=ZIP_HINT)


def _member_problem(member: zipfile.ZipInfo, raw, size: int, seen: set[str]) -> str | None:
    name = PurePosixPath(member.filename)
    if member.filename in seen:
        return "appears twice"
    if name.is_absolute() or ".." in name.parts or "\\" in member.filename:
        return "escapes the bundle"
    if member.compress_type != zipfile.ZIP_STORED:
        return f"is compressed (zip method {member.compress_type}); bundle members are stored"
    if member.flag_bits & _ENCRYPTED_FLAG:
        return "is encrypted"
    if stat.S_ISLNK(member.external_attr >> 16):
        return "is a symbolic link"
    if member.file_size != member.compress_size:
        return f"declares {member.file_size} bytes but stores {member.compress_size}"
    raw.seek(member.header_offset)
    header = raw.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        return "has a truncated local header"
    signature, _, flags, method, _, _, _, stored, plain, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        return "has no local header where the directory says"
    if method != member.compress_type:
        return "has a local header that disagrees with the directory (method)"
    if not flags & _DATA_DESCRIPTOR_FLAG and _ZIP64_SIZE not in (stored, plain) and \
            (stored, plain) != (member.compress_size, member.file_size):
        return "has a local header that disagrees with the directory (sizes)"
    encoding = "utf-8" if member.flag_bits & 0x800 else "cp437"
    if raw.read(name_len) != member.orig_filename.encode(encoding):
        return "has a local header that disagrees with the directory (name)"
    end = member.header_offset + _LOCAL_HEADER.size + name_len + extra_len + member.compress_size
    if end > size:
        return f"declares {member.compress_size} bytes past the end of the archive"
    return None


def claim_output(path: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing path unless asked to."""
    if path.exists() and not overwrite:
        raise BundleExistsError(f"{path} already exists", hint="pass --overwrite to replace it")


def replace_path(staged: Path, final: Path) -> None:
    """Move a finished staging path over ``final``: the last, atomic step of every write."""
    if final.exists() or final.is_symlink():
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.replace(staged, final)
