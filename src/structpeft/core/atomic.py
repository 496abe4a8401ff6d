"""All-or-nothing writes of a set of files into a folder, surviving a crash (SIGKILL, power loss) at any moment.

Protocol, for files written together into ``directory``:

1. ``recover(directory)``: finish or clear what an earlier, interrupted write left (below).
2. The files are written into a staging folder inside ``directory`` (same file system, so renames are
   atomic), each fsynced, then the folder itself.
3. The staging folder is renamed to the commit folder ``.structpeft-commit`` and ``directory`` is
   fsynced. This rename is the commit point: before it, the old files are all in place and the
   staging folder is garbage; after it, the new files are complete and durable.
4. Each committed file is renamed over its namesake in ``directory``; then the empty commit folder
   is removed.

A crash before 3 leaves the old set (and a staging folder the next write deletes). A crash after 3
leaves a commit folder: :func:`committed_path` reads each file from it while it holds that file, so
a reader sees the new set without writing anything, and the next :func:`recover` completes the move.
Files absent from the new set are left as they are. Two processes writing into one folder at once
are not supported.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

STAGING_PREFIX = ".structpeft-staging-"
COMMIT_NAME = ".structpeft-commit"


def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk. Folders cannot be opened on Windows: skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; nothing more can be done there
        pass
    finally:
        os.close(fd)


def _files_under(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _roll_forward(directory: Path) -> None:
    commit = directory / COMMIT_NAME
    for relative in _files_under(commit):
        destination = directory / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(commit / relative, destination)
    _fsync_path(directory)
    shutil.rmtree(commit)  # only empty folders are left in it
    _fsync_path(directory)


def recover(directory: str | os.PathLike) -> None:
    """Complete a committed write that a crash interrupted, and delete abandoned staging folders."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    if (directory / COMMIT_NAME).is_dir():
        _roll_forward(directory)
    for leftover in directory.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


def committed_path(directory: str | os.PathLike, name: str) -> Path:
    """Where the newest complete version of ``directory/name`` is, without writing anything."""
    directory = Path(directory)
    pending = directory / COMMIT_NAME / name
    return pending if pending.is_file() else directory / name


def atomic_write_file(path: str | os.PathLike, data: bytes) -> None:
    """Replace one file with ``data`` all or nothing (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; what is written there replaces ``path`` when the block ends:
    fsynced, renamed over it, and the folder fsynced. A crash leaves the old file or the new one; the
    temporary file is removed on an error (a crash can leave one, named ``.<name>.*.tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


@contextlib.contextmanager
def atomic_write_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder; the files written into it replace their namesakes in ``directory``
    all together when the block ends, or none of them does (on an exception, or a crash at any
    point). Creates ``directory`` if needed.

    >>> with atomic_write_dir("checkpoint") as staging:
    ...     (staging / "weights.bin").write_bytes(data)
    ...     (staging / "config.json").write_text(text)
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save into {directory}: it exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    staging = directory / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        yield staging
        for relative in _files_under(staging):
            _fsync_path(staging / relative)
        for folder in sorted({(staging / r).parent for r in _files_under(staging)} | {staging}, reverse=True):
            _fsync_path(folder)
        os.rename(staging, directory / COMMIT_NAME)
        _fsync_path(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _roll_forward(directory)
