"""The access token: a server bound to loopback is reachable only from this machine and needs none; bound to
any other address, every request must carry the token or get 401.

The token is accepted three ways, because three kinds of client call: `Authorization: Bearer T` (API
clients), `?token=T` (EventSource and <img> cannot set headers; the address the server prints opens the page
this way), and the `edge_token` cookie that such a request sets (HttpOnly, SameSite=Strict), so the page's
own scripts, styles and images load without the token in every address.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

COOKIE = "edge_token"
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """True only if every address `host` names is a loopback address (unresolvable: False, so a token is
    required: the safe side)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def new_token() -> str:
    return secrets.token_urlsafe(18)


class TokenAuth:
    """ASGI middleware: 401 for any HTTP request without the token (CORS preflights are answered outside it)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        given = [_bearer(headers.get("authorization")), query, _cookie(headers.get("cookie"))]
        if not any(g is not None and secrets.compare_digest(g.encode(), self.token.encode()) for g in given):
            return await _refuse(send)
        if query is None:
            return await self.app(scope, receive, send)

        async def with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, with_cookie)


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _cookie(value: str | None) -> str | None:
    if not value:
        return None
    jar = SimpleCookie()
    try:
        jar.load(value)
    except Exception:  # a malformed Cookie header is no token, not a server error
        return None
    return jar[COOKIE].value if COOKIE in jar else None


async def _refuse(send) -> None:
    message = ("access token required: this server is reachable from the network; send 'Authorization: Bearer "
               "TOKEN' or add ?token=TOKEN (edge serve printed the token at start, or was given --token)")
    body = json.dumps({"error": message, "detail": message}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
