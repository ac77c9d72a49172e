"""The composition root: build every part from a config, start them in order,
serve, drain, stop them in reverse.

Start order: refill clock -> access-log consumer -> upstreams (pools,
session, health checks) -> proxy and admin listeners. Stop order is the
reverse, with the proxy listener closed first (no new connections) and
in-flight requests given ``drain_timeout`` to finish, so every answered
request reaches the access log before its consumer is given the sentinel.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
from collections.abc import Callable, Collection, Iterable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric

from gateway import request_path_build
from gateway.access_log import AccessLog
from gateway.admin_app import build_admin_app
from gateway.config import BucketSpec, GatewayConfig, Mode, RouteSpec, load_config, restart_keys
from gateway.config.model import DEFAULT_UPSTREAM
from gateway.config.tls import TlsPairError
from gateway.connection import (
    CappedSite,
    GuardedServer,
    bound_port,
    connection_cap,
    listen_socket,
)
from gateway.core import RequestCore, RequestHead, Snapshot, TlsRequestHead
from gateway.errors import ConfigError
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.redis_store import RedisStore
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.routes import DEFAULT_ROUTE_LABEL
from gateway.limiting.store import BucketSnapshot, BucketStore
from gateway.metrics import Metrics
from gateway.proxy_app import ProxyHandlers
from gateway.tls import TlsListener
from gateway.top_clients import TopClients
from gateway.upstream import Upstream

__all__ = [
    "Server",
    "bound_port",
    "describe_routes",
    "load_for_reload",
    "settle_heap",
    "upstreams_running",
]

log = logging.getLogger("gateway")

# Keys read once at start (restart=True in the model): a reload that changes one says so.
_RESTART_KEYS: Final = restart_keys()


class Server:
    """The composition root (see the module docstring): one process's parts."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: RefillClock | None = None,
        registry: CollectorRegistry | None = None,
        config_path: str | None = None,
        listen_socket: socket.socket | None = None,
        serve_admin: bool = True,
    ) -> None:
        """``listen_socket``/``serve_admin=False``: a worker under the
        Supervisor, which owns the listener and the admin port."""
        self.config = config
        self.config_path = config_path
        self._listen_socket = listen_socket
        self._serve_admin = serve_admin
        self.clock = clock if clock is not None else RefillClock()
        self.metrics = Metrics(registry)
        self.memory_store = MemoryStore(
            self.clock,
            config.clients.max_tracked,
            config.clients.idle_timeout_seconds,
            on_evict=self.metrics.count_eviction,
        )
        self.store: BucketStore = self.memory_store
        if config.storage.backend == "redis":
            storage_errors = self.metrics.storage_errors.labels("redis")
            # The memory store stays as the on_error: local fallback.
            self.store = RedisStore(config.storage, self.memory_store, storage_errors.inc)
        self.metrics.track(self.metrics.clients_tracked, lambda: self.store.tracked)
        self.access_log = AccessLog(
            config.access_log.path,
            config.access_log.queue_size,
            self.metrics.access_log_dropped,
        )
        self.metrics.track(self.metrics.access_log_queue_depth, self.access_log.depth)
        # Read at scrape time: no gauge operation on the request path.
        self.metrics.track(self.metrics.inflight, lambda: self.core.inflight)
        self.clock.on_second(self.metrics.refresh)
        # Every upstream by name, "default" first; read once at start (apply).
        self.upstreams = {
            name: Upstream(name, upstream, config.server, now=self.clock.now)
            for name, upstream in config.all_upstreams().items()
        }
        self.upstream = self.upstreams[DEFAULT_UPSTREAM]
        for upstream in self.upstreams.values():
            for server in upstream.servers:
                self.metrics.track(
                    self.metrics.upstream_server_up.labels(upstream.name, server.address),
                    lambda s=server: float(s.in_rotation(self.clock.now())),  # type: ignore[misc]
                )
        self.core = RequestCore(
            Snapshot(config, self.clock, self.store), self.metrics, self.access_log
        )
        self.handlers = ProxyHandlers(self.core, self.upstreams)
        self.draining = False
        self._stop = asyncio.Event()
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.tls: TlsListener | None = None  # the proxy listener's, while it serves TLS
        self.proxy_port = 0
        self.admin_port = 0
        self._started = False  # start() completed

    # -- what the admin listener shows (admin_app.AdminView) --

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def workers(self) -> int:
        return 1

    def route_labels(self) -> list[str]:
        return [*(r.path_prefix for r in self.config.routes), DEFAULT_ROUTE_LABEL]

    def request_metrics(self) -> Iterable[Metric]:
        m = self.metrics
        return [
            m.requests.family(),
            m.upstream_errors.family(),
            *m.inflight.collect(),
            *m.clients_tracked.collect(),
        ]

    async def top_denied(self) -> TopClients:
        return self.core.top_denied

    def normalised_id(self, client: str) -> tuple[str, str]:
        return self.core.snapshot.identifier.normalised_id(client)

    async def client_buckets(
        self, client: str, ip: str, routes: Collection[str] | None = None
    ) -> list[BucketSnapshot]:
        return await self.core.snapshot.limiter.client_buckets(client, ip, routes)

    def background_parts(self) -> dict[str, Callable[[], bool]]:
        parts: dict[str, Callable[[], bool]] = {
            "refill_clock": lambda: self.clock.alive,
            "access_log": lambda: self.access_log.alive,
        }
        for name, upstream in self.upstreams.items():
            check = upstream.health_check
            if check is not None:
                parts[f"health_check:{name}"] = lambda check=check: check.alive  # type: ignore[misc]
        return parts

    def readiness(self) -> dict[str, bool]:
        # With on_error allow or local the gateway serves through an outage.
        storage_ok = self.store.healthy or self.config.storage.on_error != "deny"
        return {
            "config_loaded": True,
            "storage_reachable": storage_ok,
            "not_draining": not self.draining,
            # Requests are still sent when every server is down (balancer.py),
            # but a load balancer in front had better pick another gateway.
            "upstream_available": not self.upstream.all_down(),
        }

    def servers_down(self) -> list[str]:
        """The default upstream's servers marked down now (/readyz names them)."""
        return self.upstream.servers_down()

    # -- lifecycle --

    async def start(self) -> None:
        config = self.config
        self.clock.start()
        self.access_log.start()
        for upstream in self.upstreams.values():
            await upstream.start()
        limits = config.server
        if config.tls is not None:
            self.tls = TlsListener(config.tls, self.metrics.count_rejected)
        proxy = GuardedServer(
            self.handlers.handle,
            handle_plain=self.handlers.serve_plain,
            limits=limits,
            on_rejected=self.metrics.count_rejected,
            request_head=RequestHead if self.tls is None else TlsRequestHead,
            access_log=None,
            handler_cancellation=False,
            # Bodies pass through byte-for-byte: never inflate a client's gzip.
            auto_decompress=False,
            keepalive_timeout=limits.keepalive_timeout_seconds,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
        )
        self._proxy_runner = web.ServerRunner(
            proxy, shutdown_timeout=config.drain_timeout_seconds, handle_signals=False
        )
        await self._proxy_runner.setup()
        max_connections = connection_cap(limits.max_connections)
        try:
            sock = self._listen_socket or listen_socket(config.listen_host, config.listen_port)
        except OSError as exc:
            raise _bind_error("listen", config.listen_host, config.listen_port, exc) from None
        site = CappedSite(
            self._proxy_runner,
            sock,
            max_connections=max_connections,
            owns_socket=self._listen_socket is None,
            on_capped=self.metrics.connections_capped.inc,
            ssl_context=None if self.tls is None else self.tls.context,
            handshake_timeout=limits.header_timeout_seconds,
        )
        await _bind("listen", config.listen_host, config.listen_port, site)
        self.metrics.track(self.metrics.open_connections, lambda: proxy.open_connections)
        self.proxy_port = bound_port(site)
        if not self._serve_admin:
            self._log_routes(config)
            self._started = True
            settle_heap()
            return
        self._admin_runner = web.AppRunner(
            build_admin_app(self), access_log=None, handle_signals=False
        )
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, config.admin_host, config.admin_port)
        await _bind("admin", config.admin_host, config.admin_port, admin_site)
        self.admin_port = bound_port(admin_site)
        log.info(
            "proxy on %s:%d%s -> %s; admin on %s:%d; request path %s",
            config.listen_host, self.proxy_port, "" if self.tls is None else " (TLS)",
            config.upstream.describe(),
            config.admin_host, self.admin_port, request_path_build(),
        )  # fmt: skip
        self._log_routes(config)
        self._started = True
        settle_heap()

    async def stop(self) -> None:
        """Drain and stop. In-flight requests get ``drain_timeout``."""
        await self._release()
        if self._started:
            # After a failed start the caller's line saying why is the only one.
            log.info("stopped")

    async def _release(self) -> None:
        """Stop every part that was started (after a failed start too)."""
        self.draining = True
        if self._proxy_runner is not None:
            # Closes the listener, then waits for in-flight handlers (up to
            # shutdown_timeout = drain_timeout) before cancelling them.
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
        for upstream in self.upstreams.values():
            await upstream.close()
        await self.store.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.clock.stop()
        # Multiprocess mode: what was counted since the clock's last copy.
        self.metrics.refresh()
        await asyncio.to_thread(self.access_log.stop, self.config.drain_timeout_seconds)

    def _log_routes(self, config: GatewayConfig) -> None:
        """What was loaded, one line per route. A worker under the Supervisor
        says it at debug level: N copies of the same routes would drown the log."""
        level = logging.INFO if self._serve_admin else logging.DEBUG
        for line in describe_routes(config):
            log.log(level, "%s", line)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT (drain), reloading on SIGHUP. A second
        stop signal exits at once. ``on_ready`` runs once serving with the
        signal handlers in place (a worker tells its supervisor)."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except BaseException:
            # Close what did start (the upstream session above all: left
            # open, it is reported on stderr), so the caller's one line
            # saying why is the only output.
            await self._release()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
            log.info("draining (up to %gs)", self.config.drain_timeout_seconds)
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            # The operator insists: no drain, no cleanup (that is what it
            # would wait for). Records still queued for the log are lost.
            log.warning("second %s, exiting without drain", sig.name)
            logging.shutdown()
            os._exit(1)
        log.info("%s received", sig.name)
        self._stop.set()

    # -- reload --

    def reload(self) -> bool:
        """Load, validate and swap the config. On any problem the old config
        keeps serving and the failure is logged and counted."""
        if self.config_path is None:
            log.warning("reload requested but no config file to read")
            return False
        # Under a Supervisor, it counts reloads once; this worker does not.
        failures = self.metrics.config_reloads.labels("failure") if self._serve_admin else None
        new = load_for_reload(self.config_path, failures)
        if new is None or not self._reload_tls(new, failures):
            return False
        return self.apply(new, failures)

    def _reload_tls(self, new: GatewayConfig, failures: Counter | None) -> bool:
        """Read the certificate and key again, for new connections (open ones
        keep theirs); False, logged and counted, when the pair cannot serve:
        then nothing of ``new`` is applied and the old pair serves on."""
        if self.tls is None or new.tls is None:
            return True  # TLS turned on or off: apply() says it needs a restart
        try:
            self.tls.reload(new.tls)
        except TlsPairError as exc:  # the files changed since load_for_reload read them
            for key, message in exc.problems:
                log.error("reload rejected: %s: %s", key, message)
            if failures is not None:
                failures.inc()
            return False
        log.info("reload: new TLS connections get %s", new.tls.cert)
        return True

    def apply(self, new: GatewayConfig, failures: Counter | None = None) -> bool:
        """Swap in ``new``; False (logged, counted in ``failures``) when one
        of its routes names an upstream this process does not run:
        upstreams are built once, at start."""
        old = self.config
        if not upstreams_running(new, self.upstreams):
            if failures is not None:
                failures.inc()
            return False
        for key in _RESTART_KEYS:
            if getattr(new, key) != getattr(old, key):
                log.warning(
                    "reload: %s changed; it takes effect only after a restart",
                    key,
                )
        if new.upstream != old.upstream:
            log.warning("reload: upstream changed; it takes effect after a restart")
        if self._started and (new.tls is None) != (self.tls is None):
            log.warning(
                "reload: tls %s; turning TLS on or off takes effect only after a restart",
                "added" if self.tls is None else "removed",
            )
        if new.upstreams != old.upstreams:
            log.warning("reload: upstreams changed; they take effect after a restart")
        self.memory_store.max_tracked = new.clients.max_tracked
        self.memory_store.idle_timeout_seconds = new.clients.idle_timeout_seconds
        self.core.snapshot = Snapshot(new, self.clock, self.store)
        self.config = new
        settle_heap()
        if self._serve_admin:
            self.metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s", new.source)
        self._log_routes(new)
        return True


