"""The gateway beside nginx in one run: requests/s, CPU and instructions per request.

    .venv/bin/python -m bench.ratios [--rounds 3] [--duration 5] [--requests 2000]

For the plain path, allowed and denied (bench.callgrind's cases), one nginx
(``limit_req`` + ``proxy_pass``, one process that serves) and one gateway
(this tree, one worker, memory backend, metrics on, access log to a file)
run in front of the same upstream nginx. Each round loads each with
``wrk -t1 -c50`` in turn and reads the serving process's user + system CPU
from ``/proc/PID/stat`` before and after: CPU per request is that time over
the requests wrk counted. The medians are printed with the ratios to nginx:
``req/s`` as wrk measured it, and ``CPU`` as nginx's CPU per request over the
gateway's, the throughput ratio to expect when each has a core of its own.
Then each runs under callgrind (bench.callgrind) for user-space instructions
per request, the figure that does not move with the machine's speed.
``GATEWAY_NO_EXTENSIONS=1`` measures the pure-Python build.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.callgrind import CASES, Build, _config, _nginx_config, measure, measure_nginx
from bench.run import NGINX_UPSTREAM, free_port, make_certificate, nginx, process

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, every thread included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def load(port: int, pid: int, duration: int, connections: int) -> tuple[float, float]:
    """req/s and CPU microseconds per request of one wrk run."""
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    spent = cpu_seconds(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, spent / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="under callgrind")
    args = parser.parse_args()
    build = Build(str(REPO) + (":pure" if os.environ.get("GATEWAY_NO_EXTENSIONS") else ""))
    cases = [case for case in CASES if case[0] in ("plain allowed", "plain denied")]
    with tempfile.TemporaryDirectory(prefix="gateway-ratios-") as name, ExitStack() as stack:
        tmp = Path(name)
        make_certificate(tmp)
        up = free_port()
        stack.enter_context(nginx(tmp, "upstream", NGINX_UPSTREAM.format(tmp=tmp, port=up), up))
        print(f"{build.name}: wrk -t1 -c{args.connections}, {args.rounds} x {args.duration}s, "
              f"medians; then callgrind, {args.requests} requests")  # fmt: skip
        print(f"  {'case':<15}{'':>10}{'req/s':>10}{'CPU us/req':>12}{'Ir/req':>10}")
        for label, _method, limits in cases:
            with ExitStack() as servers:
                ngx_port, gw_port = free_port(), free_port()
                conf = tmp / f"nginx-{ngx_port}.conf"
                conf.write_text(_nginx_config(limits, tmp, f"nginx-{ngx_port}", ngx_port, up))
                ngx = servers.enter_context(
                    process(["nginx", "-c", str(conf), "-p", str(tmp)], ngx_port)
                )
                yaml = tmp / f"gw-{gw_port}.yaml"
                yaml.write_text(
                    _config(
                        limits, tmp=tmp, name=f"gw-{gw_port}", port=gw_port, admin=free_port(),
                        workers=1, backend="memory", upstream=up, redis=free_port(),
                    )
                )  # fmt: skip
                gw = servers.enter_context(
                    process(
                        [sys.executable, "-m", "gateway", "run", "--config", str(yaml)],
                        gw_port,
                        cwd=build.src,
                        env=build.env(),
                    )
                )
                results: dict[str, list[tuple[float, float]]] = {"nginx": [], "gateway": []}
                for _target, port, pid in (
                    ("nginx", ngx_port, ngx.pid),
                    ("gateway", gw_port, gw.pid),
                ):
                    load(port, pid, 1, args.connections)  # warm-up
                for _ in range(args.rounds):
                    for target, port, pid in (
                        ("nginx", ngx_port, ngx.pid), ("gateway", gw_port, gw.pid),
                    ):  # fmt: skip
                        results[target].append(load(port, pid, args.duration, args.connections))
            medians = {
                target: (
                    statistics.median(r for r, _ in runs),
                    statistics.median(c for _, c in runs),
                )
                for target, runs in results.items()
            }
            ir_nginx = measure_nginx("GET", limits, up, tmp, args.requests, 300)
            ir_gateway = measure(build, "GET", limits, up, tmp, args.requests, 300)
            (n_rps, n_cpu), (g_rps, g_cpu) = medians["nginx"], medians["gateway"]
            print(f"  {label:<15}{'nginx':>10}{n_rps:>10,.0f}{n_cpu:>12.1f}{ir_nginx:>10,.0f}")
            print(f"  {'':<15}{'gateway':>10}{g_rps:>10,.0f}{g_cpu:>12.1f}{ir_gateway:>10,.0f}")
            print(
                f"  {'':<15}{'ratio':>10}{g_rps / n_rps:>10.2f}{n_cpu / g_cpu:>12.2f}"
                f"{ir_nginx / ir_gateway:>10.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
