"""The delivery sweep: send due result objects to their destinations, then settle studies.

Runs as a scheduler job in every process that has destinations configured; leased claims
(``worklist.deliveries.claim_due``) keep two processes from sending the same object.
Each object's outcome is committed as soon as the destination answers, so a crash in the
middle of a batch resends only the objects whose store was not yet confirmed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from triaged.config import DeliverySettings, Destination, Settings
from triaged.dicom import export
from triaged.worklist import deliveries

log = logging.getLogger("triaged.delivery")

LEASE_SECONDS = 120.0

SendOutcome = tuple[bool, bool, str]  # delivered, permanent, detail


def _outcomes(
    dest: Destination | None, name: str, items: list[deliveries.DueDelivery], calling_ae: str
) -> Iterator[SendOutcome]:
    """One outcome per item, in order, as each becomes known."""
    if dest is None:
        for _ in items:
            yield False, True, f"destination {name} is no longer configured"
        return
    done = 0
    try:
        for r in export.send(dest, [Path(d.path) for d in items], calling_ae):
            done += 1
            yield (
                r.outcome == export.Outcome.DELIVERED,
                r.outcome == export.Outcome.REFUSED,
                r.detail,
            )
    except Exception as err:  # one destination's surprise must not stall the others
        log.exception("delivery to %s failed unexpectedly", name)
        for _ in items[done:]:
            yield False, False, f"delivery error: {type(err).__name__}"


def _record(
    engine: Engine,
    name: str,
    d: deliveries.DueDelivery,
    outcome: SendOutcome,
    cfg: DeliverySettings,
) -> bool:
    ok, permanent, detail = outcome
    with Session(engine) as s, s.begin():
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
    if ok:
        log.info("delivery %d of %s to %s: %s", d.id, Path(d.path).name, name, detail)
    else:
        log.warning(
            "delivery %d of %s to %s: %s (%s)", d.id, Path(d.path).name, name, detail, state
        )
    return ok


def _settle(engine: Engine, studies: Iterable[int]) -> None:
    with Session(engine) as s, s.begin():
        for study_id in studies:
            deliveries.settle_study(s, study_id)


def deliver_due(engine: Engine, settings: Settings, owner: str | None = None) -> int:
    """One pass over due deliveries; returns how many objects were delivered.

    ``owner`` (host:pid:tag) is recorded on the claims so that a restart on this host
    can release the claims of a process that died (``deliveries.release_dead_local_claims``).
    """
    due = deliveries.claim_due(engine, LEASE_SECONDS, owner)
    if not due:
        return 0
    by_dest: dict[str, list[deliveries.DueDelivery]] = defaultdict(list)
    for d in due:
        by_dest[d.destination].append(d)
    known = {d.name: d for d in settings.destinations}
    delivered = 0
    for name, items in by_dest.items():
        outcomes = _outcomes(known.get(name), name, items, settings.dicom.ae_title)
        for d, outcome in zip(items, outcomes, strict=True):
            delivered += _record(engine, name, d, outcome, settings.delivery)
    _settle(engine, {d.study_id for d in due})
    return delivered
