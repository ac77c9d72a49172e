"""Several servers per upstream (issue 12): round robin and least_conn,
passive health driven by real servers stopped, killed and started again on
the same port, a server that never answers and one that closes before
answering, the one retry on another server, active health checks, named
upstreams for routes, /readyz, ``gateway_upstream_server_up``, the access
log's ``upstream_addr`` and ``gateway check``. Real sockets on 127.0.0.1; the
passive ``fail_timeout`` runs on the gateway's stepped clock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import AIOHTTP, RedisServer, RequestPath, RunningGateway, StartGateway
from tests.functional.test_workers import (
    children,
    fresh_connection_requests,
    only_serving,
    running_gateway,
    statuses_of,
    wait_until,
    workers_config,
)
from tests.helpers import (
    GUARD_SECONDS,
    PROBLEM_LINE,
    bucket,
    free_port,
    metric_sum,
    metrics_text,
    poll,
    readyz,
    run_cli,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]
FAIL_TIMEOUT_SECONDS = 10.0
UP = "gateway_upstream_server_up"

# --------------------------------------------------------------------------- backends


class Backend:
    """A named aiohttp server on a port of its own that can be stopped and
    started again on the same port. Answers ``{"server": name, ...}``;
    ``/hold`` waits for ``release``; ``/health`` answers ``health_status``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.hits: list[str] = []
        self.health_hits: list[str] = []  # their User-Agent
        self.health_status = 200
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self._server: TestServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            self.health_hits.append(request.headers.get("User-Agent", ""))
            return web.Response(status=self.health_status, text="health")

        async def hold(request: web.Request) -> web.Response:
            self.hits.append(request.raw_path)
            self.holding.set()
            await self.release.wait()
            return web.json_response({"server": self.name, "path": request.raw_path})

        async def echo(request: web.Request) -> web.Response:
            self.hits.append(request.raw_path)
            body = await request.read()
            return web.json_response(
                {
                    "server": self.name,
                    "method": request.method,
                    "path": request.raw_path,
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                }
            )

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/hold", hold)
        app.router.add_route("*", "/{tail:.*}", echo)
        return app

    async def start(self) -> None:
        server = TestServer(self._app(), host="127.0.0.1", port=self.port or None)
        await server.start_server()
        self._server = server
        self.port = server.port or 0

    async def stop(self) -> None:
        if self._server is not None:
            self.release.set()
            await self._server.close()
            self._server = None


class ProcessBackend:
    """tests/upstream_process.py in a process of its own: killed (SIGKILL)
    and started again on the same port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.upstream_process", str(self.port), self.name,
            cwd=REPO, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert process.stdout is not None
        async with asyncio.timeout(GUARD_SECONDS):
            line = await process.stdout.readline()
        assert line == b"ready\n", f"{self.name} did not start: {line!r}"
        self._process = process

    async def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()


class RawServer:
    """A TCP server that does not speak HTTP back: ``silent`` reads and never
    answers; ``closing`` reads the request head and closes."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.behaviour == "closing":
                    writer.transport.abort()
                    return

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        for writer in self._writers:
            writer.transport.abort()
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[list[Backend]]]]:
    """``await backends("a", "b")``: started Backends, stopped at teardown."""
    made: list[Backend] = []

    async def make(*names: str) -> list[Backend]:
        new = [Backend(name) for name in names]
        for backend in new:
            await backend.start()
        made.extend(new)
        return new

    yield make
    for backend in made:
        await backend.stop()


@pytest.fixture
async def process_backends() -> AsyncIterator[list[ProcessBackend]]:
    made = [ProcessBackend("a"), ProcessBackend("b")]
    for backend in made:
        await backend.start()
    yield made
    for backend in made:
        await backend.kill()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[str], Awaitable[RawServer]]]:
    made: list[RawServer] = []

    async def make(behaviour: str) -> RawServer:
        server = RawServer(behaviour)
        await server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        await server.stop()


def servers_config(*urls: str, **keys: Any) -> dict[str, Any]:
    """The ``upstream`` override for start_gateway: ``servers`` instead of url."""
    return {"url": None, "servers": list(urls), **keys}


