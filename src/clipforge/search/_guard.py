"""ASGI middleware in front of every route: body size limit, safety headers and request metrics."""
from __future__ import annotations

import json
import time

from starlette.routing import Match

from ._inputs import RequestError

KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}  # others count as "other"
SAFETY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _host_name(host_header: bytes) -> str:
    """``b"localhost:1234"`` -> ``"localhost"``; ``b"[::1]:1234"`` -> ``"[::1]"``."""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


class GuardMiddleware:
    """Refuses bodies over ``max_body`` bytes (413), adds nosniff headers, times each request.

    With ``allowed_hosts`` (the loopback names when bound to 127.0.0.1), a request whose ``Host``
    header names anything else gets 400: a web page that re-points its own domain at 127.0.0.1
    (DNS rebinding) cannot read the collection through the visitor's browser.

    A declared ``Content-Length`` over the limit is answered before the body is read; a streamed
    body is counted as it arrives and stops the route with a 413 once it passes the limit. Metrics
    are labelled by route template (``/thumb/{id}``), never the raw path, so they stay bounded.
    """

    def __init__(self, app, metrics, routes, max_body: int, allowed_hosts: tuple = ()):
        self.app = app
        self.allowed_hosts = set(allowed_hosts)
        self.metrics = metrics
        self.routes = routes
        self.max_body = max_body

    def _route_name(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]
        received = [0]

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body:
                    raise RequestError(f"request body is over the limit of {self.max_body} bytes", 413)
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) + SAFETY_HEADERS}
            await send(message)

        try:
            headers = dict(scope.get("headers", []))
            if self.allowed_hosts and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
                await self._refuse(guarded_send, 400, "unexpected Host header: this server answers "
                                   + ", ".join(sorted(self.allowed_hosts)) + " only")
                return
            declared = headers.get(b"content-length")
            if declared is not None and not declared.isdigit():
                await self._refuse(guarded_send, 400, "Content-Length must be a number of bytes")
                return
            if declared is not None and int(declared) > self.max_body:
                await self._refuse(guarded_send, 413, f"request body is over the limit of {self.max_body} bytes")
                return
            await self.app(scope, counted_receive, guarded_send)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.observe_request(self._route_name(scope), method, status[0],
                                         time.perf_counter() - started)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
