"""Restart recovery: make the spool and the database agree before serving again.

The SCP answers Success only after both the file and its row exist, but a crash can fall
between the two steps (file linked, row not committed) or an operator can delete files.
So at start: temp files of unfinished transfers are dropped (never acknowledged), files
the database does not know are indexed, rows whose file vanished are marked, and
associations left open by the dead process are marked aborted. A file is indexed only
when its header agrees with its place (``<study>/<series>/<sop>.dcm``) and with what the
database holds (see ``IdentityConflict``); any other file is logged and left alone. A
row whose path is not its own study's and series' place (written by a version that let a
resend move an instance) is pointed back at its own file, or marked missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from triaged.dicom.header import BadInstance, read_meta
from triaged.dicom.spool import Spool, SpooledFile, SpoolError
from triaged.worklist.models import Association, AssociationState, Instance, Series, Study
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
    rows_repointed: int


def reconcile(spool: Spool, engine: Engine) -> ReconcileReport:
    removed = spool.clear_incoming()
    with Session(engine) as s, s.begin():
        aborted = abort_open_associations(s)
        rows = s.execute(
            select(
                Instance.sop_instance_uid,
                Instance.path,
                Association.state,
                Study.study_instance_uid,
                Series.series_instance_uid,
            )
            .join(Study, Study.id == Instance.study_id)
            .join(Series, Series.id == Instance.series_id)
            .outerjoin(Association, Association.id == Instance.association_id)
            .where(Instance.file_missing.is_(False))
        ).all()
    known = {uid: (path, assoc_state) for uid, path, assoc_state, _, _ in rows}
    repointed, misfiled_missing = _repair_misfiled(spool, engine, rows, known)
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
            meta = read_meta(f.path, spool.max_inflated_bytes)
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
        removed,
        aborted,
        indexed,
        unreadable,
        mismatched,
        len(unacked),
        len(missing) + misfiled_missing,
        repointed,
    )
    log.info(
        "reconciled spool and database: %d temp files removed, %d associations marked aborted, "
        "%d files indexed, %d unreadable, %d not what their place says, "
        "%d unacknowledged rows dropped, %d rows without file, %d rows pointed back",
        *(getattr(report, k) for k in report.__dataclass_fields__),
    )
    return report


def _repair_misfiled(
    spool: Spool, engine: Engine, rows: Sequence[Any], known: dict[str, tuple[str, Any]]
) -> tuple[int, int]:
    """Point rows whose path lies outside their study/series folder back at their own file.

    When the row's own place holds no file that agrees with it, the row is marked missing
    (and dropped from ``known``): it is never scored from another study's file. Returns
    (rows pointed back, rows marked missing).
    """
    repointed: dict[str, str] = {}
    lost: list[str] = []
    for uid, path, _, study_uid, series_uid in rows:
        place = Path(path)
        if not place.is_relative_to(spool.root):
            continue  # not this spool's (moved, or written by a test): left as before
        if place.parts[-3:] == (study_uid, series_uid, f"{uid}.dcm"):
            continue
        own = _own_file(spool, SpooledFile(study_uid, series_uid, uid, Path(path)))
        if own is not None:
            repointed[uid] = str(own)
            known[uid] = (str(own), known[uid][1])
            log.warning("instance %s pointed at another study's file; pointed back", uid)
        else:
            lost.append(uid)
            del known[uid]
            log.warning("instance %s pointed at another study's file; marked missing", uid)
    if repointed or lost:
        with Session(engine) as s, s.begin():
            for uid, own_path in repointed.items():
                s.execute(
                    update(Instance).where(Instance.sop_instance_uid == uid).values(path=own_path)
                )
            for i in range(0, len(lost), 500):
                s.execute(
                    update(Instance)
                    .where(Instance.sop_instance_uid.in_(lost[i : i + 500]))
                    .values(file_missing=True)
                )
    return len(repointed), len(lost)


def _own_file(spool: Spool, row: SpooledFile) -> Path | None:
    """The file at the row's own place, if there is one and its header agrees."""
    try:
        own = spool.path_for(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid)
        if not own.exists():
            return None
        meta = read_meta(own)
    except (SpoolError, BadInstance):
        return None
    return own if _misplaced(replace(row, path=own), meta) is None else None


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
