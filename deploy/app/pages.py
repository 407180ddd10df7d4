"""The arena (`/`) and the dashboard (`/dashboard`): static pages served by the gateway itself.

No CDN and no build step: plain HTML, CSS and JavaScript in deploy/app/web/, charts drawn as SVG by
deploy/app/web/charts.js. The pages call the public API with a key the user enters in their settings.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"
# Everything from this origin, nothing from elsewhere: the pages work offline and load no third-party code.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def arena() -> FileResponse:
    return FileResponse(WEB / "arena.html", headers=HEADERS)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    return FileResponse(WEB / "dashboard.html", headers=HEADERS)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
