"""Logging for the daemon and CLI: one stderr handler that keeps patient data out.

Patient data reaches log text mostly through database errors: SQLAlchemy appends the
bound parameters (Patient ID, accession...) to its message, and PostgreSQL adds a
``DETAIL:`` line with the failing row or key values. Engines are created with
``hide_parameters=True`` (``worklist.db.make_engine``); the formatter here also blanks
``DETAIL:`` and ``[parameters: ...]`` lines of every record, tracebacks included, so that
an engine made elsewhere or a driver message cannot leak either. ``[logging] phi = true``
(or ``TRIAGED_LOGGING__PHI=true``) turns both off for debugging on test data. Python
warnings are logged too, with quoted values blanked (pydicom quotes invalid values).
"""

from __future__ import annotations

import logging
import re
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HIDDEN = "[hidden: may contain patient data; [logging] phi = true shows it]"
_PHI_LINES = re.compile(r"^(?P<lead>\s*(?:DETAIL:|\[parameters:)).*$", re.MULTILINE)
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
QUIET_LOGGERS = ("pynetdicom", "apscheduler", "alembic", "uvicorn.access", "httpx", "highdicom")


class RedactingFormatter(logging.Formatter):
    """A formatter that blanks database error details and SQL parameters."""

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if record.name == "py.warnings":  # pydicom quotes invalid values: "... VR PN: 'X'"
            text = _QUOTED.sub("'…'", text)
        return text


def redact(text: str) -> str:
    """``text`` with every ``DETAIL:`` / ``[parameters:`` line replaced by a notice."""
    return _PHI_LINES.sub(lambda m: f"{m.group('lead')} {HIDDEN}", text)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Uncaught thread exceptions go through logging (and redaction), not raw stderr."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("triaged").error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def setup_logging(level: str, phi: bool = False) -> None:
    """Root logger to stderr at ``level``; redacting unless ``phi`` is on."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT) if phi else RedactingFormatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # warnings (pydicom's may quote a data element's value) go through the handler too
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
