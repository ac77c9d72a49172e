"""Hostile load beside wrk, then a health report of the gateway afterwards.

    .venv/bin/python -m bench.chaos [--seconds 60] [--workers 1]

One gateway process (metrics on, access log to a file) in front of a healthy
aiohttp upstream, loaded for ``--seconds`` by ``wrk`` (allowed and denied
clients) and by asyncio clients that misbehave: trickling heads byte by
byte, pipelining bursts and reading half the answers, dropping connections
mid-request and mid-download, opening downloads they never read, sending
hostile heads (bad Host, underscores, codings, endless chunk extensions,
HTTP/0.9) and WebSocket upgrades. Run the test suite beside it to load the
machine further (issue 13 did: ``scripts/test`` in another shell).

Afterwards, once every chaos client has gone, it reports what must hold:
requests in flight back to 0, open connections back to 0, no dropped access
records, no traceback in the gateway's output, and no upstream error counted
although the upstream never failed ("false upstream errors"; a ``busy``,
``invalid`` or ``reset`` count here would be the gateway's fault). Exit 1
when one does not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import GATEWAY, free_port, wait_for_port

UPSTREAM_APP = """
import asyncio, sys
from aiohttp import web

async def small(request):
    await request.read()
    return web.Response(text="ok")

async def download(request):
    response = web.StreamResponse()
    response.content_length = 5_000_000
    await response.prepare(request)
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < 5_000_000:
            piece = chunk[: min(65536, 5_000_000 - sent)]
            await response.write(piece)
            sent += len(piece)
    except ConnectionError:  # the gateway hung up: its client left
        pass
    return response

async def ws(request):
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        await socket.send_str(message.data)
    return socket

app = web.Application()
app.router.add_get("/download", download)
app.router.add_get("/ws", ws)
app.router.add_route("*", "/{tail:.*}", small)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

CONFIG = """
listen: "127.0.0.1:{port}"
admin: "127.0.0.1:{admin}"
workers: {workers}
upstream: {{url: "http://127.0.0.1:{upstream}", max_connections: 64, pool_timeout: 30s}}
server: {{send_timeout: 2s, header_timeout: 3s, body_timeout: 3s}}
limits:
  default: {{refill_period: 1s, refill_tokens: 100000, max_tokens: 100000}}
routes:
  - path_prefix: /denied
    limit: {{refill_period: 1h, refill_tokens: 1, max_tokens: 1}}
storage: {{backend: {backend}, redis_url: "redis://127.0.0.1:{redis}/0"}}
access_log: {{path: "{log}", queue_size: 100000}}
drain_timeout: 10s
"""

HOSTILE_HEADS = [
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX_API_Key: v\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET http://evil/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
]


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def trickler(port: int, tally: Tally) -> None:
    _, writer = await _connect(port)
    try:
        for byte in b"GET /trickle HTTP/1.1\r\nHost: x\r\n\r\n":
            writer.write(bytes([byte]))
            await asyncio.sleep(random.uniform(0.005, 0.05))
        tally.add("trickled")
    finally:
        _close(writer)


async def pipeliner(port: int, tally: Tally) -> None:
    reader, writer = await _connect(port)
    try:
        burst = b"".join(
            b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(random.randint(2, 30))
        )
        writer.write(burst)
        await asyncio.wait_for(reader.read(random.randint(10, 2000)), 5)
        tally.add("pipelined")
    finally:
        _close(writer)


async def dropper(port: int, tally: Tally) -> None:
    reader, writer = await _connect(port)
    try:
        choice = random.random()
        if choice < 0.3:
            writer.write(b"GET /drop HTTP/1.1\r\nHost: x\r\n")  # head never finished
        elif choice < 0.6:
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nab"
            )
        else:
            writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.read(random.randint(1, 200_000)), 5)
        await asyncio.sleep(random.uniform(0, 0.05))
        tally.add("dropped")
    finally:
        _close(writer)


async def non_reader(port: int, tally: Tally) -> None:
    _, writer = await _connect(port)
    try:
        writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(random.uniform(0.5, 4))  # longer than send_timeout, sometimes
        tally.add("never_read")
    finally:
        _close(writer)


async def hostile(port: int, tally: Tally) -> None:
    reader, writer = await _connect(port)
    try:
        if random.random() < 0.1:  # an endless chunk extension
            writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;")
            for _ in range(100):
                writer.write(b"e" * 1000)
                await writer.drain()
        else:
            writer.write(random.choice(HOSTILE_HEADS))
        await asyncio.wait_for(reader.read(1000), 5)
        tally.add("hostile")
    finally:
        _close(writer)


