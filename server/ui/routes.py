"""The dashboard's pages: server-rendered HTML under /ui, charts as inline SVG, no build step."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from server.api.deps import Db, ServicesDep
from server.auth import Principal
from server.errors import ApiError, Forbidden, NotFound, Unauthorized
from server.ui import charts, queries
from server.ui.auth import COOKIE, COOKIE_PATH, HOME, check_token, login_form, safe_next, viewer

HERE = Path(__file__).parent
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}
HEADERS = {
    # everything the pages load is ours; inline SVG is markup, not an image, so no img-src is needed
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(ago=ago, num=charts.fmt, px=lambda value: f"{value:.1f}")
templates.env.globals.update(charts=charts)


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=HEADERS)


class UiRoute(APIRoute):
    """Errors become pages: a missing or weak token gets the sign-in form, a missing row a 404 page
    (the API's handlers would answer JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def render_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except (Unauthorized, Forbidden) as exc:
                return page(request, "login.html", exc.status_code, error=exc.detail,
                            next=safe_next(request.url.path + (f"?{request.url.query}" if request.url.query else "")))
            except RequestValidationError:
                return page(request, "error.html", 404, message="no such page")
            except ApiError as exc:
                return page(request, "error.html", exc.status_code, message=exc.detail)

        return render_errors


router = APIRouter(prefix="/ui", route_class=UiRoute, include_in_schema=False)
Viewer = Annotated[Principal, Depends(viewer)]


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse(HOME, status_code=302)


@router.get("/login")
def login_page(request: Request, next: str = HOME) -> Response:
    return page(request, "login.html", next=safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    token, target = await login_form(request)
    await check_token(request, token)  # a bad token re-renders the form (UiRoute)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


@router.get("/devices")
def devices_page(request: Request, session: Db, _: Viewer) -> Response:
    rows = queries.devices(session)
    return page(request, "devices.html", nav="devices", farm=[d for d in rows if d.source != "imported"],
                reference=[d for d in rows if d.source == "imported"])


@router.get("/devices/{name:path}")
def device_page(request: Request, name: str, session: Db, services: ServicesDep, _: Viewer) -> Response:
    device = queries.device(session, name)
    if device is None:
        raise NotFound(f"no device {name!r}")
    drift = services.settings.canary_drift
    canary = charts.canary([run.median_ms for run in device.canary],
                           [f"job {run.job_id}: {run.median_ms:.3f} ms{'' if run.valid else ' (flagged)'}"
                            for run in device.canary],
                           [not run.valid for run in device.canary], device.canary_baseline_ms, drift
                           ) if device.canary else None
    histograms = {space: (charts.histogram(values, "median latency (ms)"), len(values), median(values))
                  for space, values in queries.latencies_by_space(session, name).items()}
    return page(request, "device.html", nav="devices", device=device, canary=canary, drift=drift,
                histograms=histograms, agents=queries.device_agents(session, name),
                jobs=queries.device_jobs(session, name), predictors=queries.predictors(session, name))


@router.get("/jobs")
def jobs_page(request: Request, session: Db, _: Viewer) -> Response:
    return page(request, "jobs.html", nav="jobs", counts=queries.job_counts(session), queue=queries.queue(session),
                failures=queries.failures(session), finished=queries.finished(session))


@router.get("/predictors")
def predictors_page(request: Request, session: Db, _: Viewer) -> Response:
    return page(request, "predictors.html", nav="predictors", predictors=queries.predictors(session))


@router.get("/predictors/{predictor_id}")
def predictor_page(request: Request, predictor_id: int, session: Db, _: Viewer) -> Response:
    row = queries.predictor(session, predictor_id)
    if row is None:
        raise NotFound(f"no predictor {predictor_id}")
    points, curve = row.points, row.curve
    return page(request, "predictor.html", nav="predictors", predictor=row,
                scatter=charts.scatter(points) if points else None,
                curve=charts.curve([k for k, _ in curve], [r for _, r in curve]) if curve else None)
