"""Bounds on what a peer can make the listener buffer or hold before it has associated.

pynetdicom's DUL reads a PDU as a 6-byte header and then ``recv(length)`` of whatever
length the header declares, into one growing buffer, before anything checks the calling
AE title or ``max_associations``. So anyone who reaches the port could make the daemon
allocate up to 4 GiB per connection, and a connection that never finishes its
A-ASSOCIATE-RQ held a thread forever. This module adds, around pynetdicom's own server:

* a per-type bound on every PDU's declared length, checked as soon as the header has
  been read and before its body is (an unknown PDU type or a P-DATA-TF before the
  association is accepted is a violation too): the connection is closed at once;
* a cap on connections that have not associated yet (``max_pending_connections``), and
  a deadline (the ACSE timeout) after which such a connection is cut, however slowly it
  trickles; the TLS handshake runs in the connection's thread under the same deadline,
  not in the accept loop.

The hooks are subclasses of pynetdicom's public ``ThreadedAssociationServer``,
``RequestHandler`` and ``AssociationSocket``, made through ``AE.make_server``. Two points
lean on pynetdicom 3.x internals: ``RequestHandler._create_association`` is extended to
turn its socket into a guarded one, and the DUL state names (PS3.8 Sta2/Sta3) tell
whether the association is accepted yet. Both fail closed (the connection is refused or
aborted), and tests/dicom/test_receive_network.py fails if pynetdicom changes shape.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger("triaged.scp")

HEADER = struct.Struct(">BBL")  # PDU type, reserved, length (PS3.8 9.3.1)
P_DATA_TF = 0x04
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
#: 128 presentation contexts with a score of transfer syntaxes each stay below this.
ASSOCIATE_MAX = 256 * 1024
#: A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT have a fixed 4-byte body.
FIXED_BODY = 4
#: Peers differ on whether the maximum length counts the PDV item headers.
P_DATA_SLACK = 64
#: With ``max_pdu = 0`` (no limit advertised) a P-DATA-TF PDU is still held to this.
P_DATA_CEILING = 64 * 1024 * 1024
#: At most one "refusing connection" line per this many seconds.
REFUSAL_LOG_SECONDS = 10.0
#: pynetdicom's acceptor states before the association is accepted (PS3.8 9.2).
PRE_ASSOCIATION = frozenset({"Sta2", "Sta3"})


def pdu_limits(max_pdu: int) -> dict[int, int]:
    """The longest body we read for each PDU type; a type not listed is refused."""
    p_data = max_pdu + P_DATA_SLACK if max_pdu > 0 else P_DATA_CEILING
    return {
        0x01: ASSOCIATE_MAX,
        0x02: ASSOCIATE_MAX,
        0x03: FIXED_BODY,
        0x04: p_data,
        0x05: FIXED_BODY,
        0x06: FIXED_BODY,
        0x07: FIXED_BODY,
    }


class PduTracker:
    """Follows PDU boundaries in the received byte stream and vets each header."""

    def __init__(self, limits: dict[int, int]) -> None:
        self.limits = limits
        self._header = bytearray()
        self._body_left = 0

    def check(self, pdu_type: int, length: int, associated: bool) -> str | None:
        """Why a PDU with this header must not be read, or None."""
        limit = self.limits.get(pdu_type)
        if limit is None:
            return f"unknown PDU type 0x{pdu_type:02X}"
        name = PDU_NAMES[pdu_type]
        if pdu_type == P_DATA_TF and not associated:
            return f"{name} before the association was accepted"
        if length > limit:
            return f"{name} PDU declares {length} bytes (limit {limit})"
        return None

    def feed(self, data: bytes | bytearray, associated: bool) -> str | None:
        """Account for received bytes; the reason to close the connection, or None."""
        view = memoryview(data)
        while view:
            if self._body_left:
                taken = min(self._body_left, len(view))
                self._body_left -= taken
                view = view[taken:]
                continue
            need = HEADER.size - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == HEADER.size:
                pdu_type, _, length = HEADER.unpack(self._header)
                self._header.clear()
                why = self.check(pdu_type, length, associated)
                if why is not None:
                    return why
                self._body_left = length
        return None


class Ticket:
    """One admitted, not yet associated connection; released exactly once."""

    def __init__(self, owner: PendingConnections, peer: str, cut: Callable[[], None]) -> None:
        self.peer = peer
        self._owner = owner
        self._cut = cut
        self._released = False
        self._timer = threading.Timer(owner.timeout, self._expire)
        self._timer.daemon = True
        self._timer.name = "association-deadline"

    def start(self) -> None:
        self._timer.start()

    def release(self) -> bool:
        """Free the slot (association accepted or connection gone); False if already free."""
        with self._owner.lock:
            if self._released:
                return False
            self._released = True
            self._owner.count -= 1
        self._timer.cancel()
        return True

    def _expire(self) -> None:
        if self.release():
            log.warning(
                "closing DICOM connection from %s: not associated after %g s",
                self.peer,
                self._owner.timeout,
            )
            self._cut()


class PendingConnections:
    """Counts connections that have not associated yet; each gets a deadline."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.count = 0
        self.lock = threading.Lock()

    def admit(self, peer: str, cut: Callable[[], None]) -> Ticket | None:
        """A ticket for a new connection, or None when ``limit`` are already waiting."""
        with self.lock:
            if self.count >= self.limit:
                return None
            self.count += 1
        ticket = Ticket(self, peer, cut)
        ticket.start()
        return ticket


