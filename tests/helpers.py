"""Helpers shared by the functional tests (fixtures live in tests/conftest.py).

Limits and configs, bounded polling, aiohttp client shortcuts, the /metrics
text exposition, raw-socket HTTP/1.1, counting forwarded requests, a real
``gateway run`` subprocess, the Redis clock, and running command-line tools.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp
import yaml
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from tests.upstream_app import ARRIVALS, Arrivals

if TYPE_CHECKING:
    import redis
    from aiohttp.test_utils import TestServer

    from tests.conftest import RunningGateway

GATEWAY = str(Path(sys.executable).parent / "gateway")
GUARD_SECONDS = 10.0  # a bound so a hang fails clearly; never a timing target
POLL_INTERVAL = 0.05
POLL_ATTEMPTS = 200  # x POLL_INTERVAL = 10 s at most
CLI_TIMEOUT_SECONDS = 20
HOUR_MS = 3_600_000
# ``PATH:LINE:COL: key.path: message``, as ``gateway check`` and ``run`` report problems.
PROBLEM_LINE = re.compile(
    r"^(?P<path>.+):(?P<line>\d+):(?P<col>\d+): (?P<key>\S+): (?P<msg>.+)$"
)


# --------------------------------------------------------------------------- limits, configs


def bucket(
    max_tokens: int, refill_tokens: int = 1, refill_period: str = "1h"
) -> dict[str, Any]:
    return {
        "refill_period": refill_period,
        "refill_tokens": refill_tokens,
        "max_tokens": max_tokens,
    }


def limits(
    max_tokens: int, refill_tokens: int = 1, refill_period: str = "1h"
) -> dict[str, Any]:
    return {"default": bucket(max_tokens, refill_tokens, refill_period)}


def config_yaml(config: dict[str, Any]) -> str:
    """``config`` as YAML, keys in the order given."""
    return yaml.safe_dump(config, sort_keys=False)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(config_yaml(config))
    return path


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (for servers that
    cannot bind port 0 and report back, like redis-server or ``gateway run``),
    or one nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_url(server: TestServer) -> str:
    """``http://127.0.0.1:PORT`` of a test server, without a trailing slash."""
    return str(server.make_url("")).rstrip("/")


# --------------------------------------------------------------------------- polling


async def poll(
    condition: Callable[[], bool | Awaitable[bool]],
    failure: str | Callable[[], str],
    *,
    attempts: int | None = None,
    seconds: float | None = None,
    interval: float = POLL_INTERVAL,
) -> None:
    """Until ``condition()`` holds, checked every ``interval`` seconds. Bounded
    by exactly one of ``attempts`` (checks, each followed by a sleep) or
    ``seconds`` (since the call); then AssertionError(``failure``), a string or
    a callable for one that describes the state at that moment."""
    if (attempts is None) == (seconds is None):
        raise TypeError("poll() takes exactly one of attempts= and seconds=")
    deadline = None if seconds is None else time.monotonic() + seconds
    checks = 0
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if deadline is not None and time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
        checks += 1
        if attempts is not None and checks >= attempts:
            break
    raise AssertionError(failure if isinstance(failure, str) else failure())


# --------------------------------------------------------------------------- HTTP clients


