"""Graceful drain, stop and reload: in-process (``Server.stop`` / ``Server.reload``)
and as an operator drives them, with real signals to a ``gateway run`` process.

Everything listens on 127.0.0.1. In-process tests wait on events (the
gateway's forward calls are counted through a thin wrapper); only the
subprocess tests poll, with bounded attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from tests.conftest import RunningGateway, StartGateway, gateway_yaml
from tests.helpers import (
    GUARD_SECONDS,
    POLL_ATTEMPTS,
    POLL_INTERVAL,
    GatewayProcess,
    admin_buckets,
    arrivals,
    base_url,
    bucket,
    config_yaml,
    fetch,
    free_port,
    gateway_run,
    metric_samples,
    metrics_text,
    poll,
    readyz,
    wait_healthy,
    wait_idle,
    write_config,
)
from tests.upstream_app import HITS

# --------------------------------------------------------------------------- helpers


async def admitted_until_denied(http: aiohttp.ClientSession, url: str, limit: int = 200) -> int:
    """Requests answered 200 before the first 429 (sequential)."""
    for admitted in range(limit):
        status, _headers, _body = await fetch(http, url)
        if status == 429:
            return admitted
        assert status == 200, status
    raise AssertionError(f"never denied within {limit} requests")


async def default_tokens(gw: RunningGateway, http: aiohttp.ClientSession, client: str) -> int:
    tokens: int = (await admin_buckets(http, gw.admin_url, client))["default"]["tokens"]
    return tokens


def rewrite_config(gw: RunningGateway, **overrides: Any) -> None:
    """Rewrite the running gateway's file with the same listeners and log."""
    assert gw.config_path is not None
    upstream_url = gw.server.config.upstream.url
    gw.config_path.write_text(gateway_yaml(upstream_url, gw.access_log_path, **overrides))


# -- a real `gateway run` process --


def process_config(upstream: TestServer, access_log: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "upstream": {"url": base_url(upstream), "read_timeout": "10s"},
        "limits": {"default": bucket(100)},
        "access_log": {"path": str(access_log)},
        "drain_timeout": "5s",
    }
    config.update(overrides)
    return config


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, http: aiohttp.ClientSession, config: dict[str, Any]
) -> AsyncIterator[GatewayProcess]:
    config_path = write_config(tmp_path / "gateway.yaml", config)
    async with gateway_run(
        config_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    ) as process:
        running = GatewayProcess.of(process, config_path, config)
        await wait_healthy(http, running.admin, process)
        yield running


async def scrape(
    http: aiohttp.ClientSession, admin: str, name: str, labels: dict[str, str]
) -> float:
    """The sample of ``name`` with exactly ``labels`` (0.0 when there is none)."""
    samples = metric_samples(await metrics_text(http, admin))
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for_metric(
    http: aiohttp.ClientSession,
    admin: str,
    name: str,
    labels: dict[str, str],
    expected: float,
) -> None:
    value = 0.0

    async def reached() -> bool:
        nonlocal value
        value = await scrape(http, admin, name, labels)
        return value == expected

    await poll(
        reached,
        lambda: f"{name}{labels} stayed {value}, expected {expected}",
        attempts=POLL_ATTEMPTS,
    )


async def wait_for_hits(upstream: TestServer, path: str, count: int) -> None:
    """Until the upstream saw ``path`` ``count`` times (sent by a subprocess)."""
    await poll(
        lambda: upstream.app[HITS].count(path) >= count,
        lambda: f"the upstream never saw {path!r} x{count}: {upstream.app[HITS]}",
        attempts=POLL_ATTEMPTS,
        interval=POLL_INTERVAL / 5,
    )


# --------------------------------------------------------------------------- in-process drain


