"""Atomic file replacement: a reader sees the old file or the new one, never half of one.

The new content is written to a hidden file in the target's folder (same file system, so
the rename is atomic), flushed to disk, renamed over the target with ``os.replace``, and
the folder is flushed so the rename itself survives a power cut. On any error the hidden
file is removed and the target is untouched.

The temporary name keeps the target's suffix, so writers that choose a format by file
name (Pillow, ``numpy.save``, pydicom) write the right one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, durable: bool = True, mode: int | None = None
) -> Iterator[Path]:
    """A temporary path to write; on leaving the block it replaces ``path``.

    ``durable``: fsync the file and its folder (a crash cannot leave an empty file behind
    the new name); off only for caches that can be rebuilt. ``mode``: permissions to give
    the file before it appears under its name (default: as created, i.e. the umask's).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(target.parent)


def write_atomic(
    path: str | Path, data: bytes | str, *, durable: bool = True, mode: int | None = None
) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) atomically."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, durable=durable, mode=mode) as tmp:
        tmp.write_bytes(raw)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
