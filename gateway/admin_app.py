"""The admin listener: /metrics /healthz /readyz, the JSON views behind the
dashboard (/admin/stats, /admin/clients, /admin/clients/{id}) and the
dashboard page itself (/).

A separate listener (127.0.0.1 by default) so the proxy port never exposes
operational data and the admin port never counts against rate limits. Every
view reads what the process keeps anyway (counters, the top-denied sketch,
the buckets of the clients it names): no scan of the bucket table, and no
history kept here; the page keeps its own 15 minutes of samples.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import fields
from importlib import resources
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import Metric

from gateway.errors import StorageError
from gateway.limiting.store import BucketSnapshot
from gateway.metrics import DECISIONS, UPSTREAM_ERROR_KINDS
from gateway.top_clients import TopClients

__all__ = [
    "DEFAULT_TOP",
    "AdminView",
    "build_admin_app",
    "denied_clients",
    "request_stats",
]

# Clients listed by /admin/clients (overall and per route) unless ?top= says.
DEFAULT_TOP: Final = 10
# A listed client's tokens are read on the routes it was denied on most, at
# most this many: a bound on the store reads (redis calls) of one answer.
MAX_TOKEN_ROUTES: Final = 5
# The dashboard's files, shipped as package data: path -> (file, content type).
_DASHBOARD_FILES: Final = {
    "/": ("index.html", "text/html"),
    "/dashboard/app.js": ("app.js", "text/javascript"),
    "/dashboard/app.css": ("app.css", "text/css"),
}
# Same-origin only: the page loads nothing from elsewhere and cannot be framed.
_DASHBOARD_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}


class AdminView(Protocol):
    """What the admin listener reads: a single-process Server, or the
    workers' Supervisor."""

    @property
    def metrics_registry(self) -> CollectorRegistry: ...

    @property
    def workers(self) -> int: ...

    def background_parts(self) -> dict[str, Callable[[], bool]]: ...

    def readiness(self) -> dict[str, bool]: ...

    def route_labels(self) -> list[str]:
        """The config's route labels in matching order, then ``default``."""
        ...

    def request_metrics(self) -> Iterable[Metric]:
        """At least the families of gateway_requests_total,
        gateway_upstream_errors_total, gateway_inflight_requests and
        gateway_clients_tracked, summed over the instance's processes."""
        ...

    async def top_denied(self) -> TopClients:
        """The instance's top-denied sketches (every worker's, merged)."""
        ...

    def normalised_id(self, client: str) -> tuple[str, str]:
        """A client id as typed, as requests key it, and its network ("" when
        unknown): see ClientIdentifier.normalised_id."""
        ...

    async def client_buckets(
        self, client: str, ip: str, routes: Collection[str] | None = None
    ) -> list[BucketSnapshot]:
        """See Limiter.client_buckets; raises StorageError when the store
        cannot be read."""
        ...

    def servers_down(self) -> list[str]:
        """The default upstream's servers marked down ("host:port")."""
        ...


def _json(status: int, body: object, *, compact: bool = False) -> web.Response:
    """``compact``: for the answers that grow with routes and clients; json's
    indenting encoder is pure Python, several times slower than its C one,
    and it runs on the proxy's event loop."""
    text = json.dumps(body) if compact else json.dumps(body, indent=1)
    return web.Response(status=status, text=text, content_type="application/json")


# -- /admin/stats --


def request_stats(view: AdminView) -> dict[str, Any]:
    """Counters since start, per route in matching order: the page turns two
    samples into rates. Reads the counters the processes keep; the cost
    follows routes x decisions, not clients."""
    decisions: dict[str, dict[str, int]] = {}
    errors: dict[str, dict[str, int]] = {}
    gauges = {"gateway_inflight_requests": 0.0, "gateway_clients_tracked": 0.0}
    for family in view.request_metrics():
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "gateway_requests_total":
                per_route = decisions.setdefault(labels["route"], dict.fromkeys(DECISIONS, 0))
                per_route[labels["decision"]] = int(sample.value)
            elif name == "gateway_upstream_errors_total":
                kinds = errors.setdefault(
                    labels["route"], dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
                )
                kinds[labels["kind"]] = int(sample.value)
            elif name in gauges:
                gauges[name] += sample.value
    labels_in_order = list(dict.fromkeys(view.route_labels()))
    # Routes a reload removed still have counts: after the configured ones.
    labels_in_order += sorted(set(decisions) - set(labels_in_order))
    routes: list[dict[str, Any]] = [
        {
            "route": label,
            "decisions": decisions.get(label, dict.fromkeys(DECISIONS, 0)),
            "upstream_errors": errors.get(label, dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)),
        }
        for label in labels_in_order
    ]
    return {
        "time": round(time.time(), 3),
        "workers": view.workers,
        "inflight": int(gauges["gateway_inflight_requests"]),
        "clients_tracked": int(gauges["gateway_clients_tracked"]),
        "totals": {
            "decisions": {d: sum(r["decisions"][d] for r in routes) for d in DECISIONS},
            "upstream_errors": {
                k: sum(r["upstream_errors"][k] for r in routes) for k in UPSTREAM_ERROR_KINDS
            },
        },
        "routes": routes,
    }


