"""The admin listener's JSON views under load: their latency while the proxy
serves its peak, beside the proxy's own.

    .venv/bin/python -m bench.admin [--workers 2] [--duration 20] [--connections 50]
                                    [--routes 50] [--interval 0.2] [--rounds 2]

Debian's nginx is the upstream. The gateway has ``--routes`` routes (``/r0/``
...), each a small bucket per API key, and ``wrk`` sends requests spread over
the routes from 100 API keys, so most are denied and every route's
top-denied sketch fills up (the sketches' worst case). Phase one: ``wrk``
alone. Phase two: ``wrk`` again while one client polls ``/admin/stats`` and
``/admin/clients`` in turn every ``--interval`` seconds (the page polls them
every 2 and 5 s). ``--workers 2`` runs the supervisor and two workers on a
redis-server of its own: the supervisor then merges the workers' files.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import aiohttp

from bench.run import NGINX_UPSTREAM, free_port, nginx, process, run_wrk

CONFIG = """
listen: "127.0.0.1:{port}"
admin: "127.0.0.1:{admin}"
workers: {workers}
upstream: {{url: "http://127.0.0.1:{upstream}", max_connections: 256}}
clients: {{identify_by: header}}
limits:
  default: {{refill_period: 1s, refill_tokens: 1000, max_tokens: 1000}}
routes:
{routes}
storage: {{backend: {backend}, redis_url: "redis://127.0.0.1:{redis}/0"}}
access_log: {{path: "{tmp}/access.log"}}
"""

# Requests over every route, from 100 API keys: each key's bucket on a route
# holds 5 tokens an hour, so after the first 25,000 requests nearly all are
# denied, and each route's sketch (64 counters) sees more clients than it holds.
WRK_SCRIPT = """
math.randomseed(42)
request = function()
  local path = "/r" .. math.random(0, {last}) .. "/x"
  return wrk.format("GET", path, {{["X-API-Key"] = "key-" .. math.random(1, 100)}})
end
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def poll_admin(
    admin: str, interval: float, stop: asyncio.Event
) -> dict[str, list[float]]:
    """Latencies in ms of each view, polled in turn until ``stop``."""
    views = ["/admin/stats", "/admin/clients"]
    latencies: dict[str, list[float]] = {v: [] for v in views}
    sizes: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        i = 0
        while not stop.is_set():
            view = views[i % len(views)]
            i += 1
            started = time.perf_counter()
            async with session.get(admin + view) as response:
                body = await response.read()
                assert response.status == 200, (view, response.status)
            latencies[view].append((time.perf_counter() - started) * 1000)
            sizes[view] = len(body)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    for view, size in sizes.items():
        count = len(latencies[view])
        print(f"  {view}: {count} answers, last {size / 1024:.0f} KiB", flush=True)
    return latencies


async def loaded_polling(
    url: str, admin: str, args: argparse.Namespace, script: Path
) -> tuple[str, dict[str, list[float]]]:
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_admin(admin, args.interval, stop))
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
        "-s", str(script), url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await wrk.communicate()
    stop.set()
    return out.decode(), await poller


def wrk_summary(out: str) -> str:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return (
        f"{float(rps.group(1)) if rps else float('nan'):>8.0f} req/s  "
        f"p50 {p50.group(1) if p50 else '?':>8}  p99 {p99.group(1) if p99 else '?':>8}  "
        f"non-2xx {non.group(1) if non else 0}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--routes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-admin-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        up, port, admin_port, redis_port = free_port(), free_port(), free_port(), free_port()
        stack.enter_context(nginx(tmp, "upstream", NGINX_UPSTREAM.format(tmp=tmp, port=up), up))
        backend = "memory"
        if args.workers > 1:
            backend = "redis"
            stack.enter_context(
                process(["redis-server", "--port", str(redis_port), "--save", "",
                         "--appendonly", "no"], redis_port)
            )  # fmt: skip
        routes = "\n".join(
            f'  - {{path_prefix: "/r{i}/", limit: {{refill_period: 1h, refill_tokens: 5, '
            f"max_tokens: 5}}}}"
            for i in range(args.routes)
        )
        config = tmp / "gateway.yaml"
        config.write_text(
            CONFIG.format(
                port=port, admin=admin_port, workers=args.workers, upstream=up,
                routes=routes, backend=backend, redis=redis_port, tmp=tmp,
            )
        )  # fmt: skip
        gateway = [str(Path(sys.executable).parent / "gateway"), "run", "--config", str(config)]
        stack.enter_context(process(gateway, port))
        script = tmp / "spread.lua"
        script.write_text(WRK_SCRIPT.format(last=args.routes - 1))
        url = f"http://127.0.0.1:{port}"
        admin = f"http://127.0.0.1:{admin_port}"
        time.sleep(1.0)  # workers: every one accepting
        print(
            f"workers {args.workers}, {args.routes} routes, {args.connections} connections, "
            f"{args.duration} s per phase, admin polled every {args.interval} s",
            flush=True,
        )
        run_wrk(url + "/r0/x", 2, args.connections)  # warm-up
        for round_number in range(1, args.rounds + 1):
            wrk = subprocess.run(
                ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
                 "-s", str(script), url],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            print(f"round {round_number}", flush=True)
            print(f"  proxy alone:           {wrk_summary(wrk)}", flush=True)
            out, latencies = asyncio.run(loaded_polling(url, admin, args, script))
            print(f"  proxy, admin polled:   {wrk_summary(out)}", flush=True)
            for view, values in latencies.items():
                print(
                    f"  {view:<22} p50 {statistics.median(values):7.2f} ms  "
                    f"p99 {percentile(values, 99):7.2f} ms  max {max(values):7.2f} ms",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
