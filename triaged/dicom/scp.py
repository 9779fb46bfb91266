"""The DICOM listener: C-ECHO and C-STORE with an allow-list, TLS and durable storage.

Small event handlers in the pynetdicom style: the network loop stays in pynetdicom, the
work is ``Spool.commit`` + ``record_instance``. Datasets are received in chunked mode,
straight into the spool's incoming folder, so a 512 KB slice is never decoded: the
header is read, the file fsynced and linked into place, the database row committed,
and only then is Success (0x0000) answered.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from triaged.config import DicomSettings, TLSSettings
from triaged.dicom import guard, reactor
from triaged.dicom.header import BadIdentifier, BadInstance, TooLarge, read_meta
from triaged.dicom.incoming import Receiver, install, uninstall
from triaged.dicom.spool import InvalidUID, OutOfSpace, Spool, SpoolError
from triaged.worklist.models import AssociationState
from triaged.worklist.studies import (
    IdCache,
    IdentityConflict,
    close_association,
    forget_instance,
    open_association,
    record_instance,
)

log = logging.getLogger("triaged.scp")

#: What a PACS commonly sends; every one of them decodes with the installed pydicom plugins.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    *JPEGTransferSyntaxes,
    *JPEGLSTransferSyntaxes,
    *JPEG2000TransferSyntaxes,
    RLELossless,
]

DUL_POLL_SECONDS = 0.0001

# Storage failure codes (PS3.4 Annex B.2.3); pynetdicom names only Success.
SUCCESS = int(Status.SUCCESS)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: A "cannot understand" code of its own: the instance contradicts a stored one (its SOP
#: Instance UID under another study or series, another Patient ID); ErrorComment says which.
IDENTITY_CONFLICT = 0xC001


@dataclass
class _AssocStats:
    id: int | None
    calling_ae: str
    peer: str
    stored: int = 0
    duplicates: int = 0
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def server_tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """TLS for the listener; with a CA, client certificates are required (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StoreSCP:
    """A C-ECHO/C-STORE Application Entity bound to a spool and the worklist database."""

    def __init__(
        self,
        settings: DicomSettings,
        spool: Spool,
        engine: Engine,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.engine = engine
        self._assocs: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.instances_received = 0
        self.instances_failed = 0
        self._ids = IdCache()
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-sync")
        self.receiver = Receiver(spool, spool.max_instance_bytes)

    # -- application entity -------------------------------------------------------
    def build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.network_timeout = s.network_timeout
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.network_timeout
        ae.require_called_aet = True
        if s.allowed_calling_aets:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads; returns the server (``shutdown()`` stops it)."""
        # Chunked receive writes each dataset to a file of our receiver: on the spool's
        # filesystem (committing is a link, not a copy), without touching tempfile.tempdir.
        _config.STORE_RECV_CHUNKED_DATASET = True
        install(self.receiver)
        if self.settings.fast_path:
            reactor.install()
        ctx = server_tls_context(self.settings.tls) if self.settings.tls else None
        ae = self.build_ae()
        server = guard.start_server(
            ae,
            (self.settings.bind, self.settings.port),
            ssl_context=ctx,
            evt_handlers=self.handlers(),
            max_pdu=self.settings.max_pdu,
            max_pending=self.settings.max_pending_connections,
            acse_timeout=self.settings.acse_timeout,
        )
        self._server = server
        log.info(
            "listening as %s on %s:%d%s%s",
            self.settings.ae_title,
            self.settings.bind,
            self.port,
            " (TLS)" if ctx else "",
            "" if self.settings.fast_path else " (pynetdicom fast path off)",
        )
        return server

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        sock = self._server.socket if self._server is not None else None
        return sock is not None and sock.fileno() >= 0

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        uninstall(self.receiver)
        self._io.shutdown(wait=True)

    # -- association bookkeeping --------------------------------------------------
    def _stats(self, assoc: Any) -> _AssocStats:
        with self._lock:
            st = self._assocs.get(id(assoc))
            if st is None:
                st = _AssocStats(
                    None,
                    assoc.requestor.ae_title,
                    f"{assoc.requestor.address}:{assoc.requestor.port}",
                )
                self._assocs[id(assoc)] = st
            return st

    def _on_conn_open(self, event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom's reader sleeps 1 ms whenever its socket is idle; a C-STORE SCU waits
        # for each response, so that sleep is paid per PDU. 0.1 ms costs little CPU.
        # It is a private attribute, hence behind [dicom] fast_path.
        if self.settings.fast_path:
            event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS

    def _on_accepted(self, event: evt.Event) -> None:
        reactor.register(event.assoc)  # runs in the association's reactor thread
        st = self._stats(event.assoc)
        try:
            with Session(self.engine) as s, s.begin():
                st.id = open_association(s, st.calling_ae, st.peer)
        except SQLAlchemyError as err:
            log.error("cannot record association from %s: %s", st.calling_ae, err)

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning(
            "association from AE %s at %s:%s rejected (calling AE or called AE not allowed)",
            req.ae_title,
            req.address,
            req.port,
        )
        with self._lock:
            self._assocs.pop(id(event.assoc), None)

    def _end(self, event: evt.Event, state: AssociationState) -> None:
        with self._lock:
            st = self._assocs.pop(id(event.assoc), None)
        if st is None:
            return
        log.info(
            "association from AE %s at %s %s: %d stored, %d duplicate, %d failed",
            st.calling_ae,
            st.peer,
            state.lower(),
            st.stored,
            st.duplicates,
            st.failures,
        )
        if st.id is None:
            return
        try:
            with Session(self.engine) as s, s.begin():
                close_association(s, st.id, state, st.stored + st.duplicates, st.failures)
        except SQLAlchemyError as err:
            log.error("cannot record end of association %s: %s", st.id, err)

    def _on_released(self, event: evt.Event) -> None:
        self._end(event, AssociationState.RELEASED)

    def _on_aborted(self, event: evt.Event) -> None:
        self._end(event, AssociationState.ABORTED)

    # -- services -------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _fail(self, st: _AssocStats, code: int, why: str, sop_uid: str) -> Dataset:
        with st.lock:
            st.failures += 1
        self.instances_failed += 1
        log.warning(
            "C-STORE from %s refused with 0x%04X: %s (SOP Instance %s)",
            st.calling_ae,
            code,
            why,
            sop_uid,
        )
        return _status(code, why)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        st = self._stats(event.assoc)
        request = cast(C_STORE, event.request)
        req_uid = str(request.AffectedSOPInstanceUID or "")
        temp = Path(event.dataset_path)
        dropped = self.receiver.failure(temp)
        if dropped:  # disk full, free space low or too large while it arrived
            return self._fail(st, OUT_OF_RESOURCES, dropped, req_uid)
        try:
            self.spool.check_space()
        except OutOfSpace as err:
            return self._fail(st, OUT_OF_RESOURCES, f"out of resources: {err}", req_uid)
        # The file's fsync (disk-bound, releases the GIL) overlaps the header parse and the
        # database write; Success still waits for both and for the durable name.
        synced = self._io.submit(self.spool.sync, temp)
        try:
            meta = read_meta(temp, self.spool.max_inflated_bytes)  # UIDs validated whole
            # The request's Affected SOP Instance UID must be the same, compared whole: a
            # peer may cut its own copy to 64 characters (dcmtk does), pynetdicom refuses
            # a longer one, and a valid dataset UID equal to it makes it valid too.
            if req_uid and meta.sop_instance_uid != req_uid:
                raise BadIdentifier("invalid: SOP Instance UID differs from request")
            self.spool.path_for(
                meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
            )
        except TooLarge as err:
            synced.exception()
            return self._fail(st, OUT_OF_RESOURCES, str(err), req_uid)
        except (BadIdentifier, InvalidUID) as err:
            synced.exception()
            return self._fail(st, DATASET_MISMATCH, str(err), req_uid)
        except (BadInstance, SpoolError) as err:
            synced.exception()
            return self._fail(st, CANNOT_UNDERSTAND, str(err), req_uid)
        final = self.spool.path_for(
            meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
        )
        try:
            with Session(self.engine) as s, s.begin():
                created = record_instance(
                    s, meta, str(final), temp.stat().st_size, st.id, cache=self._ids
                )
        except IdentityConflict as err:
            synced.exception()  # rolled back: nothing recorded, nothing placed
            return self._fail(st, IDENTITY_CONFLICT, str(err), req_uid)
        except SQLAlchemyError as err:
            synced.exception()
            log.error("database error while recording %s: %s", meta.sop_instance_uid, err)
            return self._fail(st, OUT_OF_RESOURCES, "database unavailable", req_uid)
        try:
            synced.result()
            self.spool.place(
                temp, meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
            )
        except SpoolError as err:
            if created:  # never acknowledged: take the row back so nothing dangles
                with Session(self.engine) as s, s.begin():
                    forget_instance(s, meta.sop_instance_uid)
            return self._fail(st, OUT_OF_RESOURCES, str(err), req_uid)
        with st.lock:
            if created:
                st.stored += 1
            else:
                st.duplicates += 1
        self.instances_received += 1
        return SUCCESS
