"""The delivery sweep: send due result objects to their destinations, then settle studies.

Runs as a scheduler job in every process that has destinations configured; leased claims
(``worklist.deliveries.claim_due``) keep two processes from sending the same object.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from triaged.config import Settings
from triaged.dicom import export
from triaged.worklist import deliveries

log = logging.getLogger("triaged.delivery")

LEASE_SECONDS = 120.0


def deliver_due(engine: Engine, settings: Settings) -> int:
    """One pass over due deliveries; returns how many objects were delivered."""
    due = deliveries.claim_due(engine, LEASE_SECONDS)
    if not due:
        return 0
    by_dest: dict[str, list[deliveries.DueDelivery]] = defaultdict(list)
    for d in due:
        by_dest[d.destination].append(d)
    known = {d.name: d for d in settings.destinations}
    cfg = settings.delivery
    delivered = 0
    studies: set[int] = set()
    for name, items in by_dest.items():
        dest = known.get(name)
        if dest is None:
            outcomes = [
                (d, False, True, f"destination {name} is no longer configured") for d in items
            ]
        else:
            sent = export.send(dest, [Path(d.path) for d in items], settings.dicom.ae_title)
            outcomes = [
                (
                    d,
                    r.outcome == export.Outcome.DELIVERED,
                    r.outcome == export.Outcome.REFUSED,
                    r.detail,
                )
                for d, r in zip(items, sent, strict=True)
            ]
        with Session(engine) as s, s.begin():
            for d, ok, permanent, detail in outcomes:
                state = deliveries.record_outcome(
                    s,
                    d.id,
                    delivered=ok,
                    permanent=permanent,
                    detail=detail,
                    max_attempts=cfg.max_attempts,
                    backoff_seconds=cfg.backoff_seconds,
                    backoff_max_seconds=cfg.backoff_max_seconds,
                )
                delivered += ok
                studies.add(d.study_id)
                if ok:
                    log.info("delivery %d of %s to %s: %s", d.id, Path(d.path).name, name, detail)
                else:
                    log.warning(
                        "delivery %d of %s to %s: %s (%s)",
                        d.id,
                        Path(d.path).name,
                        name,
                        detail,
                        state,
                    )
    with Session(engine) as s, s.begin():
        for study_id in studies:
            deliveries.settle_study(s, study_id)
    return delivered