def upstreams_running(new: GatewayConfig, running: Collection[str]) -> bool:
    """Every upstream ``new``'s routes name is one of ``running`` (the
    upstreams built at start); else each route that names another is logged
    and the reload must be refused: a route must not lose its backend."""
    missing = [
        (i, route.upstream)
        for i, route in enumerate(new.routes)
        if route.upstream is not None and route.upstream not in running
    ]
    for i, name in missing:
        log.error(
            "reload rejected: routes[%d].upstream: %r is not running; "
            "upstreams start only with a restart", i, name,
        )  # fmt: skip
    return not missing


async def _bind(key: str, host: str, port: int, site: web.BaseSite) -> None:
    """Start ``site``; a failure names the config key and the address
    (``listen 0.0.0.0:8080: address already in use``)."""
    try:
        await site.start()
    except OSError as exc:
        raise _bind_error(key, host, port, exc) from None


def _bind_error(key: str, host: str, port: int, exc: OSError) -> OSError:
    code = exc.errno
    reason = str(exc) if code is None else os.strerror(code).lower()
    return OSError(code, f"{key} {host}:{port}: {reason}")


# -- what was loaded: one log line per route --


def describe_routes(config: GatewayConfig) -> list[str]:
    """What requests meet, one line per route in matching order, then the
    default route: prefix, methods, limits (name, ``q``/``w`` as
    RateLimit-Policy says them, and the rate), mode, upstream."""
    count = len(config.routes)
    lines = [
        f"{config.source}: {count} route{'' if count == 1 else 's'} (the first match "
        "wins), then the default route"
    ]
    for route in config.routes:
        methods = "" if route.methods is None else f" [{', '.join(sorted(route.methods))}]"
        lines.append(f"route {route.path_prefix}{methods}: {_route_line(config, route)}")
    default = RouteSpec("/")
    lines.append(f"route default (no route matched): {_route_line(config, default)}")
    return lines


