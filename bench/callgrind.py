"""User-space instructions per request under valgrind's callgrind, by build and beside nginx.

    .venv/bin/python -m bench.callgrind --src TREE-A --src TREE-B [--requests 2000] [--no-nginx]
    .venv/bin/python -m bench.callgrind --src .:pure --src .    # pure Python beside compiled

CPU time per request moves with the machine's speed and load; instructions
do not. Each source tree's gateway (``python -m gateway run`` with
``PYTHONPATH`` set to the tree; compiled when the tree has a current
in-place build, ``TREE:pure`` for its pure Python) runs under callgrind with instrumentation
off, serves a warm-up over one keep-alive connection, then
``callgrind_control`` turns instrumentation on, zeroes the counters, a fixed
number of requests is sent one after another on that connection, and the
counters are dumped: the total ``Ir`` (every thread of the process, the
access-log consumer included) divided by the requests. Cases: the plain path
(GET) and the aiohttp path (POST with a one-byte body), allowed and denied,
and both allowed over TLS (the connection's handshake is in the warm-up:
OpenSSL's record work per request is counted, not the handshake); metrics
on, access log to a file, nginx as the upstream.

Beside the builds, nginx (``bench.run``'s ``NGINX_LIMIT``: ``limit_req`` and
``proxy_pass`` to the same upstream over kept-alive connections, its access
log to a file) is measured the same way for each case, with ``master_process
off`` so that the one process valgrind runs is the one that serves, and the
ratio of each build to it is printed. nginx has one ``limit_req`` and one
upstream server, so the x3 and rr2 rows compare against its plain allowed
configuration.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import (
    ALLOWED,
    DENIED,
    GATEWAY_CONFIG,
    GATEWAY_TLS,
    NGINX_LIMIT,
    NGINX_TLS,
    NGINX_UPSTREAM,
    free_port,
    make_certificate,
    nginx,
)

# The allowed path's limits three times over, keyed per client, per route and
# per ip: one request then passes three limits (issue 11's "3 limits" figure).
THREE_LIMITS: dict[str, object] = {**ALLOWED, "three": True}
OVER_TLS: dict[str, object] = {**ALLOWED, "tls": True}
# Round robin over two servers: the same nginx named twice (127.0.0.1 and
# localhost are two servers to the gateway), so only the choice is added.
TWO_SERVERS: dict[str, object] = {**ALLOWED, "servers": 2}
CASES = (
    ("plain allowed", "GET", ALLOWED),
    ("plain denied", "GET", DENIED),
    ("aiohttp allowed", "POST", ALLOWED),
    ("aiohttp denied", "POST", DENIED),
    ("plain allowed x3", "GET", THREE_LIMITS),
    ("plain allowed TLS", "GET", OVER_TLS),
    ("aiohttp allowed TLS", "POST", OVER_TLS),
    ("plain allowed rr2", "GET", TWO_SERVERS),
)


def _config(limits: dict[str, object], **fields: object) -> str:
    text = GATEWAY_CONFIG.format(
        period=limits["period"], refill=limits["refill"], max_tokens=limits["max_tokens"],
        **fields,
    )  # fmt: skip
    if limits.get("tls"):
        text += GATEWAY_TLS.format(tmp=fields["tmp"])
    if limits.get("servers"):
        # Only an older tree that knows no servers key (--src) would refuse it.
        port = fields["upstream"]
        text = text.replace(
            f'{{url: "http://127.0.0.1:{port}"',
            f'{{servers: ["http://127.0.0.1:{port}", "http://localhost:{port}"]',
        )
    if not limits.get("three"):
        return text
    one = "{{refill_period: {period}, refill_tokens: {refill}, max_tokens: {max_tokens}".format(
        **limits
    )
    three = (
        f"  default:\n    - {one}}}\n    - {one}, name: shared, per: route}}\n"
        f"    - {one}, name: by-ip, per: ip}}\n"
    )
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("  default:"))
    lines[at] = three
    return "".join(lines)


def _request(method: str) -> bytes:
    body = b"x" if method == "POST" else b""
    length = b"Content-Length: 1\r\n" if body else b""
    return b"%s /bench HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n%s" % (
        method.encode(),
        length,
        body,
    )


def _exchange(sock: socket.socket, request: bytes, count: int) -> None:
    """Send ``request`` ``count`` times, each after the previous answer."""
    buffer = b""
    for _ in range(count):
        sock.sendall(request)
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = buffer[:end].lower()
                match = re.search(rb"content-length: *(\d+)", head)
                total = end + 4 + (int(match.group(1)) if match else 0)
                if len(buffer) >= total:
                    buffer = buffer[total:]
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the gateway closed the connection")
            buffer += chunk


def _connect(port: int, *, tls: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if not tls:
        return sock
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # bench.run's self-signed certificate
    return context.wrap_socket(sock)


def _wait_for(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listening on {port} after {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _callgrind(argv: list[str], port: int, method: str, *, tls: bool, tmp: Path,
               requests: int, warmup: int, keep: Path | None, label: str,
               **popen: object) -> float:  # fmt: skip
    """Ir per request of ``argv`` run under callgrind, serving on ``port``."""
    out = tmp / f"callgrind.{port}"
    proc = subprocess.Popen(  # type: ignore[call-overload]
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen,
    )  # fmt: skip
    try:
        _wait_for(port, 180)
        request = _request(method)
        with _connect(port, tls=tls) as sock:
            _exchange(sock, request, warmup)
            control = ["callgrind_control"]
            subprocess.run(
                [*control, "-i", "on", str(proc.pid)], check=True, capture_output=True
            )
            subprocess.run([*control, "-z", str(proc.pid)], check=True, capture_output=True)
            _exchange(sock, request, requests)
            subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        _stop(proc)
    total = 0
    for dump in tmp.glob(f"callgrind.{port}*"):
        text = dump.read_text(errors="replace")
        found = re.search(r"^(?:summary|totals): *(\d+)", text, re.M)
        # The dump taken around the measured requests, not the one at exit.
        if found and dump.name != out.name:
            total += int(found.group(1))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, keep / f"{label}.{method}.{dump.name}")
    return total / requests


class Build:
    """A source tree, and whether its pure Python is forced (``TREE:pure``)."""

    def __init__(self, spec: str) -> None:
        path, _, pure = spec.partition(":")
        if pure not in ("", "pure"):
            raise argparse.ArgumentTypeError(f"{spec}: expected TREE or TREE:pure")
        self.src = Path(path).resolve()
        self.pure = pure == "pure"
        self.name = self.src.name + (":pure" if self.pure else "")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(self.src),
            "GATEWAY_NO_EXTENSIONS": "1" if self.pure else "",
        }


def measure(build: Build, method: str, limits: dict[str, object], upstream: int, tmp: Path,
            requests: int, warmup: int, keep: Path | None = None) -> float:  # fmt: skip
    port = free_port()
    config = tmp / f"gw-{port}.yaml"
    config.write_text(
        _config(
            limits, tmp=tmp, name=f"gw-{port}", port=port, admin=free_port(), workers=1,
            backend="memory", upstream=upstream, redis=free_port(),
        )
    )  # fmt: skip
    return _callgrind(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)], port, method,
        tls=bool(limits.get("tls")), tmp=tmp, requests=requests, warmup=warmup, keep=keep,
        label=build.name, cwd=build.src, env=build.env(),
    )  # fmt: skip


def _nginx_config(limits: dict[str, object], tmp: Path, name: str, port: int,
                  upstream: int) -> str:  # fmt: skip
    tls = bool(limits.get("tls"))
    text = NGINX_LIMIT.format(
        tmp=tmp, name=name, workers=1, port=port, upstream=upstream,
        rate=limits["rate"], burst=limits["burst"],
        ssl=" ssl" if tls else "", tls=NGINX_TLS.format(tmp=tmp) if tls else "",
    )  # fmt: skip
    # One process that serves, so valgrind and callgrind_control see it. nginx
    # closes a client connection after 1000 requests and an upstream one
    # after 1000 by default; the gateway closes neither, and the measurement
    # runs on one connection.
    text = "master_process off;\n" + text
    text = text.replace("http {\n", "http {\n  keepalive_requests 1000000;\n", 1)
    return text.replace("keepalive 64;", "keepalive 64; keepalive_requests 1000000;", 1)


def measure_nginx(method: str, limits: dict[str, object], upstream: int, tmp: Path,
                  requests: int, warmup: int, keep: Path | None = None) -> float:  # fmt: skip
    port = free_port()
    name = f"nginx-{port}"
    conf = tmp / f"{name}.conf"
    conf.write_text(_nginx_config(limits, tmp, name, port, upstream))
    return _callgrind(
        ["nginx", "-c", str(conf), "-p", str(tmp)], port, method,
        tls=bool(limits.get("tls")), tmp=tmp, requests=requests, warmup=warmup, keep=keep,
        label="nginx",
    )  # fmt: skip


def _nginx_case(limits: dict[str, object]) -> tuple[str, bool]:
    """What nginx is configured for: allowed or denied, plain or TLS."""
    return str(limits["rate"]), bool(limits.get("tls"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src",
        action="append",
        type=Build,
        help="a source tree, TREE:pure for its pure Python (repeat)",
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--case", action="append", help="only these cases (repeat)")
    parser.add_argument("--no-nginx", action="store_true", help="the builds only")
    parser.add_argument(
        "--keep", type=Path, help="copy the measured dumps here (for callgrind_annotate)"
    )
    args = parser.parse_args()
    sources: list[Build] = args.src or [Build(str(Path(__file__).resolve().parent.parent))]
    with tempfile.TemporaryDirectory(prefix="gateway-callgrind-") as name:
        tmp = Path(name)
        up = free_port()
        make_certificate(tmp)
        with nginx(tmp, "upstream", NGINX_UPSTREAM.format(tmp=tmp, port=up), up):
            print(f"instructions per request (callgrind Ir), {args.requests} requests on one "
                  f"keep-alive connection after {args.warmup}")  # fmt: skip
            head = "".join(f"{f'[{i}]':>12}" for i in range(len(sources)))
            head += f"{'nginx':>12}" if not args.no_nginx else ""
            head += "".join(f"{f'[{i}]/[0]':>9}" for i in range(1, len(sources)))
            if not args.no_nginx:
                head += "".join(f"{f'[{i}]/nginx':>12}" for i in range(len(sources)))
            print(f"  {'case':<19}" + head)
            by_nginx_case: dict[tuple[str, str, bool], float] = {}
            for label, method, limits in CASES:
                if args.case and label not in args.case:
                    continue
                row = [
                    measure(src, method, limits, up, tmp, args.requests, args.warmup, args.keep)
                    for src in sources
                ]
                line = "".join(f"{v:>12,.0f}" for v in row)
                ratios = "".join(f"   x{value / row[0]:.3f}" for value in row[1:])
                if not args.no_nginx:
                    key = (method, *_nginx_case(limits))
                    if key not in by_nginx_case:
                        by_nginx_case[key] = measure_nginx(
                            method, limits, up, tmp, args.requests, args.warmup, args.keep
                        )
                    reference = by_nginx_case[key]
                    line += f"{reference:>12,.0f}"
                    ratios += "".join(f"{f'x{value / reference:.2f}':>12}" for value in row)
                print(f"  {label:<19}" + line + ratios, flush=True)
            for i, build in enumerate(sources):
                print(f"  [{i}] {build.src}{' (pure Python)' if build.pure else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
