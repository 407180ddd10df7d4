"""The app's services: one typed object per package, held by one `Services` per app, reached through dependencies.

The gateway's lifespan builds its `Gateway`; each later stage (the feedback API, the loop's admin API) adds an
object of its own class, and its routes ask for it by that class (`Depends(service(Feedback))`). What a route
receives is typed end to end: renaming a service or one of its fields on one side only fails mypy, where a
string attribute of `app.state` would fail at run time. `app.state` holds the `Services` and nothing else, and
only `services_of` names it. deploy/app/gateway.py is where the objects are put together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from redis.asyncio import Redis

from serving.adapters.router import AdapterRouter
from serving.auth import KeyRing
from serving.chat import ChatService
from serving.metrics import Metrics
from serving.ratelimit import RateLimiter
from serving.redis_memory import RedisMemory
from serving.settings import ServingSettings

T = TypeVar("T")


class ServiceMissing(RuntimeError):
    """A route asked for a service the app was not given (a stage left out where the app is put together)."""


class Services:
    """One object per class: `add` once, `get` by the class."""

    def __init__(self) -> None:
        self._objects: dict[type, object] = {}

    def add(self, obj: object) -> None:
        kind = type(obj)
        if kind in self._objects:
            raise ValueError(f"{kind.__name__} was added to this app already")
        self._objects[kind] = obj

    def remove(self, kind: type) -> None:
        self._objects.pop(kind, None)

    def get(self, kind: type[T]) -> T:
        try:
            obj = self._objects[kind]
        except KeyError:
            raise ServiceMissing(f"this app has no {kind.__name__} (not started, or not part of it)") from None
        assert isinstance(obj, kind)
        return obj


def services_of(app: FastAPI) -> Services:
    """The app's services (made with the app by `serving.app.create_app`)."""
    services: Services = app.state.services
    return services


def service(kind: type[T]) -> Any:
    """A dependency on the app's `kind` service: `Annotated[Feedback, service(Feedback)]`."""

    def get(request: Request) -> T:
        return services_of(request.app).get(kind)

    dependency: Callable[[Request], T] = get
    return Depends(dependency)


@dataclass(frozen=True)
class Gateway:
    """What the gateway runs on, built once in its lifespan: the other packages' stages start from it."""

    settings: ServingSettings
    metrics: Metrics
    keyring: KeyRing
    redis: Redis
    limiter: RateLimiter
    memory: RedisMemory
    chat: ChatService
    adapters: AdapterRouter
