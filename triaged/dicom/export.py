"""C-STORE SCU to the configured destinations, with every failure classified.

The delivery loop retries what can succeed later (connection refused, timeout, an aborted
association) and dead-letters at once what will never succeed (association rejected, SOP
class or transfer syntax not accepted, a failure status, a TLS certificate that does not
verify, a result file that cannot be read), so that a PACS that refuses our objects is not
hammered and an operator sees why.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from triaged.config import Destination, DestinationTLS

log = logging.getLogger("triaged.export")


class Outcome(enum.StrEnum):
    DELIVERED = "DELIVERED"
    RETRY = "RETRY"  # transient: try again later
    REFUSED = "REFUSED"  # permanent: do not retry


@dataclass(frozen=True)
class SendResult:
    path: Path
    outcome: Outcome
    detail: str


class _RecordingSSLSocket(ssl.SSLSocket):
    """Keeps a failed handshake's error on its context, where ``_associate`` finds it."""

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except ssl.SSLError as err:
            if isinstance(self.context, _ClientTLSContext):
                self.context.handshake_error = err
            raise


class _ClientTLSContext(ssl.SSLContext):
    """A client context that remembers why its handshake failed.

    pynetdicom logs a failed handshake and reports only "not established"; the delivery
    needs the reason (a certificate for another host is a configuration error to show).
    """

    sslsocket_class = _RecordingSSLSocket
    handshake_error: ssl.SSLError | None = None


def client_tls_context(tls: DestinationTLS) -> ssl.SSLContext:
    """Verify the destination's chain (our CA, else the system store) and its host name.

    Host name checking is on unless the destination sets ``verify_hostname = false``:
    without it any certificate the trust store accepts, for any host, would do.
    """
    ctx = _ClientTLSContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname=True
    if tls.ca:
        ctx.load_verify_locations(cafile=str(tls.ca))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = tls.verify_hostname
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    return ctx


def _nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _associate(ae: AE, dest: Destination) -> tuple[Any, ssl.SSLError | None]:
    """Associate; the second item is the TLS handshake error if that is why it failed."""
    ctx = None
    tls_args = None
    if dest.tls is not None:
        ctx = client_tls_context(dest.tls)
        tls_args = (ctx, dest.host)
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
    )
    return assoc, getattr(ctx, "handshake_error", None)


def _refusal(assoc: Any, dest: Destination, tls_error: ssl.SSLError | None) -> tuple[Outcome, str]:
    if isinstance(tls_error, ssl.SSLCertVerificationError):
        # a certificate for another host or from an untrusted issuer: not fixed by retrying
        why = tls_error.verify_message or tls_error.reason or str(tls_error)
        return Outcome.REFUSED, f"TLS certificate of {dest.host} not accepted: {why}"
    if tls_error is not None:
        why = tls_error.reason or str(tls_error)
        return Outcome.RETRY, f"TLS handshake with {dest.host} failed: {why}"
    if assoc.is_rejected:
        return Outcome.REFUSED, "association rejected"
    if assoc.is_aborted:
        return Outcome.RETRY, "association aborted"
    return Outcome.RETRY, "connection failed"


@dataclass(frozen=True)
class _Meta:
    sop_class: str
    transfer_syntax: str


def read_meta(path: Path) -> _Meta | str:
    """What the association needs to know about a result file, or why it cannot be sent.

    The reason names the file and the problem only: no data from inside the file.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)
        return _Meta(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    except FileNotFoundError:
        return f"result file {path.name} is missing"
    except InvalidDicomError:
        return f"result file {path.name} is not DICOM"
    except AttributeError:
        return f"result file {path.name} has no SOP class or transfer syntax"
    except OSError as err:
        return f"result file {path.name} is not readable: {err.strerror or type(err).__name__}"
    except Exception as err:  # a truncated or corrupt file: pydicom raises many kinds
        return f"result file {path.name} is not readable DICOM ({type(err).__name__})"


def _store(assoc: Any, path: Path, meta: _Meta, accepted: set[tuple[str, str]]) -> SendResult:
    if (meta.sop_class, meta.transfer_syntax) not in accepted:
        return SendResult(path, Outcome.REFUSED, "SOP class or transfer syntax not accepted")
    if not assoc.is_established:
        return SendResult(path, Outcome.RETRY, "association lost")
    try:
        status = assoc.send_c_store(path)
    except Exception as err:  # a broken peer must not lose the other outcomes
        return SendResult(path, Outcome.RETRY, f"send failed: {err}")
    code = getattr(status, "Status", None)
    if code is None:
        return SendResult(path, Outcome.RETRY, "no response (timeout or abort)")
    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
        return SendResult(path, Outcome.DELIVERED, f"status 0x{code:04X}")
    comment = str(getattr(status, "ErrorComment", "") or "")
    return SendResult(path, Outcome.REFUSED, f"failure status 0x{code:04X} {comment}")


def send(
    dest: Destination, paths: Sequence[Path], calling_ae: str, timeout: float = 30.0
) -> Iterator[SendResult]:
    """Send files on one association, yielding one SendResult per file, in order.

    Results come as soon as each store is answered, so that the caller can record them
    one by one (a crash mid-batch then resends only what was not confirmed). A file that
    cannot be read is refused on its own: the others still go out.
    """
    metas = [(p, read_meta(p)) for p in paths]
    readable = {(m.sop_class, m.transfer_syntax) for _, m in metas if isinstance(m, _Meta)}
    assoc = None
    failure: tuple[Outcome, str] | None = None
    accepted: set[tuple[str, str]] = set()
    if readable:
        ae = _ae(calling_ae, timeout)
        for sop_class, ts in readable:
            ae.add_requested_context(sop_class, ts)
        try:
            assoc, tls_error = _associate(ae, dest)
        except (OSError, ssl.SSLError) as err:
            failure = (Outcome.RETRY, f"connection failed: {err}")
        else:
            if assoc.is_established:
                accepted = {
                    (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                }
            else:
                failure = _refusal(assoc, dest, tls_error)
    try:
        for path, meta in metas:
            if isinstance(meta, str):
                yield SendResult(path, Outcome.REFUSED, meta)
            elif failure is not None:
                yield SendResult(path, *failure)
            else:
                yield _store(assoc, path, meta, accepted)
    finally:
        if assoc is not None and assoc.is_established:
            with contextlib.suppress(Exception):
                assoc.release()


def echo(dest: Destination, calling_ae: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO a destination: the admin page's test button."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    try:
        assoc, tls_error = _associate(ae, dest)
    except (OSError, ssl.SSLError) as err:
        return False, f"connection failed: {err}"
    if not assoc.is_established:
        return False, _refusal(assoc, dest, tls_error)[1]
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return code == 0, "C-ECHO succeeded" if code == 0 else f"C-ECHO status {code}"
    finally:
        if assoc.is_established:
            assoc.release()