async def get(http: aiohttp.ClientSession, gw: RunningGateway, path: str) -> tuple[int, Any]:
    async with http.get(gw.url + path) as response:
        body = await response.read()
        is_json = response.content_type == "application/json"
        return response.status, (await response.json() if is_json else body)


async def served_by(http: aiohttp.ClientSession, gw: RunningGateway, path: str = "/") -> str:
    status, body = await get(http, gw, path)
    assert status == 200, body
    return str(body["server"])


def upstream_addrs(gw: RunningGateway) -> list[str | None]:
    return [record["upstream_addr"] for record in gw.access_records()]


def up(gw: RunningGateway, server: str, upstream: str = "default") -> float:
    value = gw.server.metrics.registry.get_sample_value(
        UP, {"upstream": upstream, "server": server}
    )
    assert value is not None, f"no {UP} series for {upstream} {server}"
    return value


# --------------------------------------------------------------------------- balancing


async def test_round_robin_takes_the_servers_in_turn(
    start_gateway: StartGateway, backends: Any, request_path: RequestPath
) -> None:
    a, b = await backends("a", "b")
    gw = await start_gateway(upstream=servers_config(a.url, b.url))
    http = await request_path.client(gw)
    order = [await served_by(http, gw, f"/n{i}") for i in range(8)]
    assert order == ["a", "b"] * 4
    assert (len(a.hits), len(b.hits)) == (4, 4)
    await gw.server.stop()
    assert upstream_addrs(gw) == [a.address, b.address] * 4


async def test_round_robin_on_aiohttps_client_keeps_bodies_whole(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession
) -> None:
    """POST (and HEAD) take aiohttp's client, not the plain pool: the same
    rotation, per upstream."""
    a, b = await backends("a", "b")
    gw = await start_gateway(upstream=servers_config(a.url, b.url))
    body = os.urandom(100_000)
    served = []
    for _ in range(4):
        async with http.post(gw.url + "/upload", data=body) as response:
            echo = await response.json()
            served.append(echo["server"])
            assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert served == ["a", "b", "a", "b"]


@pytest.mark.parametrize(("balance", "quick_on_a"), [("least_conn", 0), ("round_robin", 2)])
async def test_least_conn_sends_around_a_slow_server(
    start_gateway: StartGateway,
    backends: Any,
    request_path: RequestPath,
    balance: str,
    quick_on_a: int,
) -> None:
    """While a's request is held, least_conn sends every other request to b
    (round robin, the contrast, still sends a its turns)."""
    a, b = await backends("a", "b")
    gw = await start_gateway(upstream=servers_config(a.url, b.url, balance=balance))
    http = await request_path.client(gw)
    held = asyncio.create_task(served_by(http, gw, "/hold"))
    async with asyncio.timeout(GUARD_SECONDS):
        await a.holding.wait()
    quick = [await served_by(http, gw, f"/q{i}") for i in range(4)]
    assert quick.count("a") == quick_on_a
    a.release.set()
    assert await held == "a"


# --------------------------------------------------------------------------- passive health


async def test_a_killed_server_leaves_the_rotation_and_is_probed_back(
    start_gateway: StartGateway,
    process_backends: list[ProcessBackend],
    request_path: RequestPath,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Killed: each request it was given goes on to the other server (no
    client sees an error); after max_fails it is out (gauge 0, a warning).
    Started again on its port: still out until fail_timeout has passed on
    the gateway's clock, then one request probes it and it is back."""
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    a, b = process_backends
    gw = await start_gateway(
        upstream=servers_config(a.url, b.url, max_fails=2, fail_timeout="10s")
    )
    http = await request_path.client(gw)
    assert [await served_by(http, gw) for _ in range(2)] == ["a", "b"]

    await a.kill()
    served = []
    for _ in range(6):
        served.append(await served_by(http, gw))
        if up(gw, a.address) == 0:
            break
    assert up(gw, a.address) == 0, "a was not marked down"
    assert set(served) == {"b"}
    marked = [r.getMessage() for r in caplog.records]
    assert any(f"server {a.address} marked down: 2 failures" in m for m in marked), marked

    assert [await served_by(http, gw) for _ in range(4)] == ["b"] * 4
    await a.start()
    assert [await served_by(http, gw) for _ in range(2)] == ["b"] * 2
    gw.clock.advance(FAIL_TIMEOUT_SECONDS)
    assert up(gw, a.address) == 1  # eligible again: the next request probes it
    assert await served_by(http, gw) == "a"
    assert [await served_by(http, gw) for _ in range(4)] in (["b", "a"] * 2, ["a", "b"] * 2)
    marked = [r.getMessage() for r in caplog.records]
    assert any(f"server {a.address} is back in rotation" in m for m in marked), marked

    await gw.server.stop()
    addrs = upstream_addrs(gw)
    retried = [addr for addr in addrs if addr is not None and "," in addr]
    assert retried, addrs
    assert set(retried) == {f"{a.address}, {b.address}"}
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "connect"}) == 0
    )


