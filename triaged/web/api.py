"""The JSON API under ``/api/``: everything the pages show, for scripts and the page's JS.

Reads need a login; writes need a login and the session's CSRF token in ``X-CSRF-Token``;
``/api/admin/*`` and ``/api/labels`` need the admin role. Every study read and every
admin action is written to the audit log (not the revision poll, which shows no patient
data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.orm import Session

from triaged.web import health, queries
from triaged.web.auth import LoginSession
from triaged.web.deps import (
    WebContext,
    api_admin,
    api_admin_csrf,
    api_csrf,
    api_user,
    client_address,
    ctx,
)
from triaged.web.schemas import (
    AuditOut,
    DestinationOut,
    EchoOut,
    FeedbackIn,
    FeedbackOut,
    HealthOut,
    LabelExportOut,
    Me,
    ModelChangeOut,
    ModelOut,
    ModelVersionOut,
    PromoteIn,
    RetryOut,
    RollbackIn,
    StudyDetail,
    StudyRevision,
    WorklistOut,
)
from triaged.worklist import deliveries
from triaged.worklist.models import utcnow

router = APIRouter(prefix="/api", tags=["api"])
User = Annotated[LoginSession, Depends(api_user)]
Admin = Annotated[LoginSession, Depends(api_admin)]
Writer = Annotated[LoginSession, Depends(api_csrf)]
AdminWriter = Annotated[LoginSession, Depends(api_admin_csrf)]
Ctx = Annotated[WebContext, Depends(ctx)]
DATE = r"^\d{4}-\d{2}-\d{2}$"

# what the worklist queries raise, as HTTP statuses (one mapping for every route)
QUERY_ERRORS: dict[type[Exception], int] = {queries.NotFound: 404, queries.Conflict: 409}


async def _query_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(code for kind, code in QUERY_ERRORS.items() if isinstance(exc, kind))
    return JSONResponse({"detail": str(exc)}, status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """Let routes raise ``queries.NotFound``/``Conflict`` and answer 404/409 with its message."""
    for kind in QUERY_ERRORS:
        app.add_exception_handler(kind, _query_error)


def worklist_filter(
    state: Annotated[str | None, Query(description="a study state or DELIVERY_FAILED")] = None,
    min_priority: Annotated[int | None, Query()] = None,
    flagged: Annotated[bool | None, Query()] = None,
    date_from: Annotated[str | None, Query(pattern=DATE)] = None,
    date_to: Annotated[str | None, Query(pattern=DATE)] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> queries.WorklistFilter:
    """The worklist filters, shared by the page (its URL) and the API."""
    if state and state not in queries.STATE_FILTERS:
        raise HTTPException(422, f"state must be one of {', '.join(queries.STATE_FILTERS)}")
    return queries.WorklistFilter(
        state=state or None,
        min_priority=min_priority,
        flagged=flagged,
        date_from=date_from or None,
        date_to=date_to or None,
        limit=limit,
    )


Filter = Annotated[queries.WorklistFilter, Depends(worklist_filter)]


def image_url(uid: str) -> Callable[[str], str]:
    """The URL maker for a study's result images (``kind`` -> URL)."""
    return lambda kind: f"/api/studies/{quote(uid)}/images/{kind}"


def audit(
    c: WebContext,
    request: Request,
    who: LoginSession,
    action: str,
    target: str | None,
    detail: str | None = None,
) -> None:
    with Session(c.engine) as s, s.begin():
        queries.audit(s, who.principal.name, action, target, client_address(request), detail)


@router.get("/me", response_model=Me)
def me(who: User) -> Me:
    return Me(name=who.principal.name, role=who.principal.role, csrf_token=who.csrf_token)


@router.get("/studies", response_model=WorklistOut)
def list_studies(c: Ctx, who: User, f: Filter) -> WorklistOut:
    """The worklist in reading order (priority, then waiting time)."""
    now = utcnow()
    with Session(c.engine) as s:
        items = queries.worklist(s, f, now)
    return WorklistOut(generated_at=now.isoformat(), count=len(items), studies=items)


@router.get("/studies/{uid}", response_model=StudyDetail)
def get_study(uid: str, request: Request, c: Ctx, who: User) -> StudyDetail:
    with Session(c.engine) as s, s.begin():
        detail = queries.study_detail(s, uid, image_url(uid))
        queries.audit(s, who.principal.name, "view_study", uid, client_address(request), "api")
    return detail