async def test_stop_drains_in_flight_requests_and_refuses_new_connections(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: TestServer,
) -> None:
    gw = await start_gateway(drain_timeout="5s")
    forwards = arrivals(upstream)
    slow_paths = [f"/slow?delay=0.5&n={i}" for i in range(3)]
    slow = [asyncio.create_task(fetch(http, gw.url + path)) for path in slow_paths]
    stream_path = "/stream?n=20&delay=0.05"
    stream = await http.get(gw.url + stream_path)
    try:
        assert stream.status == 200
        first_line = await stream.content.readline()
        assert first_line == b"part 0\n"
        await forwards.wait_for(4)  # every request is in flight at the gateway

        stopping = asyncio.create_task(gw.server.stop())
        # While draining: not ready, and the admin listener still answers.
        status, body = await readyz(http, gw.admin_url)
        assert status == 503
        assert body["ready"] is False
        assert body["checks"]["not_draining"] is False
        assert not stopping.done(), "stop() returned before in-flight requests finished"
        # The proxy listener is closed: a new connection is refused.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", gw.server.proxy_port)

        results = await asyncio.wait_for(asyncio.gather(*slow), GUARD_SECONDS)
        rest = await asyncio.wait_for(stream.content.read(), GUARD_SECONDS)
    finally:
        stream.release()
    assert [(s, b) for s, _h, b in results] == [(200, b"slow")] * 3
    assert first_line + rest == b"".join(f"part {i}\n".encode() for i in range(20))

    await asyncio.wait_for(stopping, GUARD_SECONDS)
    records = gw.access_records()
    by_path = {r["path"]: r for r in records}
    assert sorted(by_path) == sorted([*slow_paths, stream_path])
    assert len(records) == 4
    assert all(r["status"] == 200 for r in records)
    assert by_path[stream_path]["bytes_out"] == len(first_line + rest)


async def test_stop_gives_up_on_stuck_requests_after_drain_timeout(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: TestServer,
) -> None:
    gw = await start_gateway(drain_timeout="300ms")
    forwards = arrivals(upstream)
    stuck = asyncio.create_task(fetch(http, gw.url + "/slow?delay=5"))
    await forwards.wait_for(1)

    started = time.monotonic()
    await asyncio.wait_for(gw.server.stop(), GUARD_SECONDS)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"stop() took {elapsed:.2f}s with drain_timeout 300ms"

    # The stuck request was cut, not answered as if it had completed.
    outcome: tuple[int, CIMultiDictProxy[str], bytes] | BaseException
    try:
        outcome = await asyncio.wait_for(stuck, GUARD_SECONDS)
    except aiohttp.ClientError as exc:
        outcome = exc
    assert not (isinstance(outcome, tuple) and outcome[0] == 200), outcome


# --------------------------------------------------------------------------- in-process reload


async def test_reload_keeps_tokens_of_unchanged_limits_and_applies_changed_ones(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits={"default": bucket(10)})
    for i in range(4):
        status, _headers, _body = await fetch(http, f"{gw.url}/drain/{i}")
        assert status == 200
    assert await default_tokens(gw, http, "127.0.0.1") == 6

    # An unrelated change (a new route): the default bucket keeps its 6 tokens.
    rewrite_config(
        gw,
        limits={"default": bucket(10)},
        routes=[{"path_prefix": "/unrelated", "limit": bucket(3)}],
    )
    assert gw.server.reload() is True
    assert gw.metric("gateway_config_reloads_total", {"result": "success"}) == 1
    assert await default_tokens(gw, http, "127.0.0.1") == 6
    status, headers, _body = await fetch(http, gw.url + "/after-unrelated")
    assert status == 200
    assert headers["X-RateLimit-Limit"] == "10"
    assert headers["X-RateLimit-Remaining"] == "5"

    # A changed limit applies from the very next request (and grants nothing).
    rewrite_config(
        gw,
        limits={"default": bucket(2)},
        routes=[{"path_prefix": "/unrelated", "limit": bucket(3)}],
    )
    assert gw.server.reload() is True
    assert gw.metric("gateway_config_reloads_total", {"result": "success"}) == 2
    status, headers, _body = await fetch(http, gw.url + "/after-change")
    assert status == 200
    assert headers["X-RateLimit-Limit"] == "2"
    assert headers["X-RateLimit-Remaining"] == "1"
    assert await admitted_until_denied(http, gw.url + "/more") == 1
    assert gw.metric("gateway_config_reloads_total", {"result": "failure"}) == 0