async def fetch(
    http: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with http.get(url, **kwargs) as response:
        body = await response.read()
        return response.status, response.headers, body


async def sequential(
    http: aiohttp.ClientSession, url: str, count: int, **kwargs: Any
) -> list[int]:
    """The statuses of ``count`` GETs of ``url``, one after the other."""
    statuses = []
    for _ in range(count):
        status, _headers, _body = await fetch(http, url, **kwargs)
        statuses.append(status)
    return statuses


async def http_status(session: aiohttp.ClientSession, url: str) -> int:
    """The status of a GET of ``url``; 0 when nothing answers."""
    with contextlib.suppress(aiohttp.ClientError, OSError):
        async with session.get(url) as response:
            await response.read()
            return response.status
    return 0


async def readyz(http: aiohttp.ClientSession, admin_url: str) -> tuple[int, Any]:
    async with http.get(admin_url + "/readyz") as response:
        return response.status, await response.json()


async def admin_buckets(
    http: aiohttp.ClientSession, admin_url: str, client: str
) -> dict[str, dict[str, Any]]:
    """The admin listener's view of ``client``: route -> bucket."""
    async with http.get(f"{admin_url}/admin/clients/{client}") as response:
        assert response.status == 200
        body = await response.json()
    assert body["client"] == client
    return {b["route"]: b for b in body["buckets"]}


async def admin_client(
    http: aiohttp.ClientSession, admin_url: str, client: str
) -> tuple[int, dict[str, Any]]:
    """/admin/clients/{client}: its status and body (404 when not tracked)."""
    async with http.get(f"{admin_url}/admin/clients/{client}") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


# --------------------------------------------------------------------------- /metrics


async def metrics_text(
    session: aiohttp.ClientSession, admin_url: str, *, plain: bool = True
) -> str:
    """The admin listener's /metrics. ``plain`` asks for no compression: the
    ``http`` fixture does not inflate; a default session does."""
    headers = {"Accept-Encoding": "identity"} if plain else {}
    async with session.get(admin_url + "/metrics", headers=headers) as response:
        assert response.status == 200
        return await response.text()


MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def metric_samples(text: str) -> dict[MetricKey, float]:
    """Every sample of a text exposition: (name, sorted label items) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    total = 0.0
    for (sample, sample_labels), value in metric_samples(text).items():
        found = dict(sample_labels)
        if sample == name and all(found.get(k) == v for k, v in labels.items()):
            total += value
    return total


async def scrape_sum(
    session: aiohttp.ClientSession,
    admin_url: str,
    name: str,
    *,
    plain: bool = True,
    **labels: str,
) -> float:
    """:func:`metric_sum` over the admin listener's /metrics, as it is now."""
    return metric_sum(await metrics_text(session, admin_url, plain=plain), name, **labels)


# --------------------------------------------------------------------------- raw HTTP/1.1


@dataclass
class RawResponse:
    status: int
    reason: str
    version: str
    headers: CIMultiDict[str]
    body: bytes
    complete: bool  # False when the connection ended before the framing said it would

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str = "127.0.0.1",
) -> bytes:
    """Request bytes exactly as given: no header is added but Host (so a
    body's framing headers are the caller's)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """For byte-level upstreams: one request's head, its Content-Length body
    read and dropped. Raises IncompleteReadError when the client is gone."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return head


