"""The access log's producer/consumer queue under a slow sink, on a clean stop,
and /healthz when a background part dies."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import aiohttp

from gateway.access_log import FIELDS
from tests.conftest import StartGateway
from tests.helpers import limits

BIG_BUCKET = limits(100_000)


class SlowReader:
    """Reads a FIFO: nothing at all until ``release()``, then everything."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[bytes] = []
        self.released = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.path, "rb") as fifo:  # blocks until the gateway opens it
            self.released.wait()
            self.lines = fifo.read().splitlines()

    def release(self) -> None:
        self.released.set()

    def join(self) -> None:
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the reader never saw the end of the log"


async def send(http: aiohttp.ClientSession, url: str, count: int, width: int = 20) -> list[int]:
    statuses: list[int] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            async with http.get(url) as response:
                await response.read()
                statuses.append(response.status)

    await asyncio.gather(*(worker(count // width) for _ in range(width)))
    return statuses


async def test_stuck_sink_drops_and_counts_but_never_blocks_requests(
    start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = SlowReader(fifo)
    gw = await start_gateway(
        limits=BIG_BUCKET, access_log={"path": str(fifo), "queue_size": 50}
    )
    requests = 2000

    statuses = await send(http, gw.url + "/echo", requests)

    # Every request was answered while the sink accepted nothing: the pipe
    # holds at most 64 KiB (~250 lines), the queue 50, so most records had to
    # be dropped rather than waited for.
    assert statuses == [200] * requests
    assert not reader.released.is_set()
    dropped = gw.metric("gateway_access_log_dropped_total")
    assert dropped > requests / 2

    reader.release()
    await gw.server.stop()
    reader.join()
    print(f"slow sink: {requests} answered, {len(reader.lines)} written, {dropped:.0f} dropped")
    # Nothing lost beyond what was counted: written + dropped = answered.
    assert len(reader.lines) + dropped == requests
    assert all(json.loads(line)["status"] == 200 for line in reader.lines)


async def test_clean_stop_writes_every_queued_record(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=BIG_BUCKET, access_log={"queue_size": 10_000})
    statuses = await send(http, gw.url + "/echo", 1000)
    await gw.server.stop()

    records = gw.access_records()
    assert len(statuses) == len(records) == 1000
    assert gw.metric("gateway_access_log_dropped_total") == 0
    assert all(list(record) == list(FIELDS) for record in records)
    assert len({record["request_id"] for record in records}) == 1000


async def test_healthz_names_a_dead_background_part(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    async with http.get(gw.admin_url + "/healthz") as response:
        assert response.status == 200

    await asyncio.to_thread(gw.server.access_log.stop, 5.0)
    async with http.get(gw.admin_url + "/healthz") as response:
        body = await response.json()
        assert response.status == 503
        assert body["dead"] == ["access_log"]

    await gw.server.clock.stop()
    async with http.get(gw.admin_url + "/healthz") as response:
        body = await response.json()
        assert response.status == 503
        assert body["dead"] == ["refill_clock", "access_log"]
