"""The composition root: build every part from a config, start them in order,
serve, drain, stop them in reverse.

Start order: refill clock -> access-log consumer -> upstream session -> proxy
and admin listeners. Stop order is the reverse, with the proxy listener
closed first (no new connections) and in-flight requests given
``drain_timeout`` to finish, so every answered request reaches the access log
before its consumer is given the sentinel.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
from collections.abc import Callable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from gateway.access_log import AccessLog
from gateway.admin_app import build_admin_app
from gateway.config import BucketSpec, GatewayConfig, Mode, RouteSpec, load_config, restart_keys
from gateway.connection import GuardedServer, bound_port
from gateway.core import RequestCore, Snapshot
from gateway.errors import ConfigError
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.redis_store import RedisStore
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.store import BucketSnapshot, BucketStore
from gateway.metrics import Metrics
from gateway.proxy_app import ProxyHandlers
from gateway.upstream import Upstream

__all__ = ["Server", "bound_port", "describe_routes", "load_for_reload", "settle_heap"]

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
        self.upstream = Upstream(config.upstream, config.server)
        self.core = RequestCore(
            Snapshot(config, self.clock, self.store), self.metrics, self.access_log
        )
        self.handlers = ProxyHandlers(self.core, self.upstream)
        self.draining = False
        self._stop = asyncio.Event()
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self._started = False  # start() completed

    # -- what the admin listener shows (admin_app.AdminView) --

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def client_buckets(self, client: str) -> list[BucketSnapshot]:
        snapshot = self.core.snapshot
        client, ip = snapshot.identifier.normalised_id(client)
        return await snapshot.limiter.client_buckets(client, ip)

    def background_parts(self) -> dict[str, Callable[[], bool]]:
        return {
            "refill_clock": lambda: self.clock.alive,
            "access_log": lambda: self.access_log.alive,
        }

    def readiness(self) -> dict[str, bool]:
        # With on_error allow or local the gateway serves through an outage.
        storage_ok = self.store.healthy or self.config.storage.on_error != "deny"
        return {
            "config_loaded": True,
            "storage_reachable": storage_ok,
            "not_draining": not self.draining,
        }

    # -- lifecycle --

    async def start(self) -> None:
        config = self.config
        self.clock.start()
        self.access_log.start()
        await self.upstream.start()
        limits = config.server
        proxy = GuardedServer(
            self.handlers.handle,
            handle_plain=self.handlers.serve_plain,
            limits=limits,
            on_rejected=self.metrics.count_rejected,
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
        site: web.BaseSite
        if self._listen_socket is not None:
            site = web.SockSite(self._proxy_runner, self._listen_socket)
        else:
            site = web.TCPSite(
                self._proxy_runner, config.listen_host, config.listen_port, backlog=1024
            )
        await _bind("listen", config.listen_host, config.listen_port, site)
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
            "proxy on %s:%d -> %s; admin on %s:%d",
            config.listen_host, self.proxy_port, config.upstream.url,
            config.admin_host, self.admin_port,
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
        await self.upstream.close()
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
        if new is None:
            return False
        self.apply(new)
        return True

    def apply(self, new: GatewayConfig) -> None:
        old = self.config
        for key in _RESTART_KEYS:
            if getattr(new, key) != getattr(old, key):
                log.warning(
                    "reload: %s changed; it takes effect only after a restart",
                    key,
                )
        if new.upstream != old.upstream:
            log.warning("reload: upstream changed; it takes effect after a restart")
        self.memory_store.max_tracked = new.clients.max_tracked
        self.memory_store.idle_timeout_seconds = new.clients.idle_timeout_seconds
        self.core.snapshot = Snapshot(new, self.clock, self.store)
        self.config = new
        settle_heap()
        if self._serve_admin:
            self.metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s", new.source)
        self._log_routes(new)


async def _bind(key: str, host: str, port: int, site: web.BaseSite) -> None:
    """Start ``site``; a failure names the config key and the address
    (``listen 0.0.0.0:8080: address already in use``)."""
    try:
        await site.start()
    except OSError as exc:
        code = exc.errno
        reason = str(exc) if code is None else os.strerror(code).lower()
        raise OSError(code, f"{key} {host}:{port}: {reason}") from None


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
    parts.append(f"upstream {config.upstream.url}")
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
