"""What every request handler needs: the app context, the logged-in user, CSRF checks.

Pages and the JSON API fail differently on purpose: a page without a login redirects
to the login form, an API call answers 401 (a script should not get HTML).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from triaged.config import Settings
from triaged.web import queries
from triaged.web.auth import LoginSession, Principal, Sessions, Users, same_token

if TYPE_CHECKING:
    from triaged.registry import ModelStore

SESSION_COOKIE = "triaged_session"
LOGIN_COOKIE = "triaged_login"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"


@dataclass
class WebContext:
    """Everything the handlers share; one per app, kept in ``app.state.ctx``."""

    settings: Settings
    engine: Engine
    store: ModelStore | None
    status: Callable[[], Mapping[str, object]] | None
    echo: Callable[[str], tuple[bool, str]] | None
    users: Users
    sessions: Sessions
    templates: Jinja2Templates
    spool_root: Path


class LoginRequired(Exception):
    """A page needs a login: answered with a redirect to the login form."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class PageError(Exception):
    """A page-level refusal (403, 404...) rendered as an HTML error page."""

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        self.message = message


def ctx(request: Request) -> WebContext:
    c: WebContext = request.app.state.ctx
    return c


def client_address(request: Request) -> str | None:
    """The client's address: the TCP peer, or X-Forwarded-For only from a trusted proxy
    (``[web] trusted_proxies``, applied by uvicorn before the app sees the request)."""
    return request.client.host if request.client else None


def secure_cookies(request: Request) -> bool:
    """Whether cookies get ``Secure``: ``[web] secure_cookies``, "auto" = came over HTTPS."""
    mode = ctx(request).settings.web.secure_cookies
    return request.url.scheme == "https" if mode == "auto" else bool(mode)


def login_session(request: Request) -> LoginSession | None:
    """The request's session (looked up once per request)."""
    if not hasattr(request.state, "login"):
        request.state.login = ctx(request).sessions.resolve(request.cookies.get(SESSION_COOKIE))
    found: LoginSession | None = request.state.login
    return found


def api_user(request: Request) -> LoginSession:
    s = login_session(request)
    if s is None:
        raise HTTPException(401, "login required")
    return s


def _require_admin(s: LoginSession) -> LoginSession:
    if not s.principal.is_admin:
        raise HTTPException(403, "admin role required")
    return s


def api_admin(request: Request) -> LoginSession:
    return _require_admin(api_user(request))


def api_csrf(request: Request) -> LoginSession:
    """A logged-in user whose request carries the session's CSRF token in the header."""
    s = api_user(request)
    if not same_token(s.csrf_token, request.headers.get(CSRF_HEADER)):
        raise HTTPException(403, "CSRF token missing or wrong")
    return s


def api_admin_csrf(request: Request) -> LoginSession:
    return _require_admin(api_csrf(request))


def _next_url(request: Request) -> str:
    q = request.url.query
    return request.url.path + (f"?{q}" if q else "")


def page_user(request: Request) -> LoginSession:
    s = login_session(request)
    if s is None:
        raise LoginRequired(_next_url(request))
    return s


def page_admin(request: Request) -> LoginSession:
    s = page_user(request)
    if not s.principal.is_admin:
        raise PageError(403, "This page is for administrators.")
    return s


async def page_csrf(request: Request) -> LoginSession:
    """A logged-in user whose form carries the session's CSRF token."""
    s = await run_in_threadpool(page_user, request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not isinstance(token, str) or not same_token(s.csrf_token, token):
        raise PageError(
            403,
            "The form has expired or did not come from this site. Reload the page and try again.",
        )
    return s


async def page_admin_csrf(request: Request) -> LoginSession:
    s = await page_csrf(request)
    if not s.principal.is_admin:
        raise PageError(403, "This action is for administrators.")
    return s


def login_url(next_url: str) -> str:
    return "/login?next=" + quote(next_url, safe="")


def safe_next(next_url: str | None) -> str:
    """Only same-site paths: never redirect a user to another site after login."""
    if (
        not next_url
        or not next_url.startswith("/")
        or next_url.startswith("//")
        or "\\" in next_url
    ):
        return "/"
    return next_url


def basic_principal(request: Request) -> Principal | None:
    """HTTP Basic credentials (for Prometheus and probes when /metrics is not open)."""
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = raw.partition(":")
    if not sep:
        return None
    c = ctx(request)
    client = client_address(request)
    throttle = queries.login_throttle(c.engine, c.settings.web, name[:64], client)
    if throttle.retry_after:
        with Session(c.engine) as s, s.begin():
            queries.audit(s, name[:64] or None, "login_throttled", None, client, "basic")
        raise HTTPException(
            429,
            "too many failed logins from this address",
            headers={"Retry-After": str(throttle.retry_after)},
        )
    principal = c.users.authenticate(name, password)
    if principal is None:
        with Session(c.engine) as s, s.begin():
            queries.audit(s, name[:64] or None, "login_failed", None, client, "basic")
    return principal


def ops_allowed(request: Request, open_flag: bool) -> None:
    """/healthz and /metrics: open if configured, else a session or HTTP Basic login."""
    if open_flag or login_session(request) is not None or basic_principal(request) is not None:
        return
    raise HTTPException(
        401, "login required", headers={"WWW-Authenticate": 'Basic realm="triaged"'}
    )