async def test_a_server_that_never_answers_times_out_without_a_retry(
    start_gateway: StartGateway,
    backends: Any,
    raw_server: Any,
    request_path: RequestPath,
) -> None:
    """A read timeout is a 504, not sent on to another server (it may be
    working on it); it counts toward max_fails, so the silent server leaves
    the rotation."""
    silent = await raw_server("silent")
    (b,) = await backends("b")
    gw = await start_gateway(
        upstream=servers_config(silent.url, b.url, max_fails=2, read_timeout="300ms")
    )
    http = await request_path.client(gw)
    statuses = []
    for i in range(4):
        status, _ = await get(http, gw, f"/r{i}")
        statuses.append(status)
    assert statuses == [504, 200, 504, 200]
    assert silent.requests == 2
    assert b.hits == ["/r1", "/r3"]  # the timed-out ones were not sent to b
    assert up(gw, silent.address) == 0
    assert [await served_by(http, gw, f"/s{i}") for i in range(3)] == ["b"] * 3
    await gw.server.stop()
    assert upstream_addrs(gw)[:4] == [silent.address, b.address] * 2
    assert (
        gw.metric("gateway_upstream_errors_total", {"route": "default", "kind": "timeout"}) == 2
    )


async def test_a_close_before_any_response_byte_sends_a_get_on_but_not_a_post(
    start_gateway: StartGateway,
    backends: Any,
    raw_server: Any,
    request_path: RequestPath,
) -> None:
    closing = await raw_server("closing")
    (b,) = await backends("b")
    gw = await start_gateway(upstream=servers_config(closing.url, b.url, max_fails=0))
    http = await request_path.client(gw)
    assert await served_by(http, gw, "/first") == "b"  # closing, then b
    assert closing.requests >= 1
    if request_path.name == AIOHTTP:
        b.hits.clear()
        async with http.post(gw.url + "/form", data=b"x=1") as response:
            assert response.status == 502
            assert (await response.json())["error"] == "upstream_reset"
        assert b.hits == []  # sent once: a POST may have been acted on
        async with http.head(gw.url + "/head") as response:
            assert response.status == 200  # HEAD is idempotent: on to b
        assert b.hits == ["/head"]
    await gw.server.stop()
    assert upstream_addrs(gw)[0] == f"{closing.address}, {b.address}"