@router.get("/studies/{uid}/revision", response_model=StudyRevision)
def get_study_revision(uid: str, c: Ctx, who: User) -> StudyRevision:
    """The open study page polls this; it carries no patient data, so it is not audited."""
    with Session(c.engine) as s:
        state, revision = queries.study_revision(s, uid)
    return StudyRevision(state=state, revision=revision)


@router.get(
    "/studies/{uid}/images/{kind}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}},
)
def study_image(uid: str, kind: str, c: Ctx, who: User) -> FileResponse:
    """The key-slice heat-map (``heatmap``) or the infected-region overlay (``infected``)."""
    if kind not in queries.IMAGE_KINDS:
        raise HTTPException(404, f"image kind is one of {', '.join(queries.IMAGE_KINDS)}")
    with Session(c.engine) as s:
        path = queries.study_image(s, uid, kind)
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "private, no-store"}
    )


@router.get("/studies/{uid}/feedback", response_model=list[FeedbackOut])
def get_feedback(uid: str, c: Ctx, who: User) -> list[FeedbackOut]:
    with Session(c.engine) as s:
        study = queries.get_study(s, uid)
        return queries.list_feedback(s, study.id)


@router.post("/studies/{uid}/feedback", response_model=FeedbackOut, status_code=201)
def post_feedback(uid: str, body: FeedbackIn, request: Request, c: Ctx, who: Writer) -> FeedbackOut:
    """Confirm or refute the study's finding; becomes a label for ``triaged retrain``."""
    with Session(c.engine) as s, s.begin():
        out = queries.add_feedback(s, uid, who.principal.name, body.verdict, body.note)
        queries.audit(s, who.principal.name, "feedback", uid, client_address(request), body.verdict)
    return out


@router.get("/labels", response_model=LabelExportOut)
def get_labels(request: Request, c: Ctx, who: Admin) -> LabelExportOut:
    """All feedback as ``triaged-labels/1`` for ``triaged retrain``."""
    with Session(c.engine) as s, s.begin():
        out = queries.labels(s, c.spool_root)
        queries.audit(
            s,
            who.principal.name,
            "export_labels",
            None,
            client_address(request),
            f"{len(out.labels)} labels",
        )
    return out


# ------------------------------------------------------------------------------ admin
def _store(c: WebContext) -> Any:
    if c.store is None:
        raise HTTPException(503, "no model store configured in this process")
    return c.store


def _can_rollback(history: list[dict[str, Any]]) -> bool:
    """Whether an earlier live version exists, replayed from the store's public log."""
    previous: list[str] = []
    current: str | None = None
    for event in history:
        if event.get("action") == "promote":
            if current is not None:
                previous.append(current)
            current = event.get("version")
        elif event.get("action") == "rollback" and previous:
            current = previous.pop()
    return bool(previous)


def list_models(c: WebContext) -> list[ModelOut]:
    """Every model with its versions, cards and promote/rollback history."""
    from triaged.registry import RegistryError

    store = _store(c)
    out: list[ModelOut] = []
    for name in store.names():
        try:
            live = store.live(name)
            versions = store.list(name)
            history = store.history(name)
        except RegistryError as exc:
            out.append(
                ModelOut(
                    name=name,
                    live=None,
                    can_rollback=False,
                    versions=[],
                    history=[{"action": "error", "reason": str(exc)}],
                )
            )
            continue
        out.append(
            ModelOut(
                name=name,
                live=live.version if live else None,
                can_rollback=_can_rollback(history),
                versions=[
                    ModelVersionOut(
                        name=v.name,
                        version=v.version,
                        live=live is not None and v.version == live.version,
                        card=v.card.model_dump(mode="json"),
                    )
                    for v in reversed(versions)
                ],
                history=list(reversed(history)),
            )
        )
    return out


@router.get("/admin/models", response_model=list[ModelOut])
def get_models(c: Ctx, who: Admin) -> list[ModelOut]:
    return list_models(c)


