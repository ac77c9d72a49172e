"""Shared fixtures: real upstream servers, the gateway on 127.0.0.1:0, a
stepped refill clock, a fresh metrics registry per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.config import parse_config
from gateway.limiting.refill_clock import ManualRefillClock, RefillClock
from gateway.server import Server
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


def gateway_yaml(upstream_url: str, access_log: Path, **overrides: Any) -> str:
    """A config with listeners on free ports; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "upstream": {"url": upstream_url, "read_timeout": "5s", "connect_timeout": "1s"},
        "limits": {"default": {"refill_period": "1h", "refill_tokens": 1, "max_tokens": 100}},
        "access_log": {"path": str(access_log)},
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
async def start_gateway(
    tmp_path: Path, upstream: TestServer
) -> AsyncIterator[StartGateway]:
    """``await start_gateway(limits=..., routes=...)`` starts an in-process
    gateway in front of ``upstream`` with a ManualRefillClock (pass
    ``manual_clock=False`` for the real one) and stops it at teardown."""
    started: list[RunningGateway] = []

    async def start(
        *, manual_clock: bool = True, upstream_url: str | None = None, **overrides: Any
    ) -> RunningGateway:
        log_path = tmp_path / f"access-{len(started)}.log"
        url = upstream_url or str(upstream.make_url("")).rstrip("/")
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
