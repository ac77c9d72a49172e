"""Shared fixtures: real upstream servers, the gateway on 127.0.0.1:0, a
stepped refill clock, a fresh metrics registry per test, and clients that
reach the gateway on either request path (``request_path``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import socket
import ssl
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
from tests.helpers import (
    GUARD_SECONDS,
    RawResponse,
    base_url,
    free_port,
    raw_connection,
    read_response,
    tool,
)
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
    """A config with listeners on free ports; ``overrides`` replace top-level
    keys (a mapping is merged into the section; a None in it removes a key:
    ``upstream={"url": None, "servers": [...]}``)."""
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
            merged = {**config[key], **value}
            config[key] = {k: v for k, v in merged.items() if v is not None}
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
            url=f"{'http' if config.tls is None else 'https'}://127.0.0.1:{server.proxy_port}",
            admin_url=f"http://127.0.0.1:{server.admin_port}",
            config_path=config_path,
        )
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.server.draining:
            await running.server.stop()


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made by ``openssl`` once per session: a CA, and two server
    certificates it signed for localhost and 127.0.0.1 (pairs ``a`` and
    ``b``, so a reload can swap one for the other)."""

    directory: Path
    ca: Path

    def cert(self, name: str = "a") -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str = "a") -> Path:
        return self.directory / f"{name}.key"

    def config(self, name: str = "a") -> dict[str, str]:
        """The ``tls`` section serving pair ``name``."""
        return {"cert": str(self.cert(name)), "key": str(self.key(name))}

    def fingerprint(self, name: str = "a") -> str:
        """SHA-256 of pair ``name``'s certificate (DER), as a client sees it."""
        der = ssl.PEM_cert_to_DER_cert(self.cert(name).read_text())
        return hashlib.sha256(der).hexdigest()

    def client_context(self) -> ssl.SSLContext:
        """A client that trusts the CA (and checks the name)."""
        return ssl.create_default_context(cafile=str(self.ca))