def promote(
    c: WebContext, request: Request, who: LoginSession, name: str, version: str, reason: str
) -> ModelChangeOut:
    from triaged.registry import ModelNotFoundError, RegistryError

    store = _store(c)
    why = f"web {who.principal.name}" + (f": {reason}" if reason else "")
    try:
        v = store.promote(name, version, reason=why)
    except ModelNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    except RegistryError as exc:
        raise HTTPException(400, str(exc)) from None
    audit(c, request, who, "promote_model", f"{name}:{v.version}", reason or None)
    return ModelChangeOut(name=name, live=v.version)


def rollback(
    c: WebContext, request: Request, who: LoginSession, name: str, reason: str
) -> ModelChangeOut:
    from triaged.registry import ModelNotFoundError, RegistryError

    store = _store(c)
    why = f"web {who.principal.name}" + (f": {reason}" if reason else "")
    try:
        v = store.rollback(name, reason=why)
    except ModelNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    audit(c, request, who, "rollback_model", f"{name}:{v.version}", reason or None)
    return ModelChangeOut(name=name, live=v.version)


@router.post("/admin/models/{name}/promote", response_model=ModelChangeOut)
def post_promote(
    name: str, body: PromoteIn, request: Request, c: Ctx, who: AdminWriter
) -> ModelChangeOut:
    return promote(c, request, who, name, body.version, body.reason)


@router.post("/admin/models/{name}/rollback", response_model=ModelChangeOut)
def post_rollback(
    name: str, body: RollbackIn, request: Request, c: Ctx, who: AdminWriter
) -> ModelChangeOut:
    return rollback(c, request, who, name, body.reason)


def destinations(c: WebContext) -> list[DestinationOut]:
    with Session(c.engine) as s:
        counts = deliveries.counts_by_destination(s)
    return [
        DestinationOut(
            name=d.name,
            ae_title=d.ae_title,
            host=d.host,
            port=d.port,
            tls=d.tls is not None,
            **asdict(counts.get(d.name, deliveries.DestinationCounts())),
        )
        for d in c.settings.destinations
    ]


def retry_dead(c: WebContext, request: Request, who: LoginSession, name: str) -> RetryOut:
    if name not in {d.name for d in c.settings.destinations}:
        raise HTTPException(404, f"no destination named {name!r}")
    with Session(c.engine) as s, s.begin():
        n = deliveries.requeue_dead(s, destination=name)
    audit(c, request, who, "retry_deliveries", name, f"{n} requeued")
    return RetryOut(destination=name, requeued=n)


@router.post("/admin/destinations/{name}/retry", response_model=RetryOut)
def post_retry(name: str, request: Request, c: Ctx, who: AdminWriter) -> RetryOut:
    """Resend this destination's dead-lettered objects (same SOP Instance UIDs)."""
    return retry_dead(c, request, who, name)


@router.get("/admin/destinations", response_model=list[DestinationOut])
def get_destinations(c: Ctx, who: Admin) -> list[DestinationOut]:
    return destinations(c)


def echo(c: WebContext, request: Request, who: LoginSession, name: str) -> EchoOut:
    if name not in {d.name for d in c.settings.destinations}:
        raise HTTPException(404, f"no destination named {name!r}")
    if c.echo is None:
        raise HTTPException(503, "C-ECHO is not available in this process")
    try:
        ok, message = c.echo(name)
    except Exception as exc:  # the network layer failing is a failed echo, not a 500
        ok, message = False, f"{type(exc).__name__}: {exc}"
    audit(c, request, who, "echo", name, f"{'ok' if ok else 'failed'}: {message}"[:500])
    return EchoOut(destination=name, ok=ok, message=message)


@router.post("/admin/destinations/{name}/echo", response_model=EchoOut)
def post_echo(name: str, request: Request, c: Ctx, who: AdminWriter) -> EchoOut:
    """C-ECHO the destination: is the PACS reachable and does it accept our AE title?"""
    return echo(c, request, who, name)


def health_of(c: WebContext) -> HealthOut:
    st = c.settings.storage
    return health.check(c.engine, st.spool_dir, st.min_free_mb, c.status)


@router.get("/admin/health", response_model=HealthOut)
def get_health(c: Ctx, who: Admin) -> HealthOut:
    return health_of(c)


@router.get("/admin/audit", response_model=list[AuditOut])
def get_audit(
    c: Ctx, who: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[AuditOut]:
    with Session(c.engine) as s:
        return queries.recent_audit(s, limit)
