"""Run the web app inside the ``serve`` process: a uvicorn server on its own thread.

One process keeps the deployment simple (one systemd unit). uvicorn installs signal
handlers only on the main thread, so running it on a thread leaves SIGTERM to ``serve``,
which stops the web server through the returned handle.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from triaged.config import Settings, TLSSettings

if TYPE_CHECKING:
    from triaged.registry import ModelStore

log = logging.getLogger("triaged.web")


class WebServer:
    """A running web server; call it (or ``stop()``) to shut it down."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, scheme: str, bind: str
    ) -> None:
        self._server = server
        self._thread = thread
        self.scheme = scheme
        self.bind = bind

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        for srv in self._server.servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)

    def __call__(self) -> None:
        self.stop()


def serve_in_thread(
    app: FastAPI,
    bind: str,
    port: int,
    tls: TLSSettings | None = None,
    timeout: float = 15.0,
    trusted_proxies: Sequence[str] = (),
) -> WebServer:
    """Start serving ``app`` on ``bind:port`` (HTTPS when ``tls`` is set) and wait until up.

    With ``tls.ca`` set, clients must present a certificate that chains to it.
    X-Forwarded-For/-Proto are believed only from ``trusted_proxies`` (uvicorn would
    otherwise trust 127.0.0.1, so anything on the host could pick its client address).
    uvicorn's own log configuration is off: its records go through triaged's handlers
    (and their patient-data redaction) instead of a handler of its own.
    Raises RuntimeError if the server cannot start (port taken, bad certificate).
    """
    kwargs: dict[str, object] = {}
    if tls is not None:
        kwargs = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.ca is not None:
            kwargs |= {"ssl_ca_certs": str(tls.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,
        host=bind,
        port=port,
        log_level="warning",
        access_log=False,
        log_config=None,
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=list(trusted_proxies),
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=5,
        **kwargs,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # uvicorn exits with SystemExit when it cannot bind
            failure.append(exc)

    thread = threading.Thread(target=run, name="triaged-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            why = f": {failure[0]!r}" if failure else ""
            raise RuntimeError(f"web server did not start on {bind}:{port}{why}")
        time.sleep(0.02)
    handle = WebServer(server, thread, "https" if tls else "http", bind)
    log.info("web page at %s", handle.url)
    return handle


def start_web(
    settings: Settings,
    engine: Engine,
    *,
    store: ModelStore | None = None,
    status: Callable[[], Mapping[str, object]] | None = None,
    echo: Callable[[str], tuple[bool, str]] | None = None,
) -> WebServer | None:
    """``serve``'s one call: build the app and serve it per ``[web]``; None when disabled."""
    web = settings.web
    if not web.enabled:
        return None
    from triaged.web.app import create_app

    app = create_app(
        settings,
        engine,
        store=store,
        status=status,
        echo=echo,
        session_lifetime=timedelta(hours=web.session_hours),
    )
    return serve_in_thread(app, web.bind, web.port, web.tls, trusted_proxies=web.trusted_proxies)
