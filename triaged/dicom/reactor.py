"""Wake pynetdicom's acceptor reactor when a DIMSE message arrives instead of after a nap.

pynetdicom's ``Association._run_reactor`` polls its DIMSE queue after a fixed
``time.sleep(0.001)``. A C-STORE SCU waits for each response, so on a fast link that
sleep is paid once per instance: about 0.9 ms of the ~5 ms an instance took here. This
module swaps the ``time`` module seen by ``pynetdicom.association`` for a proxy whose
``sleep`` waits on the association's DIMSE queue (up to the same 1 ms), so a complete
message is served at once. Only threads that registered an association (our
``EVT_ACCEPTED`` handler runs in the acceptor's reactor thread) and only that 1 ms nap
are affected; every other call goes to :mod:`time` unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom.association as _association

log = logging.getLogger("triaged.scp")

#: The nap in ``Association._run_reactor`` (pynetdicom 2.x-3.x).
REACTOR_NAP = 0.001

_local = threading.local()
_lock = threading.Lock()


class _ReactorClock:
    """Stands in for :mod:`time` inside ``pynetdicom.association``."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        assoc = getattr(_local, "assoc", None)
        if assoc is None or seconds != REACTOR_NAP:
            self._real.sleep(seconds)
            return
        q = assoc.dimse.msg_queue
        with q.not_empty:  # holds the queue's mutex: look at the deque, not qsize()
            if not q.queue:
                q.not_empty.wait(seconds)


def install() -> bool:
    """Put the proxy in place once; False (and a log line) if pynetdicom changed shape."""
    with _lock:
        current = getattr(_association, "time", None)
        if isinstance(current, _ReactorClock):
            return True
        if current is not time:
            log.warning("pynetdicom.association has no time module; reactor wake-up not used")
            return False
        _association.time = _ReactorClock(time)  # type: ignore[assignment]
        return True


def register(assoc: Any) -> None:
    """Called in the acceptor's reactor thread: its naps now end when a message arrives."""
    dimse = getattr(assoc, "dimse", None)
    if hasattr(dimse, "msg_queue"):
        _local.assoc = assoc
