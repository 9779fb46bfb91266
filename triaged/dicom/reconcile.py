"""Restart recovery: make the spool and the database agree before serving again.

The SCP answers Success only after both the file and its row exist, but a crash can fall
between the two steps (file linked, row not committed) or an operator can delete files.
So at start: temp files of unfinished transfers are dropped (never acknowledged), files
the database does not know are indexed, rows whose file vanished are marked, and
associations left open by the dead process are marked aborted. A file is indexed only
when its header agrees with its place (``<study>/<series>/<sop>.dcm``) and with what the
database holds (see ``IdentityConflict``); any other file is logged and left alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from triaged.dicom.header import BadInstance, read_meta
from triaged.dicom.spool import Spool, SpooledFile
from triaged.worklist.models import Association, AssociationState, Instance
from triaged.worklist.studies import (
    IdentityConflict,
    InstanceMeta,
    abort_open_associations,
    record_instance,
)

log = logging.getLogger("triaged.reconcile")


@dataclass(frozen=True)
class ReconcileReport:
    temp_files_removed: int
    associations_aborted: int
    files_indexed: int
    files_unreadable: int
    files_mismatched: int
    rows_never_acknowledged: int
    rows_missing_file: int


def reconcile(spool: Spool, engine: Engine) -> ReconcileReport:
    removed = spool.clear_incoming()
    with Session(engine) as s, s.begin():
        aborted = abort_open_associations(s)
        known = {
            uid: (path, assoc_state)
            for uid, path, assoc_state in s.execute(
                select(Instance.sop_instance_uid, Instance.path, Association.state)
                .outerjoin(Association, Association.id == Instance.association_id)
                .where(Instance.file_missing.is_(False))
            ).all()
        }
    indexed = unreadable = mismatched = 0
    on_disk: set[str] = set()
    for f in spool.iter_files():
        on_disk.add(f.sop_instance_uid)
        if f.sop_instance_uid in known:
            # <study>/<series>/<sop>.dcm: the same place, even if the spool was moved
            if Path(known[f.sop_instance_uid][0]).parts[-3:] != f.path.parts[-3:]:
                mismatched += 1
                log.warning("spooled file %s: instance stored elsewhere; not indexed", f.path)
            continue
        try:
            meta = read_meta(f.path)
        except BadInstance as err:
            unreadable += 1
            log.warning("spooled file %s unreadable: %s", f.path, err)
            continue
        problem = _misplaced(f, meta)
        try:
            if problem is not None:
                raise IdentityConflict(problem)
            with Session(engine) as s, s.begin():
                record_instance(s, meta, str(f.path), f.path.stat().st_size, None)
        except IdentityConflict as err:
            mismatched += 1
            log.warning("spooled file %s not indexed: %s", f.path, err)
            continue
        indexed += 1
    gone = [
        (uid, state)
        for uid, (path, state) in known.items()
        if uid not in on_disk and not Path(path).exists()
    ]
    # The SCP records the row while the file is being synced and answers Success only once
    # the file is in place: a row without file from an association that died was never
    # acknowledged, so it is dropped; any other missing file is marked for the operator.
    unacked = [uid for uid, state in gone if state == AssociationState.ABORTED]
    missing = [uid for uid, state in gone if state != AssociationState.ABORTED]
    with Session(engine) as s, s.begin():
        for i in range(0, len(unacked), 500):
            s.execute(delete(Instance).where(Instance.sop_instance_uid.in_(unacked[i : i + 500])))
        for i in range(0, len(missing), 500):
            s.execute(
                update(Instance)
                .where(Instance.sop_instance_uid.in_(missing[i : i + 500]))
                .values(file_missing=True)
            )
    report = ReconcileReport(
        removed, aborted, indexed, unreadable, mismatched, len(unacked), len(missing)
    )
    log.info(
        "reconciled spool and database: %d temp files removed, %d associations marked aborted, "
        "%d files indexed, %d unreadable, %d not what their place says, "
        "%d unacknowledged rows dropped, %d rows without file",
        *(getattr(report, k) for k in report.__dataclass_fields__),
    )
    return report


def _misplaced(f: SpooledFile, meta: InstanceMeta) -> str | None:
    """Why a file's header disagrees with the folder it lies in, or None."""
    if meta.study_instance_uid != f.study_instance_uid:
        return "header names another study than its folder"
    if meta.series_instance_uid != f.series_instance_uid:
        return "header names another series than its folder"
    if meta.sop_instance_uid != f.sop_instance_uid:
        return "header names another SOP Instance than its file name"
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
