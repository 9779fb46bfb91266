"""Durable instance store: write to a temporary file, fsync, link into place, fsync the folder.

Nothing is acknowledged to the PACS that is not on disk, so the order matters: the bytes
reach the disk (fsync) before the name appears (link), and the name reaches the disk
(directory fsync) before the SCP answers Success. ``os.link`` refuses to replace an
existing file, which makes a second copy of the same SOP Instance UID a no-op even when
two associations race.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
INCOMING = ".incoming"
MB = 1024 * 1024

log = logging.getLogger("triaged.spool")


class SpoolError(Exception):
    """The spool cannot take an instance (bad UID, no space, I/O error)."""


class InvalidUID(SpoolError):
    """A UID that cannot name a file: never used as a path part."""


class OutOfSpace(SpoolError):
    """Free space is below the configured threshold: refuse new data, keep old data intact."""


def valid_uid(uid: str) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): safe to use as a path part."""
    return len(uid) <= 64 and bool(UID_RE.match(uid))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SpooledFile:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: Path


class Spool:
    """``<root>/<study>/<series>/<sop>.dcm`` plus ``<root>/.incoming`` for temporary files."""

    def __init__(
        self, root: Path, min_free_mb: int, max_instance_mb: int = 0, max_inflated_mb: int = 0
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_mb * MB
        #: 0 = no limit; otherwise the largest dataset taken, on the wire or inflated
        self.max_instance_bytes = max_instance_mb * MB
        #: the largest a deflated dataset may inflate to: the smaller of the two limits
        self.max_inflated_bytes = min(
            (b for b in (max_instance_mb * MB, max_inflated_mb * MB) if b), default=0
        )
        self.incoming = root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_space(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise InvalidUID(f"not a valid UID: {uid[:70]!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def temp_file(self) -> tuple[int, Path]:
        """An open descriptor and path in the incoming folder (same filesystem as the spool)."""
        fd, name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        return fd, Path(name)

    def _mkdirs(self, folder: Path) -> None:
        missing: list[Path] = []
        p = folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        folder.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(created.parent)

    def sync(self, temp: Path) -> None:
        """Force a received file's bytes to disk (step 1 of 2; may run beside other work)."""
        try:
            with open(temp, "rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OutOfSpace("no space left on the spool device") from None
            raise SpoolError(f"cannot store instance: {err.strerror}") from None

    def place(self, temp: Path, study_uid: str, series_uid: str, sop_uid: str) -> tuple[Path, bool]:
        """Link a synced file to its final name and make the name durable (step 2 of 2).

        Returns (path, newly stored). The temporary file is always removed; an instance
        already spooled is kept untouched (stored once).
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        try:
            self._mkdirs(final.parent)
            try:
                os.link(temp, final)
            except FileExistsError:
                return final, False
            _fsync_dir(final.parent)
            return final, True
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OutOfSpace("no space left on the spool device") from None
            raise SpoolError(f"cannot store instance: {err.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def check_space(self) -> None:
        if not self.has_space():
            raise OutOfSpace(
                f"free space {self.free_bytes() // MB} MB below {self.min_free_bytes // MB} MB"
            )

    def commit(
        self, temp: Path, study_uid: str, series_uid: str, sop_uid: str
    ) -> tuple[Path, bool]:
        """Check space, sync and place ``temp``; the temporary file is always removed."""
        try:
            self.path_for(study_uid, series_uid, sop_uid)
            self.check_space()
            self.sync(temp)
        except SpoolError:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        return self.place(temp, study_uid, series_uid, sop_uid)

    def write(
        self, data: bytes, study_uid: str, series_uid: str, sop_uid: str
    ) -> tuple[Path, bool]:
        """Store encoded bytes durably (used when the SCP is not in chunked-receive mode)."""
        self.path_for(study_uid, series_uid, sop_uid)
        self.check_space()
        fd, temp = self.temp_file()
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as err:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            if err.errno == errno.ENOSPC:
                raise OutOfSpace("no space left on the spool device") from None
            raise SpoolError(f"cannot write instance: {err.strerror}") from None
        return self.commit(temp, study_uid, series_uid, sop_uid)

    def iter_files(self) -> Iterator[SpooledFile]:
        """Every spooled instance, from the folder structure alone (used at restart)."""
        for study in sorted(self.root.iterdir()):
            if study.name == INCOMING or not study.is_dir() or not valid_uid(study.name):
                continue
            for series in sorted(study.iterdir()):
                if not series.is_dir() or not valid_uid(series.name):
                    continue
                for f in sorted(series.glob("*.dcm")):
                    if valid_uid(f.stem):
                        yield SpooledFile(study.name, series.name, f.stem, f)

    def clear_incoming(self) -> int:
        """Remove temp files of transfers that never completed (never acknowledged).

        Only files (and symlinks) are removed: a folder someone left here is not ours to
        delete and must not stop start-up.
        """
        n = 0
        for f in self.incoming.iterdir():
            if f.is_dir() and not f.is_symlink():
                log.warning("a folder in the incoming area is left alone: %s", f)
                continue
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                n += 1
        return n

    def remove_study(self, study_uid: str) -> None:
        if not valid_uid(study_uid):
            raise InvalidUID(f"not a valid UID: {study_uid!r}")
        shutil.rmtree(self.root / study_uid, ignore_errors=True)
