"""The web application: worklist page, study page, admin page, JSON API, /healthz, /metrics.

``create_app`` takes everything from outside (settings, engine, model store, a status
callable and a C-ECHO callable) so that ``serve`` wires the live daemon into it and tests
wire in fakes. Nothing is fetched from the internet: templates and static files ship in
the package and the Content-Security-Policy allows only this origin.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

import triaged
from triaged.config import Settings
from triaged.web import api, ops, pages
from triaged.web.auth import Sessions, Users
from triaged.web.deps import LoginRequired, PageError, WebContext, login_url

if TYPE_CHECKING:
    from triaged.registry import ModelStore

log = logging.getLogger("triaged.web")
HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


def fmt_pct(p: float | None) -> str:
    return "–" if p is None else f"{p * 100:.0f}%"


def fmt_age(seconds: float | None) -> str:
    """Waiting time the way a reading room says it: '7 min', '2 h 05', '3 d 4 h'."""
    if seconds is None:
        return "–"
    m = int(seconds // 60)
    if m < 1:
        return "<1 min"
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d}"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def fmt_time(iso: str | None) -> str:
    if not iso:
        return "–"
    t = datetime.fromisoformat(iso).astimezone(UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def make_templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(HERE / "templates"))
    t.env.filters.update(pct=fmt_pct, age=fmt_age, dt=fmt_time)
    t.env.globals.update(version=triaged.__version__)
    return t


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    store: ModelStore | None = None,
    status: Callable[[], Mapping[str, object]] | None = None,
    echo: Callable[[str], tuple[bool, str]] | None = None,
    session_lifetime: timedelta = timedelta(hours=12),
) -> FastAPI:
    """Build the app; the database must already have the schema (``db.ensure_schema``)."""
    web = settings.web
    secret = web.secret_key
    if not secret:
        secret = secrets.token_urlsafe(32)
        log.warning(
            "[web] secret_key is empty: generated one for this run; logins end at "
            "restart and are not shared with other triaged processes"
        )
    users = Users(engine, web.users)
    try:
        users.check_config_passwords()
    except SQLAlchemyError:  # the page starts anyway: /healthz reports the database
        log.warning(
            "database unavailable: [web] users password changes are checked at the "
            "first login instead"
        )
    context = WebContext(
        settings=settings,
        engine=engine,
        store=store,
        status=status,
        echo=echo,
        users=users,
        sessions=Sessions(engine, users, secret, session_lifetime),
        templates=make_templates(),
        spool_root=settings.storage.spool_dir,
    )
    app = FastAPI(
        title="triaged",
        version=triaged.__version__,
        description="COVID-19 chest-CT triage worklist. Research software, NOT FOR "
        "DIAGNOSTIC USE. Log in at /login; send the CSRF token of /api/me as "
        "X-CSRF-Token on every POST.",
        docs_url=None,  # the Swagger page loads its assets from a CDN: not here
        redoc_url=None,
    )
    app.state.ctx = context

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        resp = await call_next(request)
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        if request.url.path.startswith("/static/"):
            resp.headers.setdefault("Cache-Control", "no-cache")
        else:
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(login_url(exc.next_url), status_code=303)

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError) -> Response:
        who = getattr(request.state, "login", None)
        resp: HTMLResponse = context.templates.TemplateResponse(
            request,
            "error.html",
            {
                "user": who.principal if who else None,
                "csrf": who.csrf_token if who else "",
                "status": exc.status_code,
                "message": exc.message,
            },
            status_code=exc.status_code,
        )
        return resp

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(pages.router)
    app.include_router(api.router)
    api.add_error_handlers(app)
    app.include_router(ops.router)
    return app
