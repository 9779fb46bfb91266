"""The HTML pages: login, worklist, study, admin.

Pages are rendered on the server (they work without JavaScript); small scripts in
``static/`` add the live worklist updates, keyboard navigation and the C-ECHO button.
Forms post with the session's CSRF token and redirect afterwards (post/redirect/get).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup
from sqlalchemy.orm import Session

from triaged.web import api, queries
from triaged.web.auth import LoginSession
from triaged.web.deps import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    PageError,
    WebContext,
    client_address,
    ctx,
    login_session,
    page_admin,
    page_admin_csrf,
    page_csrf,
    page_user,
    safe_next,
    secure_cookies,
)
from triaged.web.plot import slice_plot_svg
from triaged.worklist.models import StudyState, utcnow

router = APIRouter(include_in_schema=False)
Ctx = Annotated[WebContext, Depends(ctx)]
User = Annotated[LoginSession, Depends(page_user)]
Admin = Annotated[LoginSession, Depends(page_admin)]
Writer = Annotated[LoginSession, Depends(page_csrf)]
AdminWriter = Annotated[LoginSession, Depends(page_admin_csrf)]


def render(
    c: WebContext,
    request: Request,
    name: str,
    who: LoginSession | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    return c.templates.TemplateResponse(
        request,
        name,
        {"user": who.principal if who else None, "csrf": who.csrf_token if who else "", **context},
        status_code=status_code,
    )


# ------------------------------------------------------------------------------ login
def _login_form(
    c: WebContext, request: Request, next_url: str, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    nonce, token = c.sessions.login_nonce()
    resp = render(
        c, request, "login.html", None, status_code, next=next_url, error=error, login_token=token
    )
    resp.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=3600,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )
    return resp


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, c: Ctx, next: str = "/") -> Response:
    if login_session(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_form(c, request, safe_next(next))


def _audit_login(c: WebContext, name: str, action: str, client: str | None) -> None:
    with Session(c.engine) as s, s.begin():
        queries.audit(s, name or None, action, None, client)


def _wait_words(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{math.ceil(seconds / 60)} minutes"


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    c: Ctx,
    username: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    """Async so that the per-account slow-down waits without holding a worker thread."""
    target = safe_next(next)
    if not c.sessions.check_login_nonce(request.cookies.get(LOGIN_COOKIE), csrf_token):
        return _login_form(c, request, target, "The login form expired. Please try again.", 403)
    name, client = username.strip()[:64], client_address(request)
    throttle = await run_in_threadpool(
        queries.login_throttle, c.engine, c.settings.web, name, client
    )
    if throttle.retry_after:
        await run_in_threadpool(_audit_login, c, name, "login_throttled", client)
        refused = _login_form(
            c,
            request,
            target,
            "Too many failed logins from your address: "
            f"try again in {_wait_words(throttle.retry_after)}.",
            429,
        )
        refused.headers["Retry-After"] = str(throttle.retry_after)
        return refused
    if throttle.account_delay:
        await asyncio.sleep(throttle.account_delay)
    principal = await run_in_threadpool(c.users.authenticate, name, password)
    await run_in_threadpool(_audit_login, c, name, "login" if principal else "login_failed", client)
    if principal is None:
        return _login_form(c, request, target, "Unknown user or wrong password.", 401)
    cookie, _csrf = await run_in_threadpool(c.sessions.create, principal, client)
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(c.sessions.lifetime.total_seconds()),
        path="/",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(request),
    )
    resp.delete_cookie(LOGIN_COOKIE, path="/login")
    return resp


@router.post("/logout")
def logout(request: Request, c: Ctx, who: Writer) -> Response:
    c.sessions.end(request.cookies.get(SESSION_COOKIE))
    with Session(c.engine) as s, s.begin():
        queries.audit(s, who.principal.name, "logout", None, client_address(request))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# ------------------------------------------------------------------------------ worklist
@router.get("/", response_class=HTMLResponse)
def worklist_page(request: Request, c: Ctx, who: User, f: api.Filter) -> HTMLResponse:
    now = utcnow()
    with Session(c.engine) as s:
        items = queries.worklist(s, f, now)
    return render(
        c,
        request,
        "worklist.html",
        who,
        studies=items,
        f=f,
        states=queries.STATE_FILTERS,
        generated_at=now.isoformat(),
    )


# ------------------------------------------------------------------------------ study
def _study_page(
    c: WebContext,
    request: Request,
    who: LoginSession,
    uid: str,
    status_code: int = 200,
    error: str | None = None,
) -> HTMLResponse:
    with Session(c.engine) as s, s.begin():
        try:
            detail = queries.study_detail(s, uid, api.image_url(uid))
            _, revision = queries.study_revision(s, uid)
        except queries.NotFound:
            raise PageError(404, "No such study.") from None
        queries.audit(s, who.principal.name, "view_study", uid, client_address(request), "page")
    plot = None
    if detail.result is not None:
        r = detail.result
        plot = Markup(
            slice_plot_svg(
                r.slice_probabilities,
                r.threshold,
                r.key_slice_position,
                series_indices=r.slice_indices,
            )
        )
    return render(
        c,
        request,
        "study.html",
        who,
        status_code,
        d=detail,
        s=detail.study,
        r=detail.result,
        plot=plot,
        error=error,
        revision=revision,
    )


@router.get("/studies/{uid}", response_class=HTMLResponse)
def study_page(uid: str, request: Request, c: Ctx, who: User) -> HTMLResponse:
    return _study_page(c, request, who, uid)


@router.post("/studies/{uid}/feedback")
def feedback_form(
    uid: str,
    request: Request,
    c: Ctx,
    who: Writer,
    verdict: Annotated[str, Form()] = "",
    note: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    with Session(c.engine) as s, s.begin():
        try:
            queries.add_feedback(s, uid, who.principal.name, verdict, note)
        except queries.NotFound:
            raise PageError(404, "No such study.") from None
        except queries.Conflict as exc:
            s.rollback()
            return _study_page(c, request, who, uid, 409, str(exc))
        queries.audit(s, who.principal.name, "feedback", uid, client_address(request), verdict)
    return RedirectResponse(f"/studies/{uid}#feedback", status_code=303)


# ------------------------------------------------------------------------------ admin
def _admin_page(
    c: WebContext,
    request: Request,
    who: LoginSession,
    message: tuple[bool, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    models_error = None
    models: list[Any] = []
    if c.store is None:
        models_error = "No model store is configured in this process."
    else:
        models = api.list_models(c)
    with Session(c.engine) as s, s.begin():
        queries.audit(s, who.principal.name, "view_admin", None, client_address(request))
        audit_rows = queries.recent_audit(s, 50)
    return render(
        c,
        request,
        "admin.html",
        who,
        status_code,
        models=models,
        models_error=models_error,
        destinations=api.destinations(c),
        echo_available=c.echo is not None,
        health=api.health_of(c),
        audit=audit_rows,
        message=message,
        csrf_field=CSRF_FIELD,
        states=[s.value for s in StudyState],
    )


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, c: Ctx, who: Admin) -> HTMLResponse:
    return _admin_page(c, request, who)


def _admin_action(c: WebContext, request: Request, who: LoginSession, fn: Any) -> Response:
    try:
        fn()
    except HTTPException as exc:
        return _admin_page(c, request, who, (False, str(exc.detail)), exc.status_code)
    return RedirectResponse("/admin#models", status_code=303)


@router.post("/admin/models/{name}/promote")
def promote_form(
    name: str,
    request: Request,
    c: Ctx,
    who: AdminWriter,
    version: Annotated[str, Form()] = "",
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    return _admin_action(
        c, request, who, lambda: api.promote(c, request, who, name, version, reason)
    )


@router.post("/admin/models/{name}/rollback")
def rollback_form(
    name: str,
    request: Request,
    c: Ctx,
    who: AdminWriter,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    return _admin_action(c, request, who, lambda: api.rollback(c, request, who, name, reason))


def _destination_action(
    c: WebContext, request: Request, who: LoginSession, fn: Callable[[], tuple[bool, str]]
) -> HTMLResponse:
    """Run a destination action and show its outcome (or the refusal) on the admin page."""
    try:
        message = fn()
    except HTTPException as exc:
        return _admin_page(c, request, who, (False, str(exc.detail)), exc.status_code)
    return _admin_page(c, request, who, message)


@router.post("/admin/destinations/{name}/retry", response_class=HTMLResponse)
def retry_form(name: str, request: Request, c: Ctx, who: AdminWriter) -> HTMLResponse:
    def run() -> tuple[bool, str]:
        out = api.retry_dead(c, request, who, name)
        return True, f"{name}: {out.requeued} dead-lettered object(s) requeued"

    return _destination_action(c, request, who, run)


@router.post("/admin/destinations/{name}/echo", response_class=HTMLResponse)
def echo_form(name: str, request: Request, c: Ctx, who: AdminWriter) -> HTMLResponse:
    def run() -> tuple[bool, str]:
        out = api.echo(c, request, who, name)
        return out.ok, f"C-ECHO {name}: {out.message}"

    return _destination_action(c, request, who, run)
