"""``workers: N`` as an operator runs it: a real ``gateway run`` subprocess
with two workers behind one listener, sharing buckets through a real
``redis-server``; the supervisor's /metrics, worker restarts, SIGHUP and
SIGTERM.

Everything listens on 127.0.0.1 on free ports. Waits on the subprocesses are
bounded polls (admin endpoints, /proc, the log file), never timing targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.conftest import RedisServer
from tests.helpers import (
    PROBLEM_LINE,
    GatewayProcess,
    base_url,
    bucket,
    clear_of_hour_boundary,
    free_port,
    metrics_text,
    poll,
    run_cli,
    spawn_gateway,
    tool,
    write_config,
)

GUARD_SECONDS = 15.0  # a bound so a hang fails clearly; never a timing target
# A worker's own reload line (logger "gateway"); the supervisor logs as
# "gateway.workers: supervisor: config reloaded ...".
WORKER_RELOADED = re.compile(r" gateway: config reloaded from ")


# --------------------------------------------------------------------------- helpers


def workers_config(
    upstream: TestServer, redis_server: RedisServer, tmp_path: Path, **overrides: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "workers": 2,
        "upstream": {"url": base_url(upstream), "read_timeout": "5s"},
        "limits": {"default": bucket(30)},
        # A generous timeout: a busy box must not turn into on_error: deny 429s.
        "storage": {
            "backend": "redis",
            "redis_url": redis_server.url,
            "on_error": "deny",
            "timeout": "1s",
        },
        "access_log": {"path": str(tmp_path / "access.log")},
        "drain_timeout": "5s",
    }
    config.update(overrides)
    return config


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, detail: Callable[[], str] = str
) -> None:
    """Bounded (GUARD_SECONDS) polling of a subprocess's state."""
    await poll(
        condition,
        lambda: f"timed out after {GUARD_SECONDS:.0f}s waiting for {what}\n{detail()}",
        seconds=GUARD_SECONDS,
    )


async def counted(gw: GatewayProcess, expected: float, sample: str, **labels: str) -> None:
    """The supervisor's /metrics shows ``expected`` for ``sample``: each
    worker copies its counts into the summed files once a second
    (gateway/metrics.py), so a count may take that long to appear."""
    seen: list[float] = []

    async def reached() -> bool:
        seen.append(await gw.metric(sample, **labels))
        return seen[-1] == expected

    await wait_until(
        reached, f"{sample}{labels or ''} == {expected}", detail=lambda: f"last: {seen[-1:]}"
    )


def children(pid: int) -> set[int]:
    """The direct children of ``pid``, from /proc (no extra dependency)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(p) for p in (task / "children").read_text().split())
    return found


def is_our_worker(pid: int, config_path: Path) -> bool:
    """Still this test's ``gateway worker`` (not a reused pid)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and str(config_path).encode() in argv


