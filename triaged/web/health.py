"""/healthz: is this triaged able to do its job right now?

Each check is ``ok`` true/false, or null when this process does not run the part (a web
process without ``status`` cannot know whether the SCP is listening). Any false check
makes the whole answer unhealthy (HTTP 503), so a load balancer or systemd watchdog can
act on the status code alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from sqlalchemy import Engine, text

from triaged.web.schemas import CheckOut, HealthOut

MB = 1024 * 1024


def _database(engine: Engine) -> CheckOut:
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means: not reachable
        return CheckOut(ok=False, detail=f"unreachable: {type(exc).__name__}")
    return CheckOut(ok=True, detail=engine.dialect.name)


def _spool(status: Mapping[str, object], spool_dir: Path, min_free_mb: int) -> CheckOut:
    free = status.get("spool_free_mb")
    threshold = status.get("min_free_mb", min_free_mb)
    if not isinstance(free, (int, float)):
        try:
            where = spool_dir if spool_dir.exists() else spool_dir.parent
            free = shutil.disk_usage(where).free / MB
        except OSError as exc:
            return CheckOut(ok=False, detail=f"spool not readable: {exc.strerror}")
    assert isinstance(threshold, (int, float))
    ok = free >= threshold
    return CheckOut(ok=ok, detail=f"{free:.0f} MB free, minimum {threshold:.0f} MB")


def _flag(status: Mapping[str, object], key: str, yes: str, no: str) -> CheckOut:
    if key not in status:
        return CheckOut(ok=None, detail="not run by this process")
    return CheckOut(ok=bool(status[key]), detail=yes if status[key] else no)


def check(
    engine: Engine,
    spool_dir: Path,
    min_free_mb: int,
    status: Callable[[], Mapping[str, object]] | None,
) -> HealthOut:
    checks: dict[str, CheckOut] = {"database": _database(engine)}
    st: Mapping[str, object] = {}
    if status is not None:
        try:
            st = dict(status())
        except Exception as exc:  # the status source itself failing is unhealthy
            checks["status"] = CheckOut(ok=False, detail=f"status failed: {exc}")
    checks["spool"] = _spool(st, spool_dir, min_free_mb)
    checks["scp"] = _flag(st, "scp_listening", "listening", "not listening")
    checks["scheduler"] = _flag(st, "scheduler_running", "running", "stopped")
    if "live_model" in st:
        live = st["live_model"]
        checks["model"] = CheckOut(ok=bool(live), detail=str(live) if live else "no live model")
    else:
        checks["model"] = CheckOut(ok=None, detail="not run by this process")
    return HealthOut(ok=all(c.ok is not False for c in checks.values()), checks=checks)
