"""C-STORE SCU to the configured destinations, with every failure classified.

The delivery loop retries what can succeed later (connection refused, timeout, an aborted
association) and dead-letters at once what will never succeed (association rejected, SOP
class or transfer syntax not accepted, a failure status), so that a PACS that refuses our
objects is not hammered and an operator sees why.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triaged.config import Destination, TLSSettings

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


def client_tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """Verify the destination against our CA; present our certificate for mutual TLS."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    ctx.check_hostname = False  # DICOM peers are identified by certificate chain and AE title
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


def _associate(ae: AE, dest: Destination) -> Any:
    tls_args = None
    if dest.tls is not None:
        tls_args = (client_tls_context(dest.tls), dest.host)
    return ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
    )


def _refusal(assoc: Any) -> tuple[Outcome, str]:
    if assoc.is_rejected:
        return Outcome.REFUSED, "association rejected"
    if assoc.is_aborted:
        return Outcome.RETRY, "association aborted"
    return Outcome.RETRY, "connection failed"


def send(
    dest: Destination, paths: Sequence[Path], calling_ae: str, timeout: float = 30.0
) -> list[SendResult]:
    """Send files on one association; one SendResult per file, in order."""
    metas = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        metas.append((p, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    ae = _ae(calling_ae, timeout)
    for sop_class, ts in {(m[1], m[2]) for m in metas}:
        ae.add_requested_context(sop_class, ts)
    try:
        assoc = _associate(ae, dest)
    except (OSError, ssl.SSLError) as err:
        return [SendResult(p, Outcome.RETRY, f"connection failed: {err}") for p, _, _ in metas]
    if not assoc.is_established:
        outcome, why = _refusal(assoc)
        return [SendResult(p, outcome, why) for p, _, _ in metas]
    results: list[SendResult] = []
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        for path, sop_class, ts in metas:
            if (sop_class, ts) not in accepted:
                results.append(
                    SendResult(path, Outcome.REFUSED, "SOP class or transfer syntax not accepted")
                )
                continue
            if not assoc.is_established:
                results.append(SendResult(path, Outcome.RETRY, "association lost"))
                continue
            try:
                status = assoc.send_c_store(path)
            except Exception as err:  # a broken peer must not lose the other outcomes
                results.append(SendResult(path, Outcome.RETRY, f"send failed: {err}"))
                continue
            code = getattr(status, "Status", None)
            if code is None:
                results.append(SendResult(path, Outcome.RETRY, "no response (timeout or abort)"))
            elif code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                results.append(SendResult(path, Outcome.DELIVERED, f"status 0x{code:04X}"))
            else:
                comment = str(getattr(status, "ErrorComment", "") or "")
                results.append(
                    SendResult(path, Outcome.REFUSED, f"failure status 0x{code:04X} {comment}")
                )
    finally:
        if assoc.is_established:
            with contextlib.suppress(Exception):
                assoc.release()
    return results


def echo(dest: Destination, calling_ae: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO a destination: the admin page's test button."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(ae, dest)
    except (OSError, ssl.SSLError) as err:
        return False, f"connection failed: {err}"
    if not assoc.is_established:
        return False, _refusal(assoc)[1]
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return code == 0, "C-ECHO succeeded" if code == 0 else f"C-ECHO status {code}"
    finally:
        if assoc.is_established:
            assoc.release()