@contextlib.contextmanager
def only_serving(supervisor: int, serving: int, workers: set[int]) -> Iterator[None]:
    """Pause (SIGSTOP) every worker but ``serving`` so that new connections
    can only be accepted by it; resume them on exit. Deterministic routing
    to one worker through the shared listener. Only live children of
    ``supervisor`` are signalled (never a reused pid)."""
    paused = sorted((workers - {serving}) & children(supervisor))
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        alive = children(supervisor)
        for pid in paused:
            if pid in alive:
                os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def running_gateway(
    tmp_path: Path, config: dict[str, Any]
) -> AsyncIterator[GatewayProcess]:
    """``gateway run`` on ``config``; ready (/readyz 200, so every worker is
    running) on entry; stopped, and never left behind, on exit."""
    config_path = write_config(tmp_path / "gateway.yaml", config)
    output_path = tmp_path / "gateway.out"
    with output_path.open("wb") as output:
        process = await spawn_gateway(config_path, stdout=output, stderr=output)
    gw = GatewayProcess.of(process, config_path, config, output_path)
    workers: set[int] = set()
    try:

        async def ready() -> bool:
            assert process.returncode is None, f"gateway run exited:\n{gw.output()}"
            return await gw.status("/readyz") == 200

        await wait_until(ready, "/readyz 200")
        workers = children(process.pid)
        yield gw
    finally:
        if process.returncode is None:
            workers |= children(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), GUARD_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        for pid in workers:  # a worker left running would outlive the test
            if is_our_worker(pid, config_path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def spread_requests(
    url: str, connections: int, per_connection: int, **kwargs: Any
) -> list[tuple[int, CIMultiDict[str]]]:
    """``connections`` keep-alive connections, each sending ``per_connection``
    requests in turn, all connections at once."""

    async def one_connection(c: int) -> list[tuple[int, CIMultiDict[str]]]:
        out = []
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(per_connection):
                async with session.get(f"{url}/w/{c}/{i}", **kwargs) as response:
                    await response.read()
                    out.append((response.status, CIMultiDict(response.headers)))
        return out

    results = await asyncio.gather(*(one_connection(c) for c in range(connections)))
    return [item for result in results for item in result]


async def fresh_connection_requests(url: str, count: int) -> list[tuple[int, CIMultiDict[str]]]:
    """Each request on its own new connection (the kernel hands the accepts
    to whichever worker is waiting)."""
    out = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(count):
            async with session.get(f"{url}/{i}") as response:
                await response.read()
                out.append((response.status, CIMultiDict(response.headers)))
    return out


# --------------------------------------------------------------------------- tests


def statuses_of(results: list[tuple[int, CIMultiDict[str]]]) -> list[int]:
    return [status for status, _headers in results]


async def test_workers_share_one_limit_and_metrics_add_up(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer, rds: redis.Redis
) -> None:
    config = workers_config(upstream, redis_server, tmp_path)
    async with running_gateway(tmp_path, config) as gw:
        workers = children(gw.process.pid)
        assert len(workers) == 2
        first, second = sorted(workers)
        await clear_of_hour_boundary(rds, needed_seconds=20.0)
        # Each worker on its own first, then both at once; one shared bucket.
        with only_serving(gw.process.pid, first, workers):
            one = await spread_requests(gw.proxy, connections=4, per_connection=5)
        with only_serving(gw.process.pid, second, workers):
            two = await spread_requests(gw.proxy, connections=3, per_connection=10)
        both = await spread_requests(gw.proxy, connections=5, per_connection=10)
        assert statuses_of(one) == [200] * 20
        assert sorted(statuses_of(two)) == [200] * 10 + [429] * 20
        assert statuses_of(both) == [429] * 50
        results = one + two + both
        remaining = sorted(int(h["X-RateLimit-Remaining"]) for s, h in results if s == 200)
        assert remaining == list(range(30))  # no token handed out twice

        await counted(gw, 100, "gateway_requests_total")
        await counted(gw, 30, "gateway_requests_total", decision="allowed")
        await counted(gw, 70, "gateway_requests_total", decision="denied")
        await counted(gw, 100, "gateway_request_duration_seconds_count")
        await counted(gw, 30, "gateway_responses_total", code="200")
        await counted(gw, 70, "gateway_responses_total", code="429")
        async with aiohttp.ClientSession() as session:
            exposition = await metrics_text(session, gw.admin, plain=False)
        checked = await asyncio.to_thread(
            subprocess.run,
            [tool("promtool"), "check", "metrics"],
            input=exposition, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
    assert gw.process.returncode == 0, gw.output()


def test_check_rejects_workers_with_memory_storage(tmp_path: Path) -> None:
    config_path = write_config(
        tmp_path / "workers.yaml",
        {
            "upstream": {"url": "http://127.0.0.1:8000"},
            "workers": 2,
            "storage": {"backend": "memory"},
        },
    )
    result = run_cli("check", "--config", str(config_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    problems = [
        match
        for line in result.stderr.splitlines()
        if (match := PROBLEM_LINE.match(line)) is not None
    ]
    assert len(problems) == 1, result.stderr
    assert problems[0]["path"] == str(config_path)
    assert problems[0]["key"] == "workers"
    assert "redis" in problems[0]["msg"]


async def test_a_killed_worker_is_restarted_and_counted(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer
) -> None:
    config = workers_config(upstream, redis_server, tmp_path, limits={"default": bucket(1000)})
    async with running_gateway(tmp_path, config) as gw:
        before = children(gw.process.pid)
        assert len(before) == 2
        assert await gw.metric("gateway_workers_restarted_total") == 0
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        # The survivor keeps the listener serving meanwhile.
        results = await fresh_connection_requests(gw.proxy, 10)
        assert statuses_of(results) == [200] * 10

        async def restarted() -> bool:
            return await gw.metric("gateway_workers_restarted_total") == 1

        await wait_until(restarted, "gateway_workers_restarted_total == 1", detail=gw.output)

        async def replaced() -> bool:
            now = children(gw.process.pid)
            return len(now) == 2 and victim not in now

        await wait_until(replaced, "a second worker again", detail=gw.output)

        async def ready() -> bool:
            return await gw.status("/readyz") == 200

        await wait_until(ready, "/readyz 200 with both workers running", detail=gw.output)
        assert await gw.status("/healthz") == 200
        # The replacement serves too (the survivor paused meanwhile).
        workers = children(gw.process.pid)
        (replacement,) = workers - before
        with only_serving(gw.process.pid, replacement, workers):
            results = await fresh_connection_requests(gw.proxy, 5)
        assert statuses_of(results) == [200] * 5
        results = await fresh_connection_requests(gw.proxy, 10)
        assert statuses_of(results) == [200] * 10
        assert await gw.metric("gateway_workers_restarted_total") == 1
        assert gw.output().count("exited with") == 1
    assert gw.process.returncode == 0, gw.output()


async def test_sighup_reaches_the_workers_and_sigterm_drains(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer, rds: redis.Redis
) -> None:
    config = workers_config(upstream, redis_server, tmp_path)
    answered: list[int] = []
    async with running_gateway(tmp_path, config) as gw:
        workers = children(gw.process.pid)
        assert len(workers) == 2
        await clear_of_hour_boundary(rds, needed_seconds=20.0)
        # No /tight route yet: the default bucket (30). Each worker answers
        # once, so both are serving (their SIGHUP handlers are in place).
        for pid in sorted(workers):
            with only_serving(gw.process.pid, pid, workers):
                results = await fresh_connection_requests(gw.proxy + "/tight", 3)
            answered += statuses_of(results)
            assert {h["X-RateLimit-Limit"] for _s, h in results} == {"30"}
        assert answered == [200] * 6

        reloaded = {**config, "routes": [{"path_prefix": "/tight", "limit": bucket(2)}]}
        write_config(gw.config_path, reloaded)
        gw.process.send_signal(signal.SIGHUP)

        async def both_workers_reloaded() -> bool:
            return len(WORKER_RELOADED.findall(gw.output())) == 2

        await wait_until(
            both_workers_reloaded, "both workers to log the reload", detail=gw.output
        )
        assert await gw.metric("gateway_config_reloads_total", result="success") == 1

        # The new route's own bucket (2), on each worker, then on both.
        tight: list[tuple[int, CIMultiDict[str]]] = []
        for pid in sorted(workers):
            with only_serving(gw.process.pid, pid, workers):
                tight += await fresh_connection_requests(gw.proxy + "/tight", 1)
        tight += await fresh_connection_requests(gw.proxy + "/tight", 10)
        answered += statuses_of(tight)
        assert statuses_of(tight) == [200] * 2 + [429] * 10
        assert {h["X-RateLimit-Limit"] for _s, h in tight} == {"2"}
        # The default bucket kept its tokens: 24 of 30 left.
        results = await spread_requests(gw.proxy, connections=3, per_connection=10)
        answered += statuses_of(results)
        assert statuses_of(results).count(200) == 24
        await counted(gw, len(answered), "gateway_requests_total")
        assert children(gw.process.pid) == workers  # reloaded, not restarted
        assert await gw.metric("gateway_workers_restarted_total") == 0

        gw.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(gw.process.wait(), GUARD_SECONDS)
        except TimeoutError:
            raise AssertionError(f"no exit after SIGTERM:\n{gw.output()}") from None
    assert gw.process.returncode == 0, gw.output()
    assert "Traceback" not in gw.output()

    records = gw.access_records()
    assert len(records) == len(answered)
    assert sorted(r["status"] for r in records) == sorted(answered)
    by_route = [(r["route"], r["decision"]) for r in records]
    assert by_route.count(("/tight", "allowed")) == 2
    assert by_route.count(("/tight", "denied")) == 10
    assert by_route.count(("default", "allowed")) == 30


async def test_sighup_as_soon_as_ready_reloads_every_worker_without_killing_one(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer
) -> None:
    """An operator may reload the moment /readyz says 200 (config management
    does): the reload must reach every worker, and none may die of it."""
    config = workers_config(upstream, redis_server, tmp_path)
    async with running_gateway(tmp_path, config) as gw:
        workers = children(gw.process.pid)
        assert len(workers) == 2
        reloaded = {**config, "routes": [{"path_prefix": "/tight", "limit": bucket(2)}]}
        write_config(gw.config_path, reloaded)
        gw.process.send_signal(signal.SIGHUP)

        # A reload is asynchronous (supervisor validates, then signals each
        # worker): wait for both workers to log it, as an operator would.
        async def both_workers_reloaded() -> bool:
            return len(WORKER_RELOADED.findall(gw.output())) >= 2

        await wait_until(
            both_workers_reloaded, "both workers to log the reload", detail=gw.output
        )
        for pid in sorted(workers):
            assert pid in children(gw.process.pid), f"worker {pid} died:\n{gw.output()}"
            with only_serving(gw.process.pid, pid, workers):
                results = await fresh_connection_requests(gw.proxy + "/tight", 1)
            assert {h["X-RateLimit-Limit"] for _s, h in results} == {"2"}, pid
        assert children(gw.process.pid) == workers, gw.output()
        assert await gw.metric("gateway_workers_restarted_total") == 0, gw.output()
        assert "exited with" not in gw.output()
    assert gw.process.returncode == 0, gw.output()


async def test_a_taken_admin_port_fails_the_start_in_one_line_before_any_worker(
    upstream: TestServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The supervisor binds the admin listener before it starts workers: a
    taken port is one clear line and exit 1, with no worker left to notice
    its supervisor gone."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = workers_config(upstream, redis_server, tmp_path, admin=f"127.0.0.1:{port}")
        config_path = write_config(tmp_path / "gateway.yaml", config)
        process = await spawn_gateway(
            config_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(GUARD_SECONDS):
            stdout, stderr = await process.communicate()
    output = (stdout + stderr).decode()
    assert process.returncode == 1, output
    assert "cannot start" in output, output
    assert "in use" in output, output
    assert "supervisor is gone" not in output, output
    assert "Traceback" not in output, output


async def test_the_supervisor_logs_one_line_per_route(
    upstream: TestServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = workers_config(
        upstream, redis_server, tmp_path,
        routes=[{"path_prefix": "/login", "limit": bucket(5)}],
    )  # fmt: skip
    async with running_gateway(tmp_path, config) as gw:
        output = gw.output()
    assert output.count("route /login") == 1, output


def worker_index(pid: int) -> int:
    """The ``--index`` a worker was started with, from /proc."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--index") + 1])


def shared_dir(pid: int) -> Path:
    """The directory a worker shares with its supervisor (metrics, top denied)."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError(f"worker {pid} has no PROMETHEUS_MULTIPROC_DIR")


async def keyed_requests(url: str, key: str, count: int) -> list[int]:
    """``count`` GETs with ``X-API-Key: key``, each on a new connection."""
    statuses = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(count):
            async with session.get(url, headers={"X-API-Key": key}) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def test_admin_views_are_one_answer_for_every_worker(
    tmp_path: Path, upstream: TestServer, redis_server: RedisServer, rds: redis.Redis
) -> None:
    config = workers_config(
        upstream, redis_server, tmp_path,
        clients={"identify_by": "header"},
        limits={"default": bucket(2)},
        routes=[{"path_prefix": "/api", "limit": bucket(1)}],
    )  # fmt: skip
    async with running_gateway(tmp_path, config) as gw:
        workers = children(gw.process.pid)
        first, second = sorted(workers)
        await clear_of_hour_boundary(rds, needed_seconds=30.0)
        # Each worker denies on its own; the supervisor answers for both.
        with only_serving(gw.process.pid, first, workers):
            assert await keyed_requests(gw.proxy + "/api", "key-a", 5) == [200] + [429] * 4
        with only_serving(gw.process.pid, second, workers):
            assert await keyed_requests(gw.proxy + "/api", "key-a", 3) == [429] * 3
            assert await keyed_requests(gw.proxy + "/x", "key-b", 4) == [200] * 2 + [429] * 2

        async def both_merged() -> bool:
            status, body = await gw.admin_json("/admin/clients")
            return status == 200 and [(c["client"], c["denied"]) for c in body["clients"]] == [
                ("key-a", 7),
                ("key-b", 2),
            ]

        await wait_until(both_merged, "both workers' denials in /admin/clients", gw.output)
        _status, body = await gw.admin_json("/admin/clients")
        assert (body["workers"], body["denied_total"]) == (2, 9)
        key_a = body["clients"][0]
        assert key_a["routes"] == {"/api": 7}
        assert [(b["route"], b["tokens"], b["held"]) for b in key_a["buckets"]] == [
            ("/api", 0, True)  # read from the shared redis by the supervisor
        ]
        assert {r["route"]: r["denied_total"] for r in body["routes"]} == {
            "/api": 7,
            "default": 2,
        }
        status, client = await gw.admin_json("/admin/clients/key-a")
        assert (status, client["denied"]) == (200, {"count": 7, "error": 0})
        status, stats = await gw.admin_json("/admin/stats")
        assert status == 200
        assert stats["workers"] == 2
        decisions = {
            r["route"]: {d: n for d, n in r["decisions"].items() if n} for r in stats["routes"]
        }
        assert decisions == {
            "/api": {"allowed": 1, "denied": 7},
            "default": {"allowed": 2, "denied": 2},
        }

        # A killed worker's denials outlive it: its replacement resumes its
        # file, then rewrites it (an empty sketch would drop key-a to 3).
        path = shared_dir(first) / f"top-denied-{worker_index(first)}.json"
        before = path.stat()
        os.kill(first, signal.SIGKILL)

        async def rewritten() -> bool:
            now = path.stat()
            return (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)

        await wait_until(rewritten, f"the replacement worker to rewrite {path}", gw.output)
        assert first not in children(gw.process.pid)
        _status, body = await gw.admin_json("/admin/clients")
        assert [(c["client"], c["denied"]) for c in body["clients"]] == [
            ("key-a", 7),
            ("key-b", 2),
        ]
    assert gw.process.returncode == 0, gw.output()
    assert "Traceback" not in gw.output()