async def websocket(port: int, tally: Tally) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port}/ws") as socket,
    ):
        await socket.send_str("hi")
        await asyncio.wait_for(socket.receive(), 5)
    tally.add("websocket")


KINDS = {f.__name__: f for f in (trickler, pipeliner, dropper, non_reader, hostile, websocket)}


async def chaos(port: int, seconds: float, tally: Tally, names: list[str]) -> None:
    kinds = [KINDS[name] for name in names]
    deadline = time.monotonic() + seconds
    running: set[asyncio.Task[None]] = set()
    while time.monotonic() < deadline:
        while len(running) < 40:
            kind = random.choice(kinds)
            task = asyncio.create_task(kind(port, tally))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(
                lambda t: (
                    tally.add("client_error")
                    if not t.cancelled() and t.exception() is not None
                    else None
                )
            )
        await asyncio.sleep(0.01)
    await asyncio.gather(*running, return_exceptions=True)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"([a-z_]+)(\{[^}]*\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def scrape(admin: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        return str(response.read().decode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=sorted(KINDS))
    parser.add_argument("--no-wrk", action="store_true", help="chaos clients alone")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gw-chaos-"))
    upstream, port, admin, redis_port = free_port(), free_port(), free_port(), free_port()
    log = tmp / "access.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        (tmp / "upstream.py").write_text(UPSTREAM_APP)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(tmp / "upstream.py"), str(upstream)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # its own logs of clients that left
            )
        )
        backend = "memory"
        if args.workers > 1:
            backend = "redis"
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(redis_port),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            wait_for_port(redis_port)
        wait_for_port(upstream)
        config = tmp / "gateway.yaml"
        config.write_text(
            CONFIG.format(
                port=port, admin=admin, upstream=upstream, log=log, workers=args.workers,
                backend=backend, redis=redis_port,
            )
        )  # fmt: skip
        output = (tmp / "gateway.out").open("wb")
        gateway = subprocess.Popen(
            [str(GATEWAY), "run", "--config", str(config)], stdout=output, stderr=output
        )
        procs.append(gateway)
        wait_for_port(port)
        wait_for_port(admin)
        wrk = [
            subprocess.Popen(
                ["wrk", "-t1", "-c20", f"-d{int(args.seconds)}s", f"http://127.0.0.1:{port}{path}"],
                stdout=subprocess.PIPE, text=True,
            )
            for path in ("/allowed", "/denied")
            if not args.no_wrk
        ]  # fmt: skip
        tally = Tally()
        started = time.monotonic()
        asyncio.run(chaos(port, args.seconds, tally, args.kinds))
        wrk_out = [p.communicate()[0] for p in wrk]
        # Quiet: every chaos client has closed; let the gateway notice.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = scrape(admin)
            if metric(text, "gateway_inflight_requests") == 0 and (
                metric(text, "gateway_open_connections") == 0
            ):
                break
            time.sleep(0.2)
        settled = time.monotonic() - (deadline - 60)
        print(f"  settled after {settled:.1f} s")
        text = scrape(admin)
        gateway.terminate()
        gateway.wait(30)
        output.close()
        out = (tmp / "gateway.out").read_text(errors="replace")
        records = log.read_text().count("\n")
        errors = {
            kind: metric(text, "gateway_upstream_errors_total", kind=kind)
            for kind in ("connect", "timeout", "reset", "invalid", "busy")
        }
        requests = metric(text, "gateway_requests_total")
        checks = {
            "inflight after": metric(text, "gateway_inflight_requests"),
            "open connections after": metric(text, "gateway_open_connections"),
            "access records dropped": metric(text, "gateway_access_log_dropped_total"),
            "tracebacks in output": out.count("Traceback"),
            "false upstream errors": sum(errors.values()),
        }
        print(f"chaos: {time.monotonic() - started:.0f} s, workers={args.workers}, dir {tmp}")
        for line in wrk_out:
            rps = re.search(r"Requests/sec:\s+(\S+)", line)
            print(f"  wrk: {rps.group(1) if rps else '?'} req/s")
        print(f"  chaos clients: {dict(sorted(tally.counts.items()))}")
        print(f"  requests decided: {requests:.0f}; access records written: {records}")
        print(f"  upstream errors by kind: {errors}")
        rejected = {
            reason: metric(text, "gateway_rejected_requests_total", reason=reason)
            for reason in re.findall(r'gateway_rejected_requests_total\{reason="(\w+)"\}', text)
        }
        print(f"  refused by reason: {rejected}")
        failed = False
        for name, value in checks.items():
            ok = value == 0
            failed |= not ok
            print(f"  {'ok  ' if ok else 'FAIL'} {name}: {value:g}")
        if "Traceback" in out:
            print(out[out.index("Traceback") :][:3000])
        return 1 if failed else 0
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
