"""Feedback tokens: an HMAC that binds a completion id, the API key id it was served to, and an expiry.

The gateway hands one out with every completion; feedback must bring it back. A token cannot be forged
without the server secret, cannot be moved to another completion or another key, and stops working at
its expiry. It is stateless: any gateway replica with the same secret can check it. A secret is rotated by
verifying with the current and the previous one (`PAIRLOOP_SECRET_PREVIOUS`) while tokens signed with the
previous one can still be valid; new tokens are always signed with the current one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

_VERSION = "v1"


class TokenError(Exception):
    """The token is malformed, forged, expired, or made for another completion or key."""


@dataclass(frozen=True)
class TokenClaims:
    completion_id: str
    key_id: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, f"{_VERSION}.{payload}".encode(), hashlib.sha256).digest())


def issue(secret: bytes, completion_id: str, key_id: str, expires_at: int) -> str:
    """A token for `completion_id` served to `key_id`, valid until `expires_at` (Unix seconds)."""
    payload = _b64(json.dumps({"cid": completion_id, "kid": key_id, "exp": expires_at}).encode())
    return f"{_VERSION}.{payload}.{_sign(secret, payload)}"


def verify(
    secret: bytes | tuple[bytes, ...], token: str, *, completion_id: str, key_id: str, now: float | None = None
) -> TokenClaims:
    """The token's claims, if it is genuine (signed with `secret`, or one of several during a rotation),
    unexpired and made for this completion and key."""
    try:
        token.encode()
    except UnicodeEncodeError:  # a lone surrogate: not text that could be checked at all
        raise TokenError("malformed feedback token") from None
    try:
        version, payload, signature = token.split(".")
    except ValueError:
        raise TokenError("malformed feedback token") from None
    candidates = (secret,) if isinstance(secret, bytes) else secret
    # compare_digest on bytes: on str it raises TypeError for non-ASCII text (a 500 instead of a 403). Every
    # candidate is compared (no early exit), so the time taken does not say which secret signed it.
    matches = [hmac.compare_digest(signature.encode(), _sign(s, payload).encode()) for s in candidates]
    if version != _VERSION or not any(matches):
        raise TokenError("feedback token signature does not verify")
    try:
        data = json.loads(_unb64(payload))
        claims = TokenClaims(str(data["cid"]), str(data["kid"]), int(data["exp"]))
    except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: an expiry of 1e400 (infinity)
        raise TokenError("malformed feedback token") from None
    if claims.completion_id != completion_id:
        raise TokenError("feedback token was issued for another completion")
    if claims.key_id != key_id:
        raise TokenError("feedback token was issued to another API key")
    if claims.expires_at < (time.time() if now is None else now):
        raise TokenError("feedback token has expired")
    return claims
