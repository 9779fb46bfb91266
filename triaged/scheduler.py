"""APScheduler jobs of the daemon: study completion now; delivery retries, retention and
scheduled retraining are added by the services that own them.

Each job opens its own short transaction, so a slow job never blocks the SCP's writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from triaged.config import AssemblySettings
from triaged.worklist.studies import complete_due_studies

log = logging.getLogger("triaged.scheduler")


def completion_sweep(engine: Engine, assembly: AssemblySettings) -> list[str]:
    """Complete the studies that have been quiet long enough (see ``complete_due_studies``)."""
    with Session(engine) as s, s.begin():
        return complete_due_studies(s, assembly.quiet_seconds, assembly.max_wait_seconds)


def make_scheduler() -> BackgroundScheduler:
    return BackgroundScheduler(
        timezone="UTC",
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
    )


def add_interval(
    scheduler: BackgroundScheduler, name: str, seconds: float, fn: Callable[[], object]
) -> None:
    def run() -> None:
        try:
            fn()
        except OperationalError as err:  # database briefly unreachable: one line, retry later
            log.error("scheduled job %s: database unavailable: %s", name, str(err.orig)[:200])
        except Exception:  # a periodic job must survive a transient failure
            log.exception("scheduled job %s failed", name)

    scheduler.add_job(run, "interval", seconds=seconds, id=name, name=name)