def _route_line(config: GatewayConfig, route: RouteSpec) -> str:
    if isinstance(route.limit, tuple):
        limits = "limit " + ", ".join(_limit_text(b) for b in route.limit)
    elif route.limit is None:
        limits = "limits.default " + ", ".join(_limit_text(b) for b in config.limits.default)
        overrides = len(config.limits.overrides)
        if overrides:
            limits += (
                f" (or the client's own: {overrides} override{'' if overrides == 1 else 's'})"
            )
    else:
        limits = "unlimited"
    mode = route.mode or config.mode
    parts = [limits, f"mode {mode.value}"]
    if mode is Mode.SHADOW:
        parts[-1] += " (never denies: watch decision=shadow_denied)"
    if route.cost != 1:
        parts.append(f"cost {route.cost}")
    if route.queue is not None:
        queue = route.queue
        parts.append(
            f"queue: waits up to {_duration(queue.max_wait_seconds)}, "
            f"{queue.max_queued} at most"
        )
    if route.count_statuses is not None:
        parts.append(f"counts {_statuses(route.count_statuses)} only")
    name = route.upstream
    if name is None or name == DEFAULT_UPSTREAM or name not in config.upstreams:
        parts.append(f"upstream {config.upstream.describe()}")
    else:
        parts.append(f"upstream {name}: {config.upstreams[name].describe()}")
    return "; ".join(parts)


