"""A worker's counts reach the files its supervisor sums (multiprocess mode):
once a second from the refill clock, and all of them when the server stops.

The worker is a real ``Server`` in a fresh interpreter (prometheus_client
picks its value store at import) with PROMETHEUS_MULTIPROC_DIR set, in front
of a real upstream, on a ManualRefillClock: the test says when a second
passes, so "not yet copied" and "copied" are both observable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import asyncio, json, sys
import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from gateway.config import parse_config
from gateway.limiting.refill_clock import ManualRefillClock
from gateway.server import Server
from tests.conftest import gateway_yaml
from tests.helpers import base_url, limits
from tests.upstream_app import build_upstream_app

DIRECTORY = sys.argv[1]

def summed():
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=DIRECTORY)
    read = registry.get_sample_value
    return {
        "allowed": read("gateway_requests_total", {"route": "default", "decision": "allowed"}),
        "denied": read("gateway_requests_total", {"route": "default", "decision": "denied"}),
        "429": read("gateway_responses_total", {"route": "default", "code": "429"}),
        "durations": read("gateway_request_duration_seconds_count", {"route": "default"}),
    }

async def main():
    upstream = TestServer(build_upstream_app(), host="127.0.0.1")
    await upstream.start_server()
    text = gateway_yaml(base_url(upstream), "off", limits=limits(3), access_log={"path": "off"})
    clock = ManualRefillClock()
    server = Server(parse_config(text), clock=clock, registry=CollectorRegistry())
    await server.start()
    url = f"http://127.0.0.1:{server.proxy_port}/"
    seen = {}
    async with aiohttp.ClientSession() as session:
        async def send(count):
            for _ in range(count):
                async with session.get(url) as response:
                    await response.read()
        await send(2)
        seen["before a second passed"] = summed()
        clock.advance(1.0)
        seen["after a second"] = summed()
        await send(4)
    await server.stop()
    seen["after stop"] = summed()
    await upstream.close()
    print(json.dumps(seen))

asyncio.run(main())
"""


def test_counts_reach_the_files_each_second_and_all_of_them_at_stop(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        # Series exist from their first request, at 0 until the next copy.
        "before a second passed": {
            "allowed": 0.0,
            "denied": 0.0,
            "429": None,
            "durations": 0.0,
        },
        "after a second": {"allowed": 2.0, "denied": 0.0, "429": None, "durations": 2.0},
        # limits(3): the sixth request is the first denied.
        "after stop": {"allowed": 3.0, "denied": 3.0, "429": 3.0, "durations": 6.0},
    }
