"""The local attack surface: the same security headers on every page, API docs with no third-party origin, the
caller authenticated before a body is read, and the data dir readable by its owner only."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from deploy.app.gateway import build_app
from serving.middleware import PROTECTED_PREFIXES
from serving.settings import ServingSettings
from tests.gateway_helpers import KEYS, SECRET

PAGES = ["/", "/dashboard", "/static/arena.html", "/static/dashboard.html", "/docs"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    settings = ServingSettings(
        data_dir=tmp_path_factory.mktemp("hardening"),
        redis_url="redis://127.0.0.1:1/0",
        secret=SECRET,
        api_keys=list(KEYS.values()),
        vllm_urls=["http://127.0.0.1:1"],
    )
    return build_app(settings)


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    """The app without its lifespan (no Redis, no vLLM): middleware, pages and static files only."""
    yield TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_carries_the_security_headers(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"


def test_static_files_carry_them_too(client: TestClient) -> None:
    for path in ("/static/charts.js", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert resp.headers["x-content-type-options"] == "nosniff", path
        assert resp.headers["referrer-policy"] == "no-referrer", path


def test_the_api_docs_load_nothing_from_another_origin(client: TestClient) -> None:
    resp = client.get("/docs")
    html = resp.text
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert refs, "the page names its assets"
    assert all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    assert "cdn" not in html.lower()
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    # Its one inline script runs because the CSP names its hash, and no other inline script would.
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    csp = resp.headers["content-security-policy"]
    assert f"script-src 'self' 'sha256-{digest}'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert client.get("/docs/oauth2-redirect").status_code == 404
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("POST", "/v1/feedback"), ("POST", "/admin/train"), ("GET", "/v1/models")],
)
def test_the_caller_is_known_before_the_body_is_read(client: TestClient, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-not-a-key-0123456789"}, {"Authorization": "Basic x"}):
        resp = client.request(
            method, path, content=b'{"model": ', headers=headers | {"content-type": "application/json"}
        )
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_every_route_that_takes_a_key_is_under_a_protected_prefix(app: FastAPI) -> None:
    def takes_key(route: APIRoute) -> bool:
        stack = list(route.dependant.dependencies)
        while stack:
            dep = stack.pop()
            if "require" in getattr(dep.call, "__qualname__", ""):
                return True
            stack += dep.dependencies
        return False

    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert len(routes) > 15
    for route in routes:
        protected = route.path.startswith(PROTECTED_PREFIXES)
        assert takes_key(route) == protected, f"{route.path}: key {takes_key(route)}, protected prefix {protected}"


def test_the_data_dir_is_its_owners_only(tmp_path: Path) -> None:
    from deploy.local.secrets import secure_data_dir

    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "old.log").write_text("x")
    data.chmod(0o755)
    (data / "logs" / "old.log").chmod(0o644)
    secure_data_dir(data)
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / "logs" / "old.log").stat().st_mode & 0o077 == 0
    # Every pairloop command creates files for its owner only (here: the SQLite store of `db upgrade`).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")} | {"PAIRLOOP_DATA_DIR": str(data)}
    subprocess.run([sys.executable, "-m", "deploy", "db", "upgrade"], env=env, check=True, capture_output=True)
    assert (data / "pairloop.db").stat().st_mode & 0o077 == 0
