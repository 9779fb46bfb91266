"""Where a C-STORE dataset is written while it arrives: the spool's incoming folder.

pynetdicom 3 receives in chunks into ``NamedTemporaryFile(delete=False, suffix=".dcm")``
called from ``pynetdicom.dimse_messages`` and offers no setting for the folder. Setting
``tempfile.tempdir`` would send every library's temporary files into the spool (which
start-up empties), so only the name ``NamedTemporaryFile`` inside that one module (used
there for nothing else) is pointed at :meth:`Receiver.open`. The file stays on the
spool's filesystem, so committing an instance is a link, not a copy.

A :class:`ReceiveFile` never raises from ``write``: an exception there would kill the
association's network thread, the peer would see a TCP error and the partial file would
stay. Instead a full disk, an I/O error, free space below ``min_free_mb`` or a dataset
above ``max_instance_mb`` turns it into a sink: what was written is deleted at once, the
rest of the dataset is read and dropped, and the C-STORE handler answers 0xA700.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages as _dimse_messages

from triaged.dicom.spool import MB, Spool

log = logging.getLogger("triaged.scp")

#: Free space is looked at again after this many bytes of one dataset.
SPACE_CHECK_BYTES = 4 * MB
_PREFIX = "rx-"


class ReceiveFile:
    """The file object pynetdicom writes one incoming dataset to (name, write, file.flush)."""

    def __init__(self, spool: Spool, max_bytes: int) -> None:
        self._spool = spool
        self._max_bytes = max_bytes
        fd, name = tempfile.mkstemp(dir=spool.incoming, prefix=_PREFIX, suffix=".dcm")
        self._fd: int | None = fd
        self.name = name
        self.file = self  # pynetdicom calls ``.file.flush()`` after each fragment
        self.failure: str | None = None
        self.written = 0
        self._next_check = 0
        self.receiver_thread = weakref.ref(threading.current_thread())
        self._guard(0)

    def _guard(self, incoming: int) -> None:
        """Refuse before writing when the dataset is too big or the spool too full."""
        if self._max_bytes and self.written + incoming > self._max_bytes:
            self._refuse(f"too large: dataset above {self._max_bytes // MB} MB")
        elif self.written >= self._next_check:
            self._next_check = self.written + SPACE_CHECK_BYTES
            if not self._spool.has_space():
                self._refuse(
                    f"out of space: free space below {self._spool.min_free_bytes // MB} MB"
                )

    def _refuse(self, why: str) -> None:
        """Become a sink: free the disk now, remember why for the C-STORE handler."""
        if self.failure is None:
            self.failure = why
        self._close_fd()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def write(self, data: bytes) -> int:
        if self.failure is None:
            self._guard(len(data))
        if self._fd is None:
            return len(data)  # refused: read off the wire and dropped
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            self._refuse("out of space: spool device full" if full else f"I/O error: {err}")
            return len(data)
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        """Unbuffered: every ``write`` already reached the kernel."""

    def close(self) -> None:
        self._close_fd()


class Receiver:
    """Creates the receive files, tells the handler why one failed, sweeps orphans."""

    def __init__(self, spool: Spool, max_bytes: int) -> None:
        self.spool = spool
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._open: weakref.WeakValueDictionary[str, ReceiveFile] = weakref.WeakValueDictionary()

    def open(self, *_args: Any, **_kwargs: Any) -> ReceiveFile:
        """Stands in for ``NamedTemporaryFile`` (pynetdicom passes mode/suffix/delete)."""
        with self._lock:
            f = ReceiveFile(self.spool, self.max_bytes)
            self._open[f.name] = f
        if f.failure:
            log.warning("refusing an incoming dataset before it arrives: %s", f.failure)
        return f

    def failure(self, path: Path | str) -> str | None:
        """Why the dataset received into ``path`` was dropped, or None if it is whole."""
        f = self._open.get(str(path))
        return f.failure if f is not None else None

    def _in_use(self, name: str) -> bool:
        f = self._open.get(name)
        thread = f.receiver_thread() if f is not None else None
        return thread is not None and thread.is_alive()

    def sweep(self, older_than: float) -> int:
        """Remove temporary files no live association is writing and older than ``older_than`` s.

        A transfer that stalls longer than the network timeout is aborted by pynetdicom,
        so with ``older_than`` at least that timeout nothing a peer can still complete is
        removed. Folders and other non-files are left alone (and logged).
        """
        cutoff = time.time() - older_than
        removed = 0
        with self._lock:
            for entry in os.scandir(self.spool.incoming):
                try:
                    if not entry.is_file(follow_symlinks=False):
                        log.warning("not a file in the incoming folder, left alone: %s", entry.path)
                        continue
                    if self._in_use(entry.path) or entry.stat().st_mtime > cutoff:
                        continue
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    continue
        if removed:
            log.info("removed %d temporary file(s) of unfinished transfers", removed)
        return removed


_installed: Receiver | None = None
_install_lock = threading.Lock()


def install(receiver: Receiver) -> None:
    """Route pynetdicom's chunked receive to ``receiver`` (the last one started wins).

    Raises RuntimeError if pynetdicom no longer creates its files the way this expects:
    receiving into the system temporary folder would make every commit a cross-device copy.
    """
    global _installed
    with _install_lock:
        current = getattr(_dimse_messages, "NamedTemporaryFile", None)
        if current is not tempfile.NamedTemporaryFile and current is not _open_in_receiver:
            raise RuntimeError(
                "pynetdicom.dimse_messages.NamedTemporaryFile not found: this pynetdicom "
                "version receives datasets differently; pin pynetdicom 3.0"
            )
        _installed = receiver
        _dimse_messages.NamedTemporaryFile = _open_in_receiver  # type: ignore[attr-defined]


def uninstall(receiver: Receiver) -> None:
    """Undo :func:`install` if ``receiver`` is still the active one."""
    global _installed
    with _install_lock:
        if _installed is receiver:
            _installed = None
            _dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile  # type: ignore[attr-defined]


def _open_in_receiver(*args: Any, **kwargs: Any) -> Any:
    receiver = _installed
    if receiver is None:  # a server in this process that is not ours
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return receiver.open(*args, **kwargs)