async def test_a_connect_failure_sends_even_a_post_on_with_its_body(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (b,) = await backends("b")
    gw = await start_gateway(upstream=servers_config(dead, b.url))
    body = os.urandom(50_000)
    async with http.post(gw.url + "/upload", data=body) as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["server"] == "b"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_every_server_down_is_still_tried_and_readyz_names_them(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession
) -> None:
    """Both stopped: both marked down, /readyz 503 naming them. One started
    again: the next request is sent anyway (not a 502 without trying), its
    answer brings the server back and /readyz is 200."""
    a, b = await backends("a", "b")
    gw = await start_gateway(upstream=servers_config(a.url, b.url, max_fails=1))
    assert await readyz(http, gw.admin_url) == (
        200,
        {
            "ready": True,
            "checks": {
                "config_loaded": True,
                "storage_reachable": True,
                "not_draining": True,
                "upstream_available": True,
            },
        },
    )
    await a.stop()
    await b.stop()
    status, body = await get(http, gw, "/")
    assert status == 502
    assert body["error"] == "upstream_unreachable"
    assert (up(gw, a.address), up(gw, b.address)) == (0, 0)
    status, ready = await readyz(http, gw.admin_url)
    assert status == 503
    assert ready["checks"]["upstream_available"] is False
    assert ready["servers_down"] == [a.address, b.address]
    text = await metrics_text(http, gw.admin_url)
    assert metric_sum(text, UP, upstream="default", server=a.address) == 0

    await b.start()
    assert await served_by(http, gw) == "b"  # fail_timeout is not over: sent anyway
    assert up(gw, b.address) == 1
    status, ready = await readyz(http, gw.admin_url)
    assert status == 200
    assert ready["servers_down"] == [a.address]


async def test_a_lone_server_marked_down_makes_readyz_503_until_fail_timeout(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession
) -> None:
    """nginx never marks a lone server down; we do, for /readyz and the
    gauge, though every request still goes to it. After fail_timeout it
    counts as in rotation again (no traffic need come to probe it: a load
    balancer that believed /readyz would send none)."""
    (a,) = await backends("a")
    gw = await start_gateway(upstream={"url": a.url, "max_fails": 2})
    await a.stop()
    assert [(await get(http, gw, "/"))[0] for _ in range(2)] == [502, 502]
    status, ready = await readyz(http, gw.admin_url)
    assert (status, ready["servers_down"]) == (503, [a.address])
    gw.clock.advance(FAIL_TIMEOUT_SECONDS)
    assert (await readyz(http, gw.admin_url))[0] == 200


# --------------------------------------------------------------------------- named upstreams


async def test_routes_go_to_their_named_upstream(
    start_gateway: StartGateway, backends: Any, request_path: RequestPath
) -> None:
    main, static = await backends("main", "static")
    gw = await start_gateway(
        upstream={"url": main.url},
        upstreams={"static": {"url": static.url, "preserve_host": False}},
        routes=[
            {"path_prefix": "/static", "upstream": "static", "limit": "unlimited"},
            {"path_prefix": "/api", "upstream": "default"},
        ],
        limits={"default": bucket(2)},
    )
    http = await request_path.client(gw)
    assert await served_by(http, gw, "/static/app.js") == "static"
    assert await served_by(http, gw, "/api/x") == "main"
    assert await served_by(http, gw, "/") == "main"
    if request_path.name == AIOHTTP:
        async with http.post(gw.url + "/static/upload", data=b"x") as response:
            assert (await response.json())["server"] == "static"
    status, _ = await get(http, gw, "/other")
    assert status == 200
    status, _ = await get(http, gw, "/other")
    assert status == 429
    assert up(gw, static.address, "static") == 1
    await gw.server.stop()
    records = gw.access_records()
    assert [
        (r["route"], r["upstream_addr"]) for r in records if r["path"] != "/static/upload"
    ] == [
        ("/static", static.address),
        ("/api", main.address),
        ("default", main.address),
        ("default", main.address),
        ("default", None),  # denied: no upstream was tried
    ]


async def test_reload_refuses_a_route_naming_an_upstream_not_running(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Upstreams are built at start: a reload that adds one and routes to it
    is refused (the old config keeps serving, the failure is counted)."""
    caplog.set_level(logging.WARNING)
    main, extra = await backends("main", "extra")
    gw = await start_gateway(upstream={"url": main.url})
    assert gw.config_path is not None
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "upstream": {"url": main.url},
        "upstreams": {"extra": {"url": extra.url}},
        "routes": [{"path_prefix": "/x", "upstream": "extra"}],
        "access_log": {"path": str(gw.access_log_path)},
    }
    write_config(gw.config_path, config)
    assert gw.server.reload() is False
    assert gw.metric("gateway_config_reloads_total", {"result": "failure"}) == 1
    assert any("routes[0].upstream: 'extra' is not running" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert await served_by(http, gw, "/x") == "main"

    del config["routes"]
    write_config(gw.config_path, config)
    assert gw.server.reload() is True
    assert any("upstreams changed; they take effect after a restart" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# --------------------------------------------------------------------------- health checks


async def test_health_checks_take_a_failing_server_out_and_bring_it_back(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await backends("a", "b")
    a.health_status = 503
    gw = await start_gateway(
        manual_clock=False,
        upstream=servers_config(
            a.url, b.url, health_check={"path": "/health", "interval": "50ms", "timeout": "1s"}
        ),
    )
    await poll(lambda: up(gw, a.address) == 0, "a's failing probe did not mark it down",
               seconds=GUARD_SECONDS)  # fmt: skip
    assert [await served_by(http, gw, f"/n{i}") for i in range(4)] == ["b"] * 4
    assert a.hits == []
    a.health_status = 200
    await poll(lambda: up(gw, a.address) == 1, "a's passing probe did not bring it back",
               seconds=GUARD_SECONDS)  # fmt: skip
    assert sorted([await served_by(http, gw, f"/m{i}") for i in range(2)]) == ["a", "b"]
    assert set(a.health_hits) == {"ratelimit-gateway-health-check"}
    async with http.get(gw.admin_url + "/healthz") as response:
        parts = (await response.json())["parts"]
    assert parts["health_check:default"] == "alive"


async def test_a_probe_that_gets_no_answer_fails_within_its_timeout(
    start_gateway: StartGateway, backends: Any, raw_server: Any
) -> None:
    silent = await raw_server("silent")
    (b,) = await backends("b")
    gw = await start_gateway(
        upstream=servers_config(
            silent.url, b.url, health_check={"path": "/health", "interval": "1h",
                                             "timeout": "200ms"},
        ),
    )  # fmt: skip
    check = gw.server.upstream.health_check
    assert check is not None
    async with asyncio.timeout(GUARD_SECONDS):
        await check.probe_all()
    assert (up(gw, silent.address), up(gw, b.address)) == (0, 1)


async def test_probes_take_no_tokens_and_are_not_logged(
    start_gateway: StartGateway, backends: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await backends("a", "b")
    gw = await start_gateway(
        limits={"default": bucket(2)},
        upstream=servers_config(a.url, b.url, health_check={"path": "/health"}),
    )
    check = gw.server.upstream.health_check
    assert check is not None
    for _ in range(5):
        await check.probe_all()
    assert (len(a.health_hits), len(b.health_hits)) >= (5, 5)
    assert [(await get(http, gw, "/"))[0] for _ in range(3)] == [200, 200, 429]
    await gw.server.stop()
    assert [r["path"] for r in gw.access_records()] == ["/", "/", "/"]
    total = sum(
        gw.metric("gateway_requests_total", {"route": "default", "decision": d})
        for d in ("allowed", "denied")
    )
    assert total == 3


# --------------------------------------------------------------------------- gateway check


def test_gateway_check_reports_upstream_problems_at_their_place(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstream:\n"
        "  url: http://127.0.0.1:8000\n"
        "  servers: [http://127.0.0.1:8001]\n"
        "  balance: random\n"
        "upstreams:\n"
        "  static:\n"
        "    servers: [http://127.0.0.1:8002, http://127.0.0.1:8002/]\n"
        "  empty: {servers: []}\n"
        "  default: {url: http://127.0.0.1:8003}\n"
        "routes:\n"
        "  - {path_prefix: /s, upstream: static}\n"
        "  - {path_prefix: /t, upstream: statik}\n"
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "6 problems found", result.stderr
    found = {}
    for line in lines[:-1]:
        match = PROBLEM_LINE.match(line)
        assert match is not None, line
        assert match["path"] == str(path)
        found[match["key"]] = (int(match["line"]), int(match["col"]), match["msg"])
    assert found["upstream.servers"][:2] == (3, 12)
    assert "url and servers are both given" in found["upstream.servers"][2]
    assert found["upstream.balance"][:2] == (4, 12)
    assert found["upstreams.static.servers"][0] == 7
    assert "list each server once" in found["upstreams.static.servers"][2]
    assert found["upstreams.empty.servers"][0] == 8
    assert found["upstreams.default"][:2] == (9, 3)
    assert "traceback" not in (result.stdout + result.stderr).lower()


def test_gateway_check_refuses_a_route_naming_no_upstream(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstream: {servers: [http://127.0.0.1:8000, http://127.0.0.1:8001]}\n"
        "upstreams:\n"
        "  static: {url: http://127.0.0.1:8002}\n"
        "routes:\n"
        "  - {path_prefix: /t, upstream: statik}\n"
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        f"{path}:5:33: routes[0].upstream: no upstream named 'statik': upstreams "
        "defines 'static' ('default' is `upstream`)"
    )


def test_gateway_check_accepts_several_servers(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstream:\n"
        "  servers: [http://127.0.0.1:8000, http://127.0.0.1:8001]\n"
        "  balance: least_conn\n"
        "  health_check: {path: /healthz, interval: 2s, timeout: 500ms}\n"
        "upstreams:\n"
        "  static: {url: http://127.0.0.1:8002, max_fails: 0}\n"
        "routes:\n"
        "  - {path_prefix: /static, upstream: static}\n"
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == (
        f"{path}: ok (1 route, 0 overrides, upstream http://127.0.0.1:8000, "
        "http://127.0.0.1:8001 (least_conn))"
    )


def test_a_server_address_is_host_and_port() -> None:
    from gateway.config.validate import server_address

    assert server_address("http://app-1:8000/v1") == "app-1:8000"
    assert server_address("https://app-1") == "app-1:443"
    assert server_address("http://[::1]:81") == "[::1]:81"
    assert server_address("http://127.0.0.1") == "127.0.0.1:80"


# --------------------------------------------------------------------------- workers


async def test_under_workers_the_supervisors_readyz_follows_every_workers_view(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer, backends: Any
) -> None:
    """Each worker keeps its own view of the servers' health; the supervisor's
    gauge is their maximum and its /readyz is 503 only when no worker has a
    server of the default upstream in rotation."""
    a, b = await backends("a", "b")
    config = workers_config(upstream, redis_server, tmp_path)
    config["upstream"] = {"servers": [a.url, b.url], "max_fails": 1, "read_timeout": "5s"}
    async with running_gateway(tmp_path, config) as gw:
        workers = children(gw.process.pid)
        assert len(workers) == 2
        await a.stop()
        await b.stop()
        for worker in sorted(workers):
            with only_serving(gw.process.pid, worker, workers):
                assert statuses_of(await fresh_connection_requests(gw.proxy, 1)) == [502]

        async def supervisor_readyz() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as http:
                return await readyz(http, gw.admin)

        async def unready() -> bool:
            return (await supervisor_readyz())[0] == 503

        await wait_until(unready, "the supervisor's /readyz 503", gw.output)
        _, body = await supervisor_readyz()
        assert body["checks"]["upstream_available"] is False
        assert body["servers_down"] == sorted([a.address, b.address])
        assert await gw.metric(UP, server=a.address) == 0

        await b.start()
        for worker in sorted(workers):
            with only_serving(gw.process.pid, worker, workers):
                assert statuses_of(await fresh_connection_requests(gw.proxy, 1)) == [200]

        async def ready_again() -> bool:
            status, body = await supervisor_readyz()
            return status == 200 and body.get("servers_down") == [a.address]

        await wait_until(ready_again, "the supervisor's /readyz 200 with a down", gw.output)

        # A reload routing to an upstream the workers do not run: refused once,
        # by the supervisor, before any worker is signalled.
        gw.write({
            **config,
            "upstreams": {"extra": {"url": b.url}},
            "routes": [{"path_prefix": "/x", "upstream": "extra"}],
        })  # fmt: skip
        gw.process.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return await gw.metric("gateway_config_reloads_total", result="failure") == 1

        await wait_until(refused, "the reload's refusal", gw.output)
        assert "routes[0].upstream: 'extra' is not running" in gw.output()
        assert await gw.metric("gateway_config_reloads_total", result="success") == 0
    assert gw.process.returncode == 0, gw.output()


async def test_a_websocket_upgrade_goes_on_to_another_server_after_a_connect_failure(
    start_gateway: StartGateway, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    live = f"http://127.0.0.1:{upstream.port}"
    gw = await start_gateway(upstream=servers_config(dead, live))
    async with http.ws_connect(gw.url + "/ws", protocols=("chat",)) as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
    await gw.server.stop()
    (record,) = gw.access_records()
    assert (record["status"], record["upstream_addr"]) == (
        101,
        f"127.0.0.1:{urlsplit(dead).port}, 127.0.0.1:{upstream.port}",
    )