def _peer(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)


def cut(sock: socket.socket) -> None:
    """Shut a socket down from another thread: a blocked recv or handshake returns."""
    # The plain socket method, also for an SSLSocket: its TLS state is left to the
    # thread that owns it, only the descriptor is shut down.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class GuardedSocket(AssociationSocket):
    """An ``AssociationSocket`` that vets each PDU header before the body is read."""

    tracker: PduTracker
    ticket: Ticket
    peer: str
    violated: bool

    @classmethod
    def adopt(cls, sock: AssociationSocket | None, tracker: PduTracker, ticket: Ticket) -> None:
        """Turn the socket pynetdicom made for a connection into a guarded one, in place.

        In place, because the original queued the connection's Evt5 when it was made; a
        second instance would queue another.
        """
        if type(sock) is not AssociationSocket:
            raise RuntimeError(f"unexpected pynetdicom socket type {type(sock).__name__}")
        sock.__class__ = cls
        assert isinstance(sock, GuardedSocket)
        sock.tracker = tracker
        sock.ticket = ticket
        sock.peer = ticket.peer
        sock.violated = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self.violated:
            return bytearray()
        data = super().recv(nr_bytes)
        state = self.assoc.dul.state_machine.current_state
        why = self.tracker.feed(data, associated=state not in PRE_ASSOCIATION)
        if why is None:
            return data
        log.warning("closing DICOM connection from %s: %s", self.peer, why)
        # An empty read is "connection closed" to the DUL (Evt17): it closes the socket,
        # with the rest of the peer's data unread, so the peer sees a reset. Until then
        # nothing more is read.
        self.violated = True
        return bytearray()


class GuardedRequestHandler(RequestHandler):
    """Runs the TLS handshake under the deadline and installs the guarded socket."""

    server: GuardedServer

    def handle(self) -> None:
        ticket = self.server.claim(self.request)
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._handshake(ticket):
                ticket.release()
                return
            self._ticket = ticket
            super().handle()
        except BaseException:
            ticket.release()
            raise

    def _handshake(self, ticket: Ticket) -> bool:
        sock = self.request
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.settimeout(self.server.pending.timeout)
            sock.do_handshake()
            sock.settimeout(None)
            return True
        except (OSError, ValueError) as err:
            log.warning("closing DICOM connection from %s: TLS handshake: %s", ticket.peer, err)
            cut(sock)
            sock.close()
            return False

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        GuardedSocket.adopt(assoc.dul.socket, PduTracker(self.server.limits), self._ticket)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the bounds above."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: Any,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        pending: PendingConnections,
        limits: dict[int, int],
    ) -> None:
        self.pending = pending
        self.limits = limits
        self._admitted: dict[Any, Ticket] = {}
        self._admitted_lock = threading.Lock()
        self._refused = 0
        self._refusal_logged = -REFUSAL_LOG_SECONDS
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )
        self.bind(evt.EVT_ACCEPTED, self._settled)
        self.bind(evt.EVT_CONN_CLOSE, self._settled)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; a TLS handshake is left to the connection's thread (see the handler)."""
        assert self.socket is not None
        sock, address = self.socket.accept()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse the connection when too many are still waiting to associate."""
        peer = _peer(client_address)
        ticket = self.pending.admit(peer, lambda: cut(request))
        if ticket is None:
            self._refused += 1
            now = time.monotonic()
            if now - self._refusal_logged >= REFUSAL_LOG_SECONDS:  # a flood is one line
                log.warning(
                    "refusing DICOM connection from %s: %d connections are waiting to "
                    "associate (%d refused since the last such line)",
                    peer,
                    self.pending.limit,
                    self._refused,
                )
                self._refused = 0
                self._refusal_logged = now
            return False
        with self._admitted_lock:
            self._admitted[request] = ticket
        return True

    def claim(self, request: Any) -> Ticket:
        with self._admitted_lock:
            return self._admitted.pop(request)

    def _settled(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket
        if isinstance(sock, GuardedSocket):
            sock.ticket.release()

    def shutdown(self) -> None:
        # AssociationServer.shutdown also removes the server from the AE's private list,
        # which only AE.start_server fills.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def start_server(
    ae: AE,
    address: tuple[str, int],
    *,
    ssl_context: ssl.SSLContext | None,
    evt_handlers: list[EventHandlerType],
    max_pdu: int,
    max_pending: int,
    acse_timeout: float,
) -> GuardedServer:
    """Like ``AE.start_server(block=False)``, with the guarded server."""
    server: GuardedServer = ae.make_server(  # type: ignore[assignment]
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=GuardedServer,
        pending=PendingConnections(max_pending, acse_timeout),
        limits=pdu_limits(max_pdu),
    )
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    return server
