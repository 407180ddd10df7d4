"""deploy/compose.yaml read as Compose reads it: YAML with anchors and merge keys, then `${VAR}` interpolation
(`${VAR:-default}`, `${VAR:?message}`, `$$`). Used by tests/test_shipping.py and tests/cluster_helpers.py, which
runs the file's pairloop services as processes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "compose.yaml"
ENV_EXAMPLE = COMPOSE.parent / "pairloop.env.example"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-?])([^}]*))?\}")


def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """`value` with every `${…}` replaced as Compose does; a missing `${VAR:?msg}` raises KeyError(msg)."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, kind, arg = m.group(1), m.group(2), m.group(3)
        if variables.get(name):
            return variables[name]
        if kind == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if kind == "-" else variables.get(name, "")

    return _VAR.sub(sub, value)


def env_example() -> dict[str, str]:
    """The variables of deploy/pairloop.env.example (what a user copies and fills in)."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value
    return out


def load(variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file interpolated with `variables` (default: the example env file)."""
    data: dict[str, Any] = interpolate(raw(), env_example() if variables is None else variables)
    return data


def pairloop_services(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the pairloop image (their `command` is a `pairloop` command line)."""
    return {name: s for name, s in data["services"].items() if str(s.get("image", "")).startswith("pairloop:")}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def acl_users(command: list[str]) -> dict[str, list[str]]:
    """The ACL users a `valkey-server` command line declares (`--user NAME RULE…`, up to the next `--option`):
    each name's rules, password included."""
    users: dict[str, list[str]] = {}
    for i, arg in enumerate(command):
        if arg == "--user":
            rest = command[i + 2 :]
            end = next((j for j, a in enumerate(rest) if a.startswith("--")), len(rest))
            users[command[i + 1]] = rest[:end]
    return users


def valkey_users(data: Mapping[str, Any]) -> dict[str, list[str]]:
    """The ACL users the `valkey` service declares (`acl_users` of its command)."""
    return acl_users(list(data["services"]["valkey"]["command"]))
