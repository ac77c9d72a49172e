"""Shared fixtures: real upstream servers, the gateway on 127.0.0.1:0, a
stepped refill clock, a fresh metrics registry per test."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.config import parse_config
from gateway.limiting.refill_clock import ManualRefillClock, RefillClock
from gateway.server import Server
from tests.helpers import base_url, free_port
from tests.upstream_app import build_upstream_app


@dataclass
class RunningGateway:
    server: Server
    clock: RefillClock
    access_log_path: Path
    url: str = ""
    admin_url: str = ""
    config_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def access_records(self) -> list[dict[str, Any]]:
        import json

        if not self.access_log_path.exists():
            return []
        return [json.loads(line) for line in self.access_log_path.read_text().splitlines()]


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """A real aiohttp backend on 127.0.0.1 (see tests/upstream_app.py)."""
    server = TestServer(build_upstream_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def gateway_yaml(upstream_url: str, access_log_path: Path, **overrides: Any) -> str:
    """A config with listeners on free ports; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "upstream": {"url": upstream_url, "read_timeout": "5s", "connect_timeout": "1s"},
        "limits": {"default": {"refill_period": "1h", "refill_tokens": 1, "max_tokens": 100}},
        "access_log": {"path": str(access_log_path)},
        "drain_timeout": "5s",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return yaml.safe_dump(config)


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path, upstream: TestServer) -> AsyncIterator[StartGateway]:
    """``await start_gateway(limits=..., routes=...)`` starts an in-process
    gateway in front of ``upstream`` with a ManualRefillClock (pass
    ``manual_clock=False`` for the real one) and stops it at teardown."""
    started: list[RunningGateway] = []

    async def start(
        *, manual_clock: bool = True, upstream_url: str | None = None, **overrides: Any
    ) -> RunningGateway:
        log_path = tmp_path / f"access-{len(started)}.log"
        url = upstream_url or base_url(upstream)
        text = gateway_yaml(url, log_path, **overrides)
        config_path = tmp_path / f"gateway-{len(started)}.yaml"
        config_path.write_text(text)
        config = parse_config(text, str(config_path))
        clock: RefillClock = ManualRefillClock() if manual_clock else RefillClock()
        server = Server(
            config, clock=clock, registry=CollectorRegistry(), config_path=str(config_path)
        )
        await server.start()
        running = RunningGateway(
            server=server,
            clock=clock,
            access_log_path=log_path,
            url=f"http://127.0.0.1:{server.proxy_port}",
            admin_url=f"http://127.0.0.1:{server.admin_port}",
            config_path=config_path,
        )
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.server.draining:
            await running.server.stop()


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1; ``stop``/``start`` simulate an
    outage and the server's return on the same port."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self._workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._process.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server process on a free port, killed at teardown."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; scripts/test installs it")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rds(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain synchronous client to look at what the gateway stored."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client: no cookie jar, no decompression, so tests see the bytes."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


async def gather_statuses(
    session: aiohttp.ClientSession, url: str, count: int, **kwargs: Any
) -> list[int]:
    async def one() -> int:
        async with session.get(url, **kwargs) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.fixture
def aiohttp_app_factory() -> Callable[[], web.Application]:
    return build_upstream_app