def _limit_text(bucket: BucketSpec) -> str:
    """``"name" q=20;w=2 (10 per 1s)``; ``per`` when not the client."""
    window = bucket.refill_period_seconds * math.ceil(bucket.max_tokens / bucket.refill_tokens)
    per = "" if bucket.per == ("client",) else f", per {'+'.join(bucket.per)}"
    return (
        f'"{bucket.name}" q={bucket.max_tokens};w={math.ceil(window)} '
        f"({bucket.refill_tokens} per {_duration(bucket.refill_period_seconds)}{per})"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _statuses(codes: frozenset[int]) -> str:
    """401, 403, 500-599: runs of codes as ranges."""
    runs: list[list[int]] = []
    for code in sorted(codes):
        if runs and code == runs[-1][1] + 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def load_for_reload(path: str, failures: Counter | None) -> GatewayConfig | None:
    """The new config, or None after logging every problem (``file:line:col``)
    and counting the failure: the caller keeps serving the old one."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload rejected: %s", problem)
        if failures is not None:
            failures.inc()
        return None


def settle_heap() -> None:
    """Collect once, then keep everything alive now (modules, config, the
    metric children: ~52k objects) out of the cyclic GC's generations. A full
    collection of that heap took 13.6 ms under load, stalling every request
    in flight; afterwards collections only walk what requests create.
    Unfrozen first, so what a reload let go of is collected. A snapshot
    still used by requests in flight is frozen with them, so it must not
    need the cyclic GC to be freed (clients.py avoids the one cycle it had);
    cyclic garbage of those requests waits for the next reload (bounded by
    what is in flight at one reload)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
