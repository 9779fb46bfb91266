"""APScheduler jobs of the daemon: study completion, delivery retries, retention and
scheduled retraining (each added by ``service.Service.start``).

Each job opens its own short transaction, so a slow job never blocks the SCP's writes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from triaged.config import AssemblySettings
from triaged.dicom.spool import Spool
from triaged.worklist.studies import complete_due_studies, purge_expired

log = logging.getLogger("triaged.scheduler")


def retention_sweep(engine: Engine, spool: Spool, results_dir: Path, days: int) -> int:
    """Forget studies finished more than ``days`` ago: their files and their rows."""
    with Session(engine) as s, s.begin():
        gone = purge_expired(s, days)
    for uid in gone:
        spool.remove_study(uid)
        shutil.rmtree(results_dir / uid, ignore_errors=True)
    if gone:
        log.info("retention: %d studies older than %d days removed", len(gone), days)
    return len(gone)


def completion_sweep(engine: Engine, assembly: AssemblySettings) -> list[str]:
    """Complete the studies that have been quiet long enough (see ``complete_due_studies``)."""
    with Session(engine) as s, s.begin():
        return complete_due_studies(s, assembly.quiet_seconds, assembly.max_wait_seconds)


def add_cron(
    scheduler: BackgroundScheduler, name: str, crontab: str, fn: Callable[[], object]
) -> None:
    """A crontab-scheduled job (e.g. weekly retraining); errors are logged, not raised."""
    from apscheduler.triggers.cron import CronTrigger

    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("scheduled job %s failed", name)

    scheduler.add_job(run, CronTrigger.from_crontab(crontab, timezone="UTC"), id=name, name=name)


def run_retrain(args: Sequence[str], config: Path | None) -> int:
    """Scheduled retraining runs ``triaged retrain`` in its own process (own memory, own log)."""
    cmd = [sys.executable, "-m", "triaged.cli", "retrain", *args]
    if config is not None:
        cmd[4:4] = ["--daemon-config", str(config)]
    log.info("scheduled retraining: %s", " ".join(cmd[3:]))
    rc = subprocess.run(cmd, check=False).returncode
    log.info("scheduled retraining finished with status %d", rc)
    return rc


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
