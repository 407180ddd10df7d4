"""The arena (`/`), the dashboard (`/dashboard`) and the API docs (`/docs`): pages served by the gateway itself.

No CDN and no build step: plain HTML, CSS and JavaScript in deploy/app/web/, charts drawn as SVG by
deploy/app/web/charts.js. The pages call the public API with a key the user enters in their settings, which
lives in this origin's storage: so no page of this origin loads code from another. Swagger UI's files come from
the fastapi-offline wheel and are served under /docs/assets, its one inline script allowed by its hash. Every
response here carries the same security headers (`/static/*` too).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

WEB = Path(__file__).parent / "web"
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
"""Swagger UI's JavaScript, CSS and icon, as the fastapi-offline wheel ships them."""
# Everything from this origin, nothing from elsewhere: the pages work offline and load no third-party code.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class SecureStaticFiles(StaticFiles):
    """StaticFiles whose every response carries HEADERS."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def docs_page(openapi_url: str = "/openapi.json") -> tuple[str, dict[str, str]]:
    """Swagger UI's page over this server's assets, and its headers: the CSP admits its inline script by hash."""
    body = get_swagger_ui_html(
        openapi_url=openapi_url,
        title="pairloop API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon.png",
        oauth2_redirect_url=None,
    ).body
    html = bytes(body).decode()
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.S)
    ]
    csp = (
        f"default-src 'self'; script-src 'self' {' '.join(hashes)}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'"
    )
    return html, HEADERS | {"Content-Security-Policy": csp}


_DOCS = docs_page()


@router.get("/")
async def arena() -> FileResponse:
    return FileResponse(WEB / "arena.html", headers=HEADERS)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    return FileResponse(WEB / "dashboard.html", headers=HEADERS)


@router.get("/docs")
async def api_docs() -> HTMLResponse:
    html, headers = _DOCS
    return HTMLResponse(html, headers=headers)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/docs/assets", SecureStaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount("/static", SecureStaticFiles(directory=WEB), name="static")