def _openssl(*args: str) -> None:
    subprocess.run([tool("openssl"), *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and two server pairs it signed (P-256 keys: made at once)."""
    directory = tmp_path_factory.mktemp("tls")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=gateway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    for name in ("a", "b"):
        request = directory / f"{name}.csr"
        _openssl(
            "req", "-new", *ec, "-keyout", str(directory / f"{name}.key"),
            "-out", str(request), "-subj", f"/CN=localhost {name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(directory / f"{name}.crt"), "-days", "2",
            "-extfile", str(extensions),
        )  # fmt: skip
    return TlsFiles(directory, ca)


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


# --------------------------------------------------------------------------- request paths

PLAIN, AIOHTTP = "plain", "aiohttp"
# An empty line before a request line: front.py hands a connection whose bytes
# start with one to aiohttp's server, whose parser skips it (RFC 9112 section
# 2.2). No request is made of it: no token, no upstream request, no log record.
HAND_OVER = b"\r\n"

Served = tuple[str, str, str]  # the path that served a request, its method, its target


class _HandOverConnector(aiohttp.TCPConnector):
    """Sends HAND_OVER first on each connection it opens, so aiohttp's server
    serves every request on it, the first one included."""

    def __init__(self) -> None:
        super().__init__()
        self._opened: set[object] = set()  # the protocols of the connections it primed

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109 (aiohttp's)
        connection = await super().connect(req, traces, timeout)
        protocol, transport = connection.protocol, connection.transport
        if protocol is not None and transport is not None and protocol not in self._opened:
            self._opened.add(protocol)
            transport.write(HAND_OVER)
        return connection


def record_served(gw: RunningGateway) -> list[Served]:
    """Which path serves each request ``gw`` gets from now on: both entry
    points of its proxy listener (gateway/connection.py's GuardedServer)
    wrapped. front.py's connections call ``_handle_plain``; the handler a
    connection is handed to calls aiohttp's ``request_handler``. Both are read
    when a connection is made, so connections made before are not seen."""
    runner = gw.server._proxy_runner
    assert runner is not None
    proxy: Any = runner.server
    served: list[Served] = []
    serve_plain = proxy._handle_plain
    handle = proxy.request_handler

    def plain_entry(conn: Any, request: Any) -> Any:
        served.append((PLAIN, request.method, request.target))
        return serve_plain(conn, request)

    async def aiohttp_entry(request: web.BaseRequest) -> web.StreamResponse:
        served.append((AIOHTTP, request.method, request.raw_path))
        return await handle(request)

    proxy._handle_plain = plain_entry
    proxy.request_handler = aiohttp_entry
    return served


class RequestPath:
    """One of the proxy listener's two request paths (README, "Two paths,
    one behaviour") and clients that reach a gateway on it. ``plain``:
    connections as a client opens them, served by front.py while requests
    are plain. ``aiohttp``: each connection starts with HAND_OVER, so aiohttp's
    server serves all its requests. What served each request of a gateway used
    through these is recorded (``record_served``); the fixture checks it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._served: dict[int, tuple[RunningGateway, list[Served]]] = {}
        self._sessions: list[aiohttp.ClientSession] = []

    def watch(self, gw: RunningGateway) -> None:
        """Record what serves ``gw``'s requests (before connecting to it)."""
        if id(gw) not in self._served:
            self._served[id(gw)] = (gw, record_served(gw))

    async def client(self, gw: RunningGateway) -> aiohttp.ClientSession:
        """A client like the ``http`` fixture's (no cookie jar, no
        decompression) whose requests to ``gw`` take this path; closed at
        teardown."""
        self.watch(gw)
        connector = _HandOverConnector() if self.name == AIOHTTP else None
        session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._sessions.append(session)
        return session

    @contextlib.asynccontextmanager
    async def raw_connection(
        self, gw: RunningGateway
    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """``tests.helpers.raw_connection`` on this path."""
        self.watch(gw)
        async with raw_connection(gw) as (reader, writer):
            if self.name == AIOHTTP:
                writer.write(HAND_OVER)
            yield reader, writer

    async def raw_exchange(
        self, gw: RunningGateway, data: bytes, *, head: bool = False
    ) -> RawResponse:
        """``tests.helpers.raw_exchange`` on this path."""
        async with asyncio.timeout(GUARD_SECONDS), self.raw_connection(gw) as (reader, writer):
            writer.write(data)
            await writer.drain()
            return await read_response(reader, head=head)

    async def raw_exchange_to_close(
        self, gw: RunningGateway, data: bytes
    ) -> tuple[RawResponse, bytes]:
        """``tests.helpers.raw_exchange_to_close`` on this path."""
        async with asyncio.timeout(GUARD_SECONDS), self.raw_connection(gw) as (reader, writer):
            writer.write(data)
            await writer.drain()
            response = await read_response(reader)
            return response, await reader.read()

    def assert_all_served_here(self) -> None:
        """Each gateway used through this path served requests, all of them
        on this path."""
        assert self._served, "no gateway was used through the request_path fixture"
        for gw, served in self._served.values():
            assert served, f"{gw.url} served no request through the request_path fixture"
            elsewhere = [request for request in served if request[0] != self.name]
            assert not elsewhere, f"on the {self.name} path's variant: {elsewhere}"

    async def close(self) -> None:
        for session in self._sessions:
            await session.close()


@pytest.fixture(params=[PLAIN, AIOHTTP])
async def request_path(request: pytest.FixtureRequest) -> AsyncIterator[RequestPath]:
    """Runs a test on each request path, as uvicorn's ``http_protocol_cls``
    runs its protocol tests on h11 and httptools. The test reaches its
    gateways through the fixture's clients (``client``, ``raw_connection``,
    ``raw_exchange``...); afterwards every request they served must have been
    served on the variant's path (checked unless the test itself failed)."""
    path = RequestPath(request.param)
    failed_before = request.session.testsfailed
    yield path
    await path.close()
    if request.session.testsfailed == failed_before:
        path.assert_all_served_here()


def on_both_paths(*, aiohttp_diverges: str | None = None) -> pytest.MarkDecorator:
    """``request_path`` on both paths; ``aiohttp_diverges``: the reason the
    aiohttp variant is known to fail (a real divergence: xfail, strict)."""
    aiohttp_param: Any = AIOHTTP
    if aiohttp_diverges is not None:
        xfail = pytest.mark.xfail(strict=True, reason=aiohttp_diverges)
        aiohttp_param = pytest.param(AIOHTTP, marks=xfail)
    return pytest.mark.parametrize("request_path", [PLAIN, aiohttp_param], indirect=True)