async def test_reload_under_load_fails_no_request(
    start_gateway: StartGateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    big = bucket(1_000_000)
    gw = await start_gateway(limits={"default": big})
    configs = [
        {
            "limits": {"default": bucket(999_999)},
            "routes": [{"path_prefix": "/r", "limit": big}],
        },
        {"limits": {"default": big}, "routes": []},
    ]
    per_reload = 400  # completed requests between two reloads
    reloads = 10
    statuses: list[int] = []
    errors: list[BaseException] = []
    progress = asyncio.Condition()
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                status, _headers, _body = await fetch(http, f"{gw.url}/load/{n}/{i}")
                statuses.append(status)
            except (aiohttp.ClientError, OSError) as exc:
                errors.append(exc)
            i += 1
            async with progress:
                progress.notify_all()

    def completed() -> int:
        return len(statuses) + len(errors)

    workers = [asyncio.create_task(worker(n)) for n in range(20)]
    try:
        async with asyncio.timeout(30):
            for i in range(reloads):
                async with progress:
                    await progress.wait_for(lambda i=i: completed() >= (i + 1) * per_reload)
                rewrite_config(gw, **configs[i % 2])
                assert gw.server.reload() is True
            async with progress:
                await progress.wait_for(lambda: completed() >= (reloads + 1) * per_reload)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert errors == []
    assert len(statuses) >= (reloads + 1) * per_reload
    assert set(statuses) == {200}
    assert gw.metric("gateway_config_reloads_total", {"result": "success"}) == reloads
    # Nothing went wrong quietly either: no warning or error logged at all.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert gw.metric("gateway_config_reloads_total", {"result": "failure"}) == 0


# --------------------------------------------------------------------------- real signals


async def test_sigterm_lets_the_in_flight_request_finish_and_logs_it(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    config = process_config(upstream, tmp_path / "access.log")
    async with gateway_process(tmp_path, http, config) as gp:
        path = "/slow?delay=1"
        in_flight = asyncio.create_task(fetch(http, gp.proxy + path))
        await wait_for_hits(upstream, path, 1)
        gp.process.send_signal(signal.SIGTERM)
        status, _headers, body = await asyncio.wait_for(in_flight, GUARD_SECONDS)
        code, stderr = await gp.finish()
    assert (status, body) == (200, b"slow")
    assert code == 0, stderr
    assert "Traceback" not in stderr
    records = gp.access_records()
    assert [(r["path"], r["status"]) for r in records] == [(path, 200)]


async def test_sighup_applies_a_changed_limit(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    config = process_config(upstream, tmp_path / "access.log", limits={"default": bucket(100)})
    async with gateway_process(tmp_path, http, config) as gp:
        status, headers, _body = await fetch(http, gp.proxy + "/before")
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "100"

        gp.write({**gp.config, "limits": {"default": bucket(3)}})
        gp.process.send_signal(signal.SIGHUP)
        await wait_for_metric(
            http, gp.admin, "gateway_config_reloads_total", {"result": "success"}, 1.0
        )
        status, headers, _body = await fetch(http, gp.proxy + "/after")
        assert status == 200
        assert headers["X-RateLimit-Limit"] == "3"
        assert await admitted_until_denied(http, gp.proxy + "/more") == 2
        assert (
            await scrape(http, gp.admin, "gateway_config_reloads_total", {"result": "failure"})
            == 0
        )

        gp.process.send_signal(signal.SIGTERM)
        code, stderr = await gp.finish()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def config_text(config: dict[str, Any]) -> list[str]:
    return config_yaml(config).splitlines()


async def test_sighup_with_an_invalid_file_keeps_the_old_config(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    config = process_config(upstream, tmp_path / "access.log", limits={"default": bucket(3)})
    async with gateway_process(tmp_path, http, config) as gp:
        status, _headers, _body = await fetch(http, gp.proxy + "/one")
        assert status == 200
        path = gp.config_path

        # 1. Not YAML at all: "mode: enforce: shadow" (a mapping value where
        #    none is allowed, at the second colon).
        lines = [*config_text(gp.config), "mode: enforce: shadow"]
        path.write_text("\n".join(lines) + "\n")
        yaml_error_at = (len(lines), len("mode: enforce:"))
        gp.process.send_signal(signal.SIGHUP)
        await wait_for_metric(
            http, gp.admin, "gateway_config_reloads_total", {"result": "failure"}, 1.0
        )

        # 2. Valid YAML, bad value: max_tokens -1.
        bad = {**gp.config, "limits": {"default": bucket(3)}}
        lines = config_text(bad)
        index = lines.index("    max_tokens: 3")
        lines[index] = "    max_tokens: -1"
        path.write_text("\n".join(lines) + "\n")
        value_error_at = (index + 1, len("    max_tokens: ") + 1)
        gp.process.send_signal(signal.SIGHUP)
        await wait_for_metric(
            http, gp.admin, "gateway_config_reloads_total", {"result": "failure"}, 2.0
        )

        # The old config keeps serving: 3 tokens, one spent.
        assert await admitted_until_denied(http, gp.proxy + "/still") == 2
        status, body = await readyz(http, gp.admin)
        assert status == 200, body
        assert (
            await scrape(http, gp.admin, "gateway_config_reloads_total", {"result": "success"})
            == 0
        )

        gp.process.send_signal(signal.SIGTERM)
        code, stderr = await gp.finish()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    line, col = yaml_error_at
    assert f"{path}:{line}:{col}: " in stderr, stderr
    line, col = value_error_at
    assert f"{path}:{line}:{col}: limits.default.max_tokens: " in stderr, stderr


async def test_second_sigterm_during_drain_exits_at_once(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    config = process_config(upstream, tmp_path / "access.log", drain_timeout="30s")
    async with gateway_process(tmp_path, http, config) as gp:
        path = "/slow?delay=20"
        in_flight = asyncio.create_task(fetch(http, gp.proxy + path))
        await wait_for_hits(upstream, path, 1)
        gp.process.send_signal(signal.SIGTERM)

        async def draining() -> bool:  # draining: /readyz turns 503
            status, _body = await readyz(http, gp.admin)
            return status == 503

        await poll(draining, "/readyz never reported draining", attempts=POLL_ATTEMPTS)
        assert gp.process.returncode is None
        # Let the drain settle into waiting for the in-flight request (nothing
        # observable marks that moment), as with an operator's second Ctrl-C.
        await asyncio.sleep(0.3)
        assert gp.process.returncode is None

        started = time.monotonic()
        gp.process.send_signal(signal.SIGTERM)
        _code, stderr = await gp.finish()
        elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"exit took {elapsed:.2f}s after the second SIGTERM\n{stderr}"
    with contextlib.suppress(aiohttp.ClientError):
        outcome = await asyncio.wait_for(in_flight, GUARD_SECONDS)
        assert outcome[0] != 200, "a 20 s request cannot have completed"
    # Forced, but still an orderly exit: one line saying so, no stack dumps
    # (nginx's fast shutdown and Envoy's second signal print none).
    assert "exiting without drain" in stderr
    assert "Traceback" not in stderr, stderr


async def test_a_reload_lets_the_old_snapshot_go(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer
) -> None:
    """The heap alive at start and at each reload is hidden from the cyclic
    GC (server.settle_heap), so the snapshot a reload replaces must be freed
    by reference counting alone: when the last request that started under it
    finishes, even if that request was in flight during the reload."""
    gw = await start_gateway()
    forwards = arrivals(upstream)
    # The identifier's address cache: the identifier itself may be compiled,
    # and compiled instances cannot be weakly referenced.
    replaced = weakref.ref(gw.server.core.snapshot.identifier._is_trusted)
    slow = asyncio.create_task(fetch(http, gw.url + "/slow?delay=0.3"))
    await forwards.wait_for(1)
    gw.server.apply(gw.server.config)
    assert replaced() is not None  # the slow request still runs under it
    status, _, _ = await asyncio.wait_for(slow, GUARD_SECONDS)
    assert status == 200
    await wait_idle(gw)
    assert replaced() is None, "the replaced snapshot outlived its last request"
    status, _, _ = await fetch(http, gw.url + "/echo")
    assert status == 200


async def test_sigterm_forwards_a_queued_request_within_drain_timeout(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    """A request waiting for its reserved token when SIGTERM comes is still
    forwarded (queue.max_wait never exceeds drain_timeout: gateway check
    refuses it), logged as delayed, and the process exits 0."""
    config = process_config(
        upstream,
        tmp_path / "access.log",
        limits={"default": bucket(1, 1, "1s")},
        routes=[{"path_prefix": "/", "queue": {"max_wait": "2s", "max_queued": 10}}],
    )
    async with gateway_process(tmp_path, http, config) as gp:
        status, _headers, _body = await fetch(http, gp.proxy + "/first")
        assert status == 200
        queued = asyncio.create_task(fetch(http, gp.proxy + "/queued"))
        await wait_for_metric(
            http, gp.admin, "gateway_requests_total", {"route": "/", "decision": "delayed"}, 1.0
        )
        gp.process.send_signal(signal.SIGTERM)
        status, _headers, _body = await asyncio.wait_for(queued, GUARD_SECONDS)
        code, stderr = await gp.finish()
    assert status == 200
    assert code == 0, stderr
    records = {r["path"]: r for r in gp.access_records()}
    assert (records["/queued"]["decision"], records["/queued"]["status"]) == ("delayed", 200)