async def read_head(reader: asyncio.StreamReader) -> tuple[str, int, str, CIMultiDict[str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a status line")
    version, status, reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.add(name.strip(), value.strip())
    return version, int(status), reason, headers


async def read_body(
    reader: asyncio.StreamReader, status: int, headers: CIMultiDict[str], *, head: bool
) -> tuple[bytes, bool]:
    if head or status in (204, 304) or 100 <= status < 200:
        return b"", True
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readline()
            if not size_line.endswith(b"\n"):
                return bytes(body), False
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body), True
            try:
                chunk = await reader.readexactly(size + 2)
            except asyncio.IncompleteReadError as exc:
                body += exc.partial[:size]
                return bytes(body), False
            body += chunk[:-2]
    length = headers.get("Content-Length")
    if length is not None:
        try:
            return await reader.readexactly(int(length)), True
        except asyncio.IncompleteReadError as exc:
            return exc.partial, False
    return await reader.read(), True  # delimited by the connection's end


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    version, status, reason, headers = await read_head(reader)
    body, complete = await read_body(reader, status, headers, head=head)
    return RawResponse(status, reason, version, headers, body, complete)


@contextlib.asynccontextmanager
async def raw_connection(
    gw: RunningGateway,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the gateway's proxy listener."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw_exchange(gw: RunningGateway, data: bytes, *, head: bool = False) -> RawResponse:
    """Send ``data`` on a fresh connection and read one response."""
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return await read_response(reader, head=head)


async def raw_exchange_to_close(gw: RunningGateway, data: bytes) -> tuple[RawResponse, bytes]:
    """Send ``data`` on a fresh connection; the first response and whatever
    follows it until the gateway closes the connection."""
    async with asyncio.timeout(GUARD_SECONDS), raw_connection(gw) as (reader, writer):
        writer.write(data)
        await writer.drain()
        response = await read_response(reader)
        return response, await reader.read()


# --------------------------------------------------------------------------- in-process gateway


def arrivals(upstream: TestServer) -> Arrivals:
    """Counts the requests reaching ``upstream`` from now on (they are in
    flight at the gateway), on either path; ``await arrivals.wait_for(n)``.
    Counted at the upstream, not by wrapping the gateway's methods: compiled
    classes cannot be patched (docs/compiled.md)."""
    counter = Arrivals()
    upstream.app[ARRIVALS].append(counter)
    return counter


async def wait_idle(gw: RunningGateway) -> None:
    """Until the gateway has finished every request it accepted."""
    async with asyncio.timeout(GUARD_SECONDS):
        await gw.server.core.idle.wait()


# --------------------------------------------------------------------------- `gateway run`

Output = int | IO[Any] | None  # what asyncio's subprocess takes for stdout/stderr


async def spawn_gateway(
    config_path: Path, *, stdout: Output, stderr: Output
) -> asyncio.subprocess.Process:
    """``gateway run --config CONFIG_PATH`` (the installed command)."""
    return await asyncio.create_subprocess_exec(
        GATEWAY, "run", "--config", str(config_path), stdout=stdout, stderr=stderr
    )


@contextlib.asynccontextmanager
async def gateway_run(
    config_path: Path, *, stdout: Output, stderr: Output
) -> AsyncIterator[asyncio.subprocess.Process]:
    """:func:`spawn_gateway`, killed on exit if it is still running."""
    process = await spawn_gateway(config_path, stdout=stdout, stderr=stderr)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_healthy(
    http: aiohttp.ClientSession, admin_url: str, process: asyncio.subprocess.Process
) -> None:
    """Until a starting ``gateway run`` answers /healthz 200 (bounded)."""

    async def healthy() -> bool:
        assert process.returncode is None, "gateway run exited during start-up"
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with http.get(admin_url + "/healthz") as response:
                return response.status == 200
        return False

    await poll(healthy, "/healthz never answered 200", attempts=POLL_ATTEMPTS)


@dataclass
class GatewayProcess:
    """A running ``gateway run`` and where it listens, logs and reads its config."""

    process: asyncio.subprocess.Process
    proxy: str
    admin: str
    config_path: Path
    access_log: Path
    config: dict[str, Any]
    output_path: Path | None = None  # stdout and stderr, where they go to a file

    @classmethod
    def of(
        cls,
        process: asyncio.subprocess.Process,
        config_path: Path,
        config: dict[str, Any],
        output_path: Path | None = None,
    ) -> GatewayProcess:
        return cls(
            process=process,
            proxy=f"http://{config['listen']}",
            admin=f"http://{config['admin']}",
            config_path=config_path,
            access_log=Path(config["access_log"]["path"]),
            config=config,
            output_path=output_path,
        )

    def write(self, config: dict[str, Any]) -> None:
        self.config = config
        write_config(self.config_path, config)

    def access_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]

    def output(self) -> str:
        assert self.output_path is not None
        return self.output_path.read_text(errors="replace")

    async def finish(self) -> tuple[int, str]:
        """Wait for the process to exit (after a signal); its code and stderr."""
        _stdout, stderr = await asyncio.wait_for(self.process.communicate(), GUARD_SECONDS)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode(errors="replace")

    async def metric(self, sample: str, **labels: str) -> float:
        """The sum over every series of ``sample`` matching ``labels`` on the
        admin listener's /metrics (a supervisor's: every worker's values added up)."""
        async with aiohttp.ClientSession() as session:
            return await scrape_sum(session, self.admin, sample, plain=False, **labels)

    async def status(self, path: str) -> int:
        """The admin listener's status for ``path``; 0 when it does not answer."""
        async with aiohttp.ClientSession() as session:
            return await http_status(session, self.admin + path)

    async def admin_json(self, path: str) -> tuple[int, Any]:
        """The admin listener's status and JSON body for ``path``."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin + path) as response,
        ):
            return response.status, await response.json()


# --------------------------------------------------------------------------- redis


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def clear_of_hour_boundary(client: redis.Redis, needed_seconds: float = 10.0) -> None:
    """Limits with refill_period 1h refill at whole hours of the Redis clock.
    A test that counts exactly must not straddle one: if the next boundary is
    less than ``needed_seconds`` away, wait until it has passed."""
    to_boundary_ms = HOUR_MS - redis_now_ms(client) % HOUR_MS
    if to_boundary_ms < needed_seconds * 1000:
        await asyncio.sleep(to_boundary_ms / 1000 + 0.05)


# --------------------------------------------------------------------------- commands


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: run scripts/setup --test"
    return path


def run(
    argv: list[str], *, timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``gateway`` command with ``args``."""
    return run([GATEWAY, *args], timeout=CLI_TIMEOUT_SECONDS)


def assert_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{shlex.join(result.args)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
