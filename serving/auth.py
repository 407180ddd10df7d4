"""API keys with scopes, sent as `Authorization: Bearer <key>`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from serving.errors import Forbidden, Unauthorized
from serving.settings import ALL_SCOPES, ApiKey, Scope

ANONYMOUS_ID = "local"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (never its secret) and what it may do."""

    key_id: str
    scopes: frozenset[str]

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"This API key ('{self.key_id}') lacks the '{scope}' scope.")


class KeyRing:
    """Looks keys up by a SHA-256 of the secret: the lookup's timing says nothing about the secret itself."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_digest = {self._digest(k.key.get_secret_value()): Principal(k.id, frozenset(k.scopes)) for k in keys}

    @staticmethod
    def _digest(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    @property
    def open(self) -> bool:
        """No keys configured: every caller is the local anonymous principal (loopback-only mode)."""
        return not self._by_digest

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return Principal(ANONYMOUS_ID, frozenset(ALL_SCOPES))
        if not authorization:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
        principal = self._by_digest.get(self._digest(secret.strip()))
        if principal is None:
            raise Unauthorized("Incorrect API key provided.")
        return principal