# -- /admin/clients --


def denied_clients(top: TopClients, now: float, n: int) -> dict[str, Any]:
    """The ``n`` clients denied most over the window ending at ``now``
    (``time.monotonic()``), overall and per route, with the sketch's error
    bounds; without tokens (``_add_tokens`` looks those up)."""
    overall = top.overall.window(now)
    by_route = {
        label: window
        for label in top.routes
        if (window := top.route_window(label, now)) is not None and window.total
    }
    clients = []
    for client, count, error in overall.top(n):
        routes = {}
        for label, window in by_route.items():
            if client in window:
                routes[label] = window.estimate(client)[0]
        clients.append(
            {
                "client": client,
                "denied": count,
                "error": error,
                "routes": dict(sorted(routes.items(), key=lambda item: -item[1])),
                "allowed": None,
            }
        )
    routes_out = [
        {
            "route": label,
            "denied_total": window.total,
            "clients": [
                {"client": c, "denied": count, "error": error}
                for c, count, error in window.top(n)
            ],
        }
        for label, window in sorted(by_route.items(), key=lambda item: -item[1].total)
    ]
    return {
        "window_seconds": top.sub_window_seconds * top.sub_windows,
        "sub_window_seconds": top.sub_window_seconds,
        "counters": top.k,
        "denied_total": overall.total,
        "allowed_counted": False,
        "routes_overflow": top.routes_overflow,
        "clients": clients,
        "routes": routes_out,
    }


async def _add_tokens(view: AdminView, answer: dict[str, Any]) -> None:
    """Each listed client's buckets on the routes it was denied on most
    (``MAX_TOKEN_ROUTES``); the clients' lookups run together."""

    async def look(entry: dict[str, Any]) -> None:
        routes = set(list(entry["routes"])[:MAX_TOKEN_ROUTES])
        client, ip = view.normalised_id(entry["client"])
        try:
            buckets = await view.client_buckets(client, ip, routes) if routes else []
        except StorageError as exc:
            entry["buckets"] = None
            answer["storage_error"] = str(exc)
            return
        entry["buckets"] = [_bucket_json(b) for b in buckets]

    await asyncio.gather(*(look(entry) for entry in answer["clients"]))


def _bucket_json(bucket: BucketSnapshot) -> dict[str, Any]:
    # dataclasses.asdict deep-copies field by field: 20 times slower.
    return {name: getattr(bucket, name) for name in _BUCKET_FIELDS}


_BUCKET_FIELDS: Final = tuple(f.name for f in fields(BucketSnapshot))


def _top_parameter(request: web.Request, most: int) -> int:
    text = request.query.get("top")
    if text is None:
        return min(DEFAULT_TOP, most)
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "bad_request", "detail": f"top must be 1 to {most}"}),
            content_type="application/json",
        )
    return int(text)


# -- the app --


def _dashboard_handler(name: str, content_type: str) -> Any:
    body = resources.files("gateway").joinpath("dashboard", name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=_DASHBOARD_HEADERS
        )

    return serve


def build_admin_app(server: AdminView) -> web.Application:
    """The admin listener (see the module docstring)."""

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

    async def stats(request: web.Request) -> web.Response:
        return _json(200, request_stats(server), compact=True)

    async def clients(request: web.Request) -> web.Response:
        top = await server.top_denied()
        answer = denied_clients(top, time.monotonic(), _top_parameter(request, top.k))
        answer["workers"] = server.workers
        await _add_tokens(server, answer)
        return _json(200, answer, compact=True)

    async def client(request: web.Request) -> web.Response:
        typed = request.match_info["client_id"]
        client_id, ip = server.normalised_id(typed)
        try:
            buckets = await server.client_buckets(client_id, ip)
        except StorageError as exc:
            return _json(503, {"client": typed, "error": "storage", "detail": str(exc)})
        tracked = any(b.held for b in buckets)
        window = (await server.top_denied()).overall.window(time.monotonic())
        count, error = window.estimate(client_id)
        body: dict[str, Any] = {
            "client": typed,
            "id": client_id,
            "tracked": tracked,
            # Over the last 5 minutes; null when the sketch holds no counter
            # for this id (never denied, or less than every client it holds).
            "denied": {"count": count, "error": error} if client_id in window else None,
            "buckets": [_bucket_json(b) for b in buckets] if tracked else [],
        }
        return _json(200 if tracked else 404, body)

    app = web.Application()
    for path, (name, content_type) in _DASHBOARD_FILES.items():
        app.router.add_get(path, _dashboard_handler(name, content_type))
    app.router.add_get("/metrics", make_aiohttp_handler(server.metrics_registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/stats", stats)
    app.router.add_get("/admin/clients", clients)
    app.router.add_get("/admin/clients/", clients)
    # ".+": an IPv6 client is a network, "2001:db8:1:2::/64"
    app.router.add_get("/admin/clients/{client_id:.+}", client)
    return app
