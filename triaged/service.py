"""`triaged serve`: the SCP, the scheduler, in-process workers and the web app in one process.

Start-up order matters for restart safety: schema first, then reconcile spool and
database, then accept associations, then periodic work. Shutdown is the reverse and
leaves every study in a recorded state.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from sqlalchemy import Engine

from triaged.config import Settings
from triaged.delivery import deliver_due
from triaged.dicom import export
from triaged.dicom.reconcile import pid_alive, reconcile
from triaged.dicom.scp import StoreSCP
from triaged.dicom.spool import Spool
from triaged.scheduler import (
    add_cron,
    add_interval,
    completion_sweep,
    make_scheduler,
    retention_sweep,
    run_retrain,
)
from triaged.worker import StudyProcessor, Worker, owner_name, release_dead_local_leases
from triaged.worklist import db, deliveries

log = logging.getLogger("triaged.service")

DELIVERY_SWEEP_SECONDS = 2.0
RETENTION_SWEEP_SECONDS = 3600.0
INCOMING_SWEEP_SECONDS = 300.0


@dataclass
class Service:
    settings: Settings
    engine: Engine = field(init=False)
    spool: Spool = field(init=False)
    scp: StoreSCP = field(init=False)
    processor: StudyProcessor | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _on_stop: list[Callable[[], None]] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.engine = db.make_engine(s.database.url, log_phi=s.logging.phi)
        self.spool = Spool(
            s.storage.spool_dir,
            s.storage.min_free_mb,
            s.storage.max_instance_mb,
            s.storage.max_inflated_mb,
        )
        self.scp = StoreSCP(s.dicom, self.spool, self.engine)
        self.scheduler = make_scheduler()

    def start(self) -> None:
        db.ensure_schema(self.engine)
        reconcile(self.spool, self.engine)
        released = release_dead_local_leases(self.engine, pid_alive)
        if released:
            log.info("%d job(s) of a dead worker on this host queued again", released)
        resend = deliveries.release_dead_local_claims(self.engine, pid_alive)
        if resend:
            log.info("%d delivery claim(s) of a dead process on this host due again", resend)
        self.scp.start()
        self._on_stop.append(self.scp.shutdown)
        s = self.settings
        add_interval(
            self.scheduler,
            "completion",
            s.assembly.sweep_seconds,
            lambda: completion_sweep(self.engine, s.assembly),
        )
        if s.storage.retention_days > 0:
            add_interval(
                self.scheduler,
                "retention",
                RETENTION_SWEEP_SECONDS,
                lambda: retention_sweep(
                    self.engine, self.spool, s.storage.results_dir, s.storage.retention_days
                ),
            )
        if s.retrain.enabled:
            add_cron(
                self.scheduler,
                "retrain",
                s.retrain.cron,
                lambda: run_retrain(s.retrain.args, s.path),
            )
        if s.destinations:
            sender = owner_name()
            add_interval(
                self.scheduler,
                "delivery",
                DELIVERY_SWEEP_SECONDS,
                lambda: deliver_due(self.engine, s, sender),
            )
        # a transfer cut off mid-way leaves its temporary file: remove it while running
        # (not only at the next start), once no association can still be writing it
        timeout = s.dicom.network_timeout
        add_interval(
            self.scheduler,
            "incoming",
            min(timeout, INCOMING_SWEEP_SECONDS),
            lambda: self.scp.receiver.sweep(timeout),
        )
        self.scheduler.start()
        self._on_stop.append(lambda: self.scheduler.shutdown(wait=False))
        self.start_workers()
        self.start_web()
        log.info("triaged ready")

    def status(self) -> dict[str, object]:
        """What /healthz and /metrics report about this process.

        ``live_model`` is only reported by a process that scores (it runs workers): it is
        the live version in the store of the pipeline's fusion model, loaded or not yet.
        """
        status: dict[str, object] = {
            "scp_listening": self.scp.listening,
            "scheduler_running": bool(self.scheduler.running),
            "spool_free_mb": self.spool.free_bytes() // (1024 * 1024),
            "min_free_mb": self.settings.storage.min_free_mb,
        }
        live_model = getattr(self.processor, "live_model", None)
        if self.workers and callable(live_model):
            status["live_model"] = live_model()
        return status

    def echo(self, destination: str) -> tuple[bool, str]:
        dest = next((d for d in self.settings.destinations if d.name == destination), None)
        if dest is None:
            return False, f"no destination named {destination}"
        return export.echo(dest, self.settings.dicom.ae_title)

    def start_web(self) -> None:
        from triaged.registry import ModelStore
        from triaged.web.server import start_web

        server = start_web(
            self.settings,
            self.engine,
            store=ModelStore(self.settings.models.store),
            status=self.status,
            echo=self.echo,
        )
        if server is not None:
            self._on_stop.append(server.stop)

    def start_workers(self) -> None:
        """Run ``[worker] in_process`` scoring workers in threads of this process."""
        if self.settings.worker.in_process == 0:
            return
        if self.processor is None:
            from triaged.processing import processor_for  # torch + MONAI: only for workers

            self.processor = processor_for(self.settings)
        processor = self.processor
        if processor is None:
            log.warning("no pipeline configured: studies are received but not scored")
            return
        for i in range(self.settings.worker.in_process):
            w = Worker(self.settings, self.engine, processor)
            t = threading.Thread(target=w.run_forever, name=f"worker-{i}", daemon=True)
            t.start()
            self.workers.append(w)
            self._on_stop.append(w.stop.set)

    def stop(self) -> None:
        self._stop.set()
        for fn in reversed(self._on_stop):
            try:
                fn()
            except Exception:
                log.exception("error while stopping")
        self._on_stop.clear()
        self.engine.dispose()

    def run_forever(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
