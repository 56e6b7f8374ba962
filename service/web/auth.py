"""Who may post signals and call admin endpoints. Comparisons are constant-time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Sequence

__all__ = [
    "SIGNATURE_HEADER",
    "admin_ok",
    "body_secret_ok",
    "ip_allowed",
    "secret_ok",
    "signature_ok",
]

# TradingView cannot set headers, so the shared secret in the body is the usual
# way; other senders may sign the raw body instead: X-Signature: sha256=<hex>.
SIGNATURE_HEADER = "X-Signature"


def _utf8(text: str) -> bytes:
    # Header values carry undecodable bytes as surrogates, JSON may hold lone ones: never raise.
    return text.encode("utf-8", "surrogatepass")


def secret_ok(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(_utf8(given), _utf8(expected))


def signature_ok(body: bytes, header: str, secret: str) -> bool:
    algo, _, digest = header.strip().partition("=")
    if algo.lower() != "sha256" or not digest:
        return False
    expected = hmac.new(_utf8(secret), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(_utf8(digest.strip().lower()), expected.encode())


def body_secret_ok(body: bytes, secret: str) -> bool:
    """For a body that failed validation: does it at least carry the right secret?
    Decides between 401 (unknown sender) and 400 (our sender, bad signal)."""
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and secret_ok(data.get("secret"), secret)


def admin_ok(authorization: str | None, token: str | None) -> bool:
    if not token or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and secret_ok(given.strip(), token)


def ip_allowed(
    remote: str | None, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(address in net for net in networks)
