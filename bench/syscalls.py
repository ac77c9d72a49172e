"""System calls per request under ``strace -c``, the gateway beside nginx.

    .venv/bin/python -m bench.syscalls [--src TREE] [--requests 2000] [--top 14]

Each server gets a warm-up over one keep-alive connection; then ``strace -c
-f`` attaches to every thread of the serving process (the gateway's one
process, access-log consumer included; nginx's worker, not its master), a
fixed number of requests is sent one after another on that connection,
strace is detached with SIGINT and its counts are divided by the requests.
Cases: the gateway's plain path (GET) and aiohttp path (POST with a one-byte
body), allowed and denied, and nginx limit_req + proxy_pass (keep-alive
upstream, access log to a file, limit_req_status 429), allowed and denied;
the gateway with metrics on and the access log to a file; nginx as the
upstream of both. The gateway runs from ``--src`` (``python -m gateway run``
with ``PYTHONPATH`` set to the tree), the current tree by default.

Counts, not times: strace's own cost makes its time columns meaningless.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.callgrind import _connect, _exchange, _request, _wait_for
from bench.run import (
    ALLOWED,
    DENIED,
    GATEWAY_CONFIG,
    NGINX_LIMIT,
    NGINX_UPSTREAM,
    free_port,
    nginx,
)

# (label, server, method, limits)
CASES = (
    ("plain allowed", "gateway", "GET", ALLOWED),
    ("plain denied", "gateway", "GET", DENIED),
    ("aiohttp allowed", "gateway", "POST", ALLOWED),
    ("aiohttp denied", "gateway", "POST", DENIED),
    ("nginx allowed", "nginx", "GET", ALLOWED),
    ("nginx denied", "nginx", "GET", DENIED),
)


@contextmanager
def gateway_process(
    src: Path, limits: dict[str, object], upstream: int, tmp: Path
) -> Iterator[tuple[int, int]]:
    """The gateway from ``src``, one process; yields (port, pid)."""
    port = free_port()
    config = tmp / f"gw-{port}.yaml"
    config.write_text(
        GATEWAY_CONFIG.format(
            tmp=tmp, name=f"gw-{port}", port=port, admin=free_port(), workers=1,
            backend="memory", upstream=upstream, redis=free_port(),
            period=limits["period"], refill=limits["refill"], max_tokens=limits["max_tokens"],
        )
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        cwd=src, env={**os.environ, "PYTHONPATH": str(src)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(port, 60)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def nginx_process(
    limits: dict[str, object], upstream: int, tmp: Path
) -> Iterator[tuple[int, int]]:
    """nginx limit_req + proxy_pass, one worker; yields (port, the worker's pid)."""
    port = free_port()
    name = f"nginx-{port}"
    conf = NGINX_LIMIT.format(
        tmp=tmp, name=name, workers=1, port=port, upstream=upstream,
        rate=limits["rate"], burst=limits["burst"], ssl="", tls="",
    )  # fmt: skip
    # nginx closes a client connection after 1000 requests by default.
    conf = conf.replace("http {", "http {\n  keepalive_requests 1000000;", 1)
    with nginx(tmp, name, conf, port) as master:
        children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
        if len(children) != 1:
            raise RuntimeError(f"nginx master {master.pid} has workers {children}, not one")
        yield port, int(children[0])


def _parse(summary: str) -> dict[str, tuple[int, int]]:
    """strace -c's table: syscall -> (calls, errors)."""
    counts: dict[str, tuple[int, int]] = {}
    for line in summary.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) not in (5, 6) or not parts[3].isdigit() or parts[-1] == "total":
            continue
        errors = int(parts[4]) if len(parts) == 6 else 0
        counts[parts[-1]] = (int(parts[3]), errors)
    return counts


def count(port: int, pid: int, method: str, requests: int, warmup: int, tmp: Path
          ) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Syscalls per request (calls, errors) by name, in every thread of ``pid``."""
    out = tmp / f"strace.{pid}"
    request = _request(method)
    with _connect(port, tls=False) as sock:
        _exchange(sock, request, warmup)
        # -f with -p seizes every thread of the process ("attached with N threads").
        argv = ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
        tracer = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            assert tracer.stderr is not None
            line = tracer.stderr.readline()
            if "attached" not in line:
                raise RuntimeError(f"strace did not attach to {pid}: {line!r}")
            _exchange(sock, request, requests)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.communicate(timeout=30)
    return {
        name: (calls / requests, errors / requests)
        for name, (calls, errors) in _parse(out.read_text()).items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", type=Path, help="the gateway's source tree (default: this one)"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--top", type=int, default=14, help="syscall rows to print")
    args = parser.parse_args()
    src = (args.src or Path(__file__).resolve().parent.parent).resolve()
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-syscalls-") as name:
        tmp = Path(name)
        up = free_port()
        with nginx(tmp, "upstream", NGINX_UPSTREAM.format(tmp=tmp, port=up), up):
            for label, server, method, limits in CASES:
                start = gateway_process(src, limits, up, tmp) if server == "gateway" else (
                    nginx_process(limits, up, tmp)
                )  # fmt: skip
                with start as (port, pid):
                    results[label] = count(port, pid, method, args.requests, args.warmup, tmp)
    labels = [label for label, *_ in CASES]
    # Calls made less than once in 200 requests are noise (timers, the log thread's polls).
    names = sorted(
        {
            name
            for row in results.values()
            for name, (calls, _) in row.items()
            if calls >= 0.005
        },
        key=lambda name: -max(row.get(name, (0.0, 0.0))[0] for row in results.values()),
    )
    print(f"system calls per request (strace -c -f), {args.requests} requests on one "
          f"keep-alive connection after {args.warmup}; gateway from {src}")  # fmt: skip
    print(f"  {'syscall':<16}" + "".join(f"{label:>17}" for label in labels))

    def row(title: str, values: list[float]) -> None:
        print(f"  {title:<16}" + "".join(f"{value:>17.2f}" for value in values))

    row("total", [sum(c for c, _ in results[label].values()) for label in labels])
    row("  of them errors", [sum(e for _, e in results[label].values()) for label in labels])
    for syscall in names[: args.top]:
        row(syscall, [results[label].get(syscall, (0.0, 0.0))[0] for label in labels])
    rest = names[args.top :]
    if rest:
        row("(others)", [sum(results[label].get(n, (0.0, 0.0))[0] for n in rest)
                         for label in labels])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
