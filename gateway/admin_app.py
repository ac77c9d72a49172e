"""The admin listener: /metrics /healthz /readyz /admin/clients/{id}.

A separate listener (127.0.0.1 by default) so the proxy port never exposes
operational data and the admin port never counts against rate limits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway.limiting.store import BucketSnapshot

__all__ = ["AdminView", "build_admin_app"]


class AdminView(Protocol):
    """What the admin listener reads: a single-process Server, or the
    workers' Supervisor."""

    @property
    def metrics_registry(self) -> CollectorRegistry: ...

    def background_parts(self) -> dict[str, Callable[[], bool]]: ...

    def readiness(self) -> dict[str, bool]: ...

    def servers_down(self) -> list[str]: ...

    async def client_buckets(self, client: str) -> list[BucketSnapshot]: ...


def _json(status: int, body: object) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body, indent=1), content_type="application/json"
    )


def build_admin_app(server: AdminView) -> web.Application:
    """The admin listener: /metrics, /healthz, /readyz, /admin/clients/{id}."""

    async def healthz(request: web.Request) -> web.Response:
        parts: dict[str, Callable[[], bool]] = server.background_parts()
        states = {name: "alive" if alive() else "dead" for name, alive in parts.items()}
        dead = [name for name, state in states.items() if state == "dead"]
        if dead:
            return _json(503, {"status": "unhealthy", "dead": dead, "parts": states})
        return _json(200, {"status": "ok", "parts": states})

    async def readyz(request: web.Request) -> web.Response:
        checks = server.readiness()
        ready = all(checks.values())
        body: dict[str, object] = {"ready": ready, "checks": checks}
        down = server.servers_down()
        if down:
            # The default upstream's servers marked down (all of them, when
            # upstream_available is false).
            body["servers_down"] = down
        return _json(200 if ready else 503, body)

    async def client(request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        buckets = await server.client_buckets(client_id)
        return _json(200, {"client": client_id, "buckets": [asdict(b) for b in buckets]})

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(server.metrics_registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # ".+": an IPv6 client is a network, "2001:db8:1:2::/64"
    app.router.add_get("/admin/clients/{client_id:.+}", client)
    return app
