"""A truthful OpenAPI document: valid, every reference resolvable, the bearer scheme declared, every error status a
route can answer documented in OpenAI's shape; and a property-based fuzzer (Schemathesis) over every route of a
live, throwaway service (state-changing admin routes included) finds no 5xx and no answer its document does not
describe. The fuzzer's examples are bounded and derandomized (a fixed seed), so every run sends the same requests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from deploy.app.gateway import build_app
from deploy.local.engine import EngineProcess
from deploy.migrations import upgrade
from serving.middleware import PROTECTED_PREFIXES
from serving.settings import ServingSettings
from tests.gateway_helpers import KEYS, SECRET, GatewayFactory, feedback_settings

ADMIN = {"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"}
EXAMPLES = 12
"""Examples per operation: about 200 requests in all, a minute or two on two cores (derandomized: the same ones
every run)."""


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app: FastAPI = build_app(
        ServingSettings(
            data_dir=tmp_path_factory.mktemp("openapi"),
            redis_url="redis://127.0.0.1:1/0",
            secret=SECRET,
            api_keys=list(KEYS.values()),
            vllm_urls=["http://127.0.0.1:1"],
        )
    )
    return app.openapi()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_the_document_is_valid_openapi_and_every_reference_resolves(document: dict[str, Any]) -> None:
    from openapi_spec_validator import validate

    validate(document)
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)))
    assert refs and all(r.startswith("#/components/schemas/") for r in refs), refs
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)
    assert "$defs" not in json.dumps(document["paths"])
    assert "HTTPValidationError" not in schemas, "FastAPI's {detail} body is not what this server sends"


def test_auth_is_a_security_scheme_not_a_header_parameter(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }
    for method, path, op in operations(document):
        names = [p["name"].lower() for p in op.get("parameters", [])]
        assert "authorization" not in names, f"{method} {path}"
        protected = path.startswith(PROTECTED_PREFIXES)
        assert (op.get("security") == [{"bearer": []}]) == protected, f"{method} {path}"
        if protected:
            assert {"401", "403"} <= set(op["responses"]), f"{method} {path}"


def test_every_error_is_documented_in_openais_shape(document: dict[str, Any]) -> None:
    expected = {
        ("post", "/v1/chat/completions"): {"400", "401", "403", "404", "413", "422", "429", "500", "503"},
        ("post", "/v1/feedback"): {"400", "401", "403", "404", "409", "410", "413", "422", "429", "500", "503"},
        ("post", "/admin/adapters/{name}/promote"): {"400", "401", "403", "404", "409", "500", "502", "503"},
        ("post", "/admin/adapters/rollback"): {"401", "403", "409", "500", "502", "503"},
        ("post", "/admin/train"): {"401", "403", "409", "500", "503"},
    }
    for method, path, op in operations(document):
        codes = {c for c in op["responses"] if int(c) >= 400}
        assert expected.get((method, path), set()) <= codes, f"{method} {path}: {sorted(codes)}"
        for code in codes:
            response = op["responses"][code]
            assert response["description"], f"{method} {path} {code}: say what the refusal means"
            if path != "/readyz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, f"{method} {path} {code}"
            if code in ("429", "503"):
                assert "Retry-After" in response["headers"], f"{method} {path} {code}"


@pytest.mark.slow
def test_the_fuzzer_finds_no_5xx_and_nothing_undocumented(
    make_gateway: GatewayFactory, engine: EngineProcess, rdb: redis.Redis, tmp_path: Path
) -> None:
    """Every operation of a throwaway service (real vLLM, Redis and store; short answers so its chats are quick),
    fuzzed with Schemathesis' every default check: no 5xx, a documented status, content type, headers and body
    schema, invalid data refused. Left out: that every valid-looking request succeeds (a random completion id
    names nothing that was served, so a 404 there is right)."""
    upgrade(feedback_settings(tmp_path).store_url())  # the gateway's store, as `pairloop up` migrates it
    gw = make_gateway([engine.url], max_tokens_limit=8, retry_after_s=1)
    schema = schemathesis.openapi.from_url(f"{gw.url}/openapi.json")
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=ADMIN, excluded_checks=[positive_data_acceptance], timeout=60)

        fuzz()
        tested.append(operation.label)
    rdb.flushdb()  # the rounds POST /admin/train queued
    assert len(tested) == sum(1 for _ in operations(schema.raw_schema)), tested
