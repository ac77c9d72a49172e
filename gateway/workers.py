"""``workers: N``: a supervisor process and N worker processes.

The supervisor binds the proxy listener once and hands the socket to every
worker (inherited file descriptor; the kernel spreads accepts over the
processes waiting on it, so no worker gets a share it cannot serve, unlike
SO_REUSEPORT's fixed hashing onto a stalled process). Workers are fresh
interpreters (``python -m gateway worker``), never forks of a process with a
running event loop. The supervisor serves the admin listener: one /metrics
summing every worker (prometheus_client multiprocess mode), /healthz naming a
dead worker, /readyz, /admin/stats from the same counter files,
/admin/clients merging the files each worker writes its top denied clients
to (gateway/top_clients_share.py), and /admin/clients/{id} read from the
shared store.

Signals: SIGTERM/SIGINT are forwarded (each worker drains), and the
supervisor waits ``drain_timeout`` plus a margin before killing stragglers;
a second signal kills at once. SIGHUP is validated here first: an invalid
file is rejected once (logged, counted), a valid one is forwarded. A worker
that dies is restarted, logged and counted (gateway_workers_restarted_total).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric

from gateway.admin_app import build_admin_app
from gateway.clients import ClientIdentifier
from gateway.config import GatewayConfig, load_config
from gateway.config.model import DEFAULT_UPSTREAM
from gateway.connection import listen_socket
from gateway.limiting.limiter import Limiter
from gateway.limiting.memory_store import MemoryStore
from gateway.limiting.redis_store import RedisStore
from gateway.limiting.refill_clock import RefillClock
from gateway.limiting.routes import DEFAULT_ROUTE_LABEL
from gateway.limiting.store import BucketSnapshot
from gateway.metrics import Metrics
from gateway.server import (
    Server,
    bound_port,
    describe_routes,
    load_for_reload,
    upstreams_running,
)
from gateway.top_clients import TopClients
from gateway.top_clients_share import SharedTopDenied, TopDeniedWriter, top_denied_path

__all__ = ["Supervisor", "run_worker"]

log = logging.getLogger("gateway.workers")

# A worker that dies sooner than this after starting is restarted only after
# this long, so a crash loop (bad upstream URL, say) does not spin the CPU.
RESTART_BACKOFF_SECONDS: Final = 1.0
# Beyond drain_timeout, how long workers get to flush logs and exit.
EXIT_MARGIN_SECONDS: Final = 5.0


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        # Set once the worker serves with its SIGHUP handler installed:
        # before that, SIGHUP's default action would kill it.
        self.ready = False
        self.reload_missed = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """``workers: N``: binds the listener once, runs N worker processes on it,
    forwards signals, restarts the dead, serves the admin listener."""

    def __init__(self, config: GatewayConfig, config_path: str, metrics_dir: str) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics_dir = metrics_dir
        self.metrics = Metrics()  # this process's own counters (restarts, reloads)
        self._registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            self._registry, path=metrics_dir
        )
        self._workers = [_Worker(i) for i in range(config.workers)]
        # What the workers started with: upstreams are read once, at start.
        self._upstreams = tuple(config.all_upstreams())
        self._default_servers = len(config.upstream.server_urls)
        self._stopping = False
        self._stop = asyncio.Event()
        self._socket: socket.socket | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        # For /admin/clients/{id}: the shared store, read with this config.
        self._clock = RefillClock()
        self._local = MemoryStore(self._clock, 1, 1.0)
        self._store = RedisStore(config.storage, self._local)
        self._limiter = Limiter(config, self._clock, self._store)
        self._identifier = ClientIdentifier(config.clients)
        self._top_denied = SharedTopDenied(metrics_dir, config.workers)

    # -- admin_app.AdminView --

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self._registry

    def background_parts(self) -> dict[str, Callable[[], bool]]:
        return {f"worker-{w.index}": (lambda w=w: w.alive) for w in self._workers}  # type: ignore[misc]

    def readiness(self) -> dict[str, bool]:
        storage_ok = self._store.healthy or self.config.storage.on_error != "deny"
        return {
            "config_loaded": True,
            "storage_reachable": storage_ok,
            "workers_running": all(w.alive and w.ready for w in self._workers),
            "not_draining": not self._stopping,
            "upstream_available": len(self.servers_down()) < self._default_servers,
        }

    @property
    def workers(self) -> int:
        return len(self._workers)

    def route_labels(self) -> list[str]:
        return [*(r.path_prefix for r in self.config.routes), DEFAULT_ROUTE_LABEL]

    def request_metrics(self) -> Iterable[Metric]:
        # Only the files /admin/stats reads from (counters, and the gauges
        # summed over live workers), not the histograms /metrics adds up.
        files = [
            *glob.glob(os.path.join(self.metrics_dir, "counter_*.db")),
            *glob.glob(os.path.join(self.metrics_dir, "gauge_livesum_*.db")),
        ]
        merged: Iterable[Metric] = prometheus_multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        return merged

    async def top_denied(self) -> TopClients:
        return await asyncio.to_thread(self._top_denied.read)

    def normalised_id(self, client: str) -> tuple[str, str]:
        return self._identifier.normalised_id(client)

    async def client_buckets(
        self, client: str, ip: str, routes: Collection[str] | None = None
    ) -> list[BucketSnapshot]:
        return await self._limiter.client_buckets(client, ip, routes)

    def servers_down(self) -> list[str]:
        """The default upstream's servers that no live worker has in rotation
        (gateway_upstream_server_up as the workers last set it, their
        maximum): each worker keeps its own view of the servers' health."""
        down = []
        for family in self._registry.collect():
            if family.name != "gateway_upstream_server_up":
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels.get("upstream") == DEFAULT_UPSTREAM and sample.value == 0:
                    down.append(labels["server"])
        return sorted(down)

    # -- lifecycle --

    async def serve(self) -> None:
        config = self.config
        self._socket = listen_socket(config.listen_host, config.listen_port)
        self._socket.set_inheritable(True)
        # The admin listener before the workers: a taken admin port fails
        # the start with one line, before any worker exists to be orphaned.
        admin_runner = web.AppRunner(
            build_admin_app(self), access_log=None, handle_signals=False
        )
        await admin_runner.setup()
        admin_site = web.TCPSite(admin_runner, config.admin_host, config.admin_port)
        try:
            await admin_site.start()
        except BaseException:
            await admin_runner.cleanup()
            self._socket.close()
            raise
        for worker in self._workers:
            await self._spawn(worker)
        log.info(
            "supervisor: %d workers on %s:%d -> %s; admin on %s:%d",
            len(self._workers), config.listen_host, self._socket.getsockname()[1],
            config.upstream.describe(), config.admin_host, bound_port(admin_site),
        )  # fmt: skip
        # The workers log their routes at debug level (N copies otherwise).
        for line in describe_routes(config):
            log.info("%s", line)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            await self._stop.wait()
            await self._stop_workers()
        finally:
            await admin_runner.cleanup()
            await self._store.close()
            self._socket.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _spawn(self, worker: _Worker) -> None:
        assert self._socket is not None
        fd = self._socket.fileno()
        ready_read, ready_write = os.pipe()
        worker.ready = False
        worker.reload_missed = False
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "worker",
            "--config", self.config_path, "--fd", str(fd), "--index", str(worker.index),
            "--ready-fd", str(ready_write),
            pass_fds=(fd, ready_write),
            # Its own session: a terminal's Ctrl-C (SIGINT to the whole
            # foreground group) reaches only the supervisor, which forwards
            # one SIGTERM; a worker that got both would skip its drain.
            start_new_session=True,
        )  # fmt: skip
        os.close(ready_write)
        if self._stopping:
            # A stop signal arrived while this worker was being started: it
            # missed the forwarded SIGTERM.
            worker.process.send_signal(signal.SIGTERM)
        worker.started = time.monotonic()
        loop = asyncio.get_running_loop()
        for coroutine in (self._watch(worker), self._await_ready(worker, ready_read)):
            task = loop.create_task(coroutine)
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    async def _await_ready(self, worker: _Worker, ready_read: int) -> None:
        """The worker writes one byte to its ready pipe once serving; EOF
        without it means it died first."""
        try:
            signalled = await asyncio.to_thread(os.read, ready_read, 1)
        finally:
            os.close(ready_read)
        if not signalled or self._stopping:
            return
        worker.ready = True
        if worker.reload_missed and worker.process is not None:
            worker.process.send_signal(signal.SIGHUP)

    async def _watch(self, worker: _Worker) -> None:
        process = worker.process
        assert process is not None
        code = await process.wait()
        prometheus_multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            process.pid, self.metrics_dir
        )
        if self._stopping:
            return
        log.error(
            "supervisor: worker %d (pid %d) exited with %s; restarting",
            worker.index, process.pid, code,
        )  # fmt: skip
        self.metrics.workers_restarted.inc()
        if time.monotonic() - worker.started < RESTART_BACKOFF_SECONDS:
            await asyncio.sleep(RESTART_BACKOFF_SECONDS)
        if not self._stopping:
            await self._spawn(worker)

    def _signal_workers(self, sig: signal.Signals) -> None:
        for worker in self._workers:
            if worker.alive and worker.process is not None:
                if sig is signal.SIGHUP and not worker.ready:
                    # Still starting: it may have read the old file; reload
                    # it once it can take the signal.
                    worker.reload_missed = True
                    continue
                worker.process.send_signal(sig)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            log.warning("supervisor: second %s; killing workers", sig.name)
            self._signal_workers(signal.SIGKILL)
            return
        log.info("supervisor: %s received; draining workers", sig.name)
        self._stopping = True
        self._signal_workers(signal.SIGTERM)
        self._stop.set()

    async def _stop_workers(self) -> None:
        processes = [w.process for w in self._workers if w.process is not None]
        deadline = self.config.drain_timeout_seconds + EXIT_MARGIN_SECONDS
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(p.wait() for p in processes))
        except TimeoutError:
            log.error("supervisor: workers still running after %.0fs; killing", deadline)
            self._signal_workers(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in processes))
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)

    def _on_reload_signal(self) -> None:
        failures = self.metrics.config_reloads.labels("failure")
        new = load_for_reload(self.config_path, failures)
        if new is None:
            return
        if not upstreams_running(new, self._upstreams):
            failures.inc()
            return
        if new.workers != self.config.workers:
            log.warning("reload: workers changed; it takes effect only after a restart")
        self.config = new
        self._limiter = Limiter(new, self._clock, self._store)
        for line in describe_routes(new):
            log.info("%s", line)
        self._identifier = ClientIdentifier(new.clients)
        self._signal_workers(signal.SIGHUP)
        self.metrics.config_reloads.labels("success").inc()
        log.info("supervisor: config reloaded from %s; workers signalled", self.config_path)


def run_worker(config_path: str, fd: int, index: int, ready_fd: int | None = None) -> None:
    """The body of ``gateway worker``: serve the inherited socket until
    SIGTERM; exit when the supervisor is gone."""
    from gateway.runtime import run_loop

    config = load_config(config_path)
    listen_socket = socket.socket(fileno=fd)
    parent = os.getppid()

    async def serve() -> None:
        server = Server(
            config, config_path=config_path, listen_socket=listen_socket, serve_admin=False
        )

        def check_parent(_seconds: int) -> None:
            if os.getppid() != parent:
                log.error("worker %d: supervisor is gone; stopping", index)
                server.request_stop()

        def tell_supervisor() -> None:
            if ready_fd is not None:
                os.write(ready_fd, b"1")
                os.close(ready_fd)

        server.clock.on_second(check_parent)
        # The supervisor merges every worker's top denied clients from these
        # files (gateway/top_clients_share.py).
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared_dir:
            writer = TopDeniedWriter(server.core.top_denied, top_denied_path(shared_dir, index))
            writer.resume()
            server.clock.on_second(writer.write)
        await server.serve(on_ready=tell_supervisor)

    run_loop(serve())
