"""/healthz and /metrics, for load balancers, systemd and Prometheus."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from triaged.web import metrics
from triaged.web.api import health_of
from triaged.web.deps import WebContext, ctx, ops_allowed
from triaged.web.schemas import HealthOut

router = APIRouter(tags=["operations"])
Ctx = Annotated[WebContext, Depends(ctx)]


@router.get(
    "/healthz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "a check failed"}},
)
def healthz(request: Request, c: Ctx) -> JSONResponse:
    """Database reachable, spool above its threshold, SCP listening, scheduler running,
    live model loaded: 200 when all hold, 503 otherwise."""
    ops_allowed(request, c.settings.web.open_health)
    out = health_of(c)
    return JSONResponse(
        out.model_dump(mode="json"),
        status_code=200 if out.ok else 503,
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
def get_metrics(request: Request, c: Ctx) -> Response:
    """Prometheus text format, computed from the database (all processes agree)."""
    ops_allowed(request, c.settings.web.open_metrics)
    return Response(metrics.render(c.engine, c.status), media_type=CONTENT_TYPE_LATEST)
