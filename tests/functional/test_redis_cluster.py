"""Shared buckets on a real three-node Redis Cluster (storage.cluster: true):
keys hash-tagged by client, batches split by slot."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.conftest import StartGateway, free_port
from tests.helpers import limits


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    """Three redis-server processes in cluster mode, slots spread over them;
    yields the URL of one node."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server/redis-cli are not installed; scripts/test installs them")
    ports = [free_port() for _ in range(3)]
    processes = []
    for port in ports:
        # The bus port defaults to port + 10000, past 65535 for most free ports.
        bus_port = free_port()
        workdir = tmp_path / f"node-{port}"
        workdir.mkdir()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-port", str(bus_port), "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(workdir)]
        processes.append(
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    try:
        for port in ports:
            _wait(lambda port=port: redis.Redis(port=port).ping(), "node start")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        for port in ports:
            _wait(
                lambda port=port: (
                    b"cluster_state:ok"
                    in redis.Redis(port=port).execute_command("CLUSTER", "INFO")
                ),
                "cluster state ok",
            )
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _cluster_ok(port: int) -> bool:
    info = redis.Redis(port=port).execute_command("CLUSTER", "INFO")
    return b"cluster_state:ok" in info


def _wait(check: object, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"redis cluster: {what} not reached in 20 s")


async def test_two_instances_share_exact_buckets_across_cluster_slots(
    start_gateway: StartGateway, http: aiohttp.ClientSession, redis_cluster: str
) -> None:
    storage = {"backend": "redis", "redis_url": redis_cluster, "cluster": True,
               "on_error": "deny", "timeout": "1s"}  # fmt: skip
    clients = {"identify_by": "header"}
    gw_a = await start_gateway(limits=limits(5), storage=storage, clients=clients)
    gw_b = await start_gateway(limits=limits(5), storage=storage, clients=clients)
    keys = [f"client-{i}" for i in range(12)]  # hash tags spread over the slots

    async def hit(gw_url: str, key: str) -> int:
        async with http.get(gw_url + "/echo", headers={"X-API-Key": key}) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(
        *(hit((gw_a.url, gw_b.url)[i % 2], key) for key in keys for i in range(8))
    )
    per_key = [statuses[i * 8 : i * 8 + 8] for i in range(len(keys))]
    assert all(s.count(200) == 5 and s.count(429) == 3 for s in per_key), per_key
    assert gw_a.metric("gateway_storage_errors_total", {"backend": "redis"}) == 0
    assert gw_b.metric("gateway_storage_errors_total", {"backend": "redis"}) == 0

    node = redis.RedisCluster.from_url(redis_cluster)
    slots = {node.keyslot(f"rl:{{{key}}}:default") for key in keys}
    owners = {str(node.get_node_from_key(f"rl:{{{key}}}:default")) for key in keys}
    assert len(slots) == len(keys)
    assert len(owners) > 1  # the keys really live on several nodes
    assert all(int(node.hget(f"rl:{{{key}}}:default", "t") or -1) == 0 for key in keys)
    node.close()
