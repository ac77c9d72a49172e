"""Server CPU per request, for several builds of the gateway in one run.

    .venv/bin/python -m bench.cpu --src /path/to/tree-A --src /path/to/tree-B \\
        [--rounds 3] [--duration 5] [--connections 50]

Each ``--src`` is a source checkout (a directory holding ``gateway/``; default:
this repository). Its gateway runs as ``python -m gateway run`` with
``PYTHONPATH`` and the working directory set to that tree, one worker, memory
store, metrics and access log (to a file) on, in front of nginx returning a
small body, as in ``bench.run``. Four cases per build, loaded with ``wrk``:
  plain allowed     GET /                limits never reached
  plain denied      GET /                1 per hour: every request but the first 429
  aiohttp allowed   POST / with a body   (requests with a body go through aiohttp)
  aiohttp denied    POST / with a body   1 per hour
CPU is user + sys of the gateway process (and any children) from
/proc/PID/stat (utime, stime, in clock ticks) over the load window, divided by
the requests wrk completed in it. Each build keeps two gateways up for the
whole run (allowed limits, denied limits), warmed up 1 s per case; each round
loads every case on every build in turn (A, B, A, B, ...) so drift hits them
alike. Medians are printed, with each build's ratio to the first; nginx's CPU
per request and wrk's socket errors are shown too.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.run import (
    ALLOWED,
    DENIED,
    GATEWAY_CONFIG,
    NGINX_UPSTREAM,
    ROOT,
    free_port,
    wait_for_port,
)

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")

POST_SCRIPT = """wrk.method = "POST"
wrk.body = "x"
wrk.headers["Content-Type"] = "text/plain"
"""

# (name, limits, method): method None is wrk's default GET, "POST" uses POST_SCRIPT.
CASES = (
    ("plain allowed", "allowed", None),
    ("plain denied", "denied", None),
    ("aiohttp allowed", "allowed", "POST"),
    ("aiohttp denied", "denied", "POST"),
)
LIMITS = {"allowed": ALLOWED, "denied": DENIED}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found


def cpu_ticks(pid: int) -> tuple[int, int]:
    """utime and stime, in clock ticks, of ``pid`` and its descendants (all threads)."""
    user = system = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                # comm (field 2) may hold spaces: split after its closing parenthesis.
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # field 14, utime
        system += int(fields[12])  # field 15, stime
        todo.extend(_children(p))
    return user, system


@dataclass
class Sample:
    rps: float
    requests: int
    non_2xx: int
    errors: int  # wrk's socket errors: connect, read, write, timeout
    user_us: float  # gateway CPU per completed request, microseconds (nan: none completed)
    sys_us: float
    nginx_us: float  # upstream nginx CPU (user + sys) per completed request

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.sys_us


@dataclass
class Wrk:
    rps: float
    requests: int
    non_2xx: int
    errors: int


def run_wrk(url: str, duration: int, connections: int, script: Path | None) -> Wrk:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    if rps is None or done is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    err = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return Wrk(
        float(rps.group(1)),
        int(done.group(1)),
        int(non.group(1)) if non else 0,
        sum(int(n) for n in err.groups()) if err else 0,
    )


def measure(
    gateway_pid: int, nginx_pid: int, url: str, args: argparse.Namespace, script: Path | None
) -> Sample:
    g0, n0 = cpu_ticks(gateway_pid), cpu_ticks(nginx_pid)
    load = run_wrk(url, args.duration, args.connections, script)
    g1, n1 = cpu_ticks(gateway_pid), cpu_ticks(nginx_pid)
    per = TICK_US / load.requests if load.requests else math.nan
    return Sample(
        load.rps, load.requests, load.non_2xx, load.errors,
        (g1[0] - g0[0]) * per, (g1[1] - g0[1]) * per,
        (n1[0] - n0[0] + n1[1] - n0[1]) * per,
    )  # fmt: skip


def median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (nan: a round with no request done)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


@contextmanager
def process(
    argv: list[str], port: int, log: Path, **kwargs: object
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, **kwargs)  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                wait_for_port(port, timeout=0.5)
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError(f"{argv} did not start; its stderr:\n{log.read_text()}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def source_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    return env


def check_import(src: Path) -> str:
    """Where ``import gateway`` resolves with the env and cwd the gateway gets."""
    out = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        env=source_env(src), cwd=src, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(out).resolve().is_relative_to(src / "gateway"):
        raise RuntimeError(f"--src {src}: gateway imported from {out}, not from that tree")
    return out


def start_gateway(
    src: Path, tmp: Path, name: str, upstream: int, limits: str
) -> tuple[AbstractContextManager[subprocess.Popen[bytes]], int]:
    port = free_port()
    spec = LIMITS[limits]
    conf = tmp / f"{name}.yaml"
    conf.write_text(
        GATEWAY_CONFIG.format(
            tmp=tmp, name=name, port=port, admin=free_port(), workers=1, upstream=upstream,
            period=spec["period"], refill=spec["refill"], max_tokens=spec["max_tokens"],
            backend="memory", redis=free_port(),
        )
    )  # fmt: skip
    argv = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
    cm = process(argv, port, tmp / f"{name}.stderr", env=source_env(src), cwd=src)
    return cm, port


def _ratio(value: float, base: float) -> str:
    return f"{value / base:>6.2f}" if base and not math.isnan(value / base) else "     -"


def _us(value: float, width: int) -> str:
    return f"{value:>{width}.1f}" if not math.isnan(value) else f"{'-':>{width}}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", action="append", type=Path,
        help="a source tree holding gateway/ (repeat; default: this repository)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk round")
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}; run scripts/setup --test", file=sys.stderr)
        return 2
    srcs = [p.resolve() for p in (args.src or [ROOT])]
    for src in srcs:
        if not (src / "gateway").is_dir():
            print(f"bench: --src {src} holds no gateway/", file=sys.stderr)
            return 2
    labels = [f"[{i}]" for i in range(len(srcs))]
    print(f"Builds ({sys.executable}):")
    for label, src in zip(labels, srcs, strict=True):
        print(f"  {label} {src}  (imports {check_import(src)})")
    r, d, c = args.rounds, args.duration, args.connections
    print(
        f"wrk -t1 -c{c} -d{d}s, {r} rounds interleaved, medians; {os.cpu_count()} cores; "
        f"CPU from /proc/PID/stat at {TICK_US:.0f} us per tick",
        flush=True,
    )
    samples: dict[tuple[str, int], list[Sample]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="gateway-bench-cpu-") as tmp_name,
        ExitStack() as stack,
    ):
        tmp = Path(tmp_name)
        script = tmp / "post.lua"
        script.write_text(POST_SCRIPT)
        up = free_port()
        (tmp / "upstream.conf").write_text(NGINX_UPSTREAM.format(tmp=tmp, port=up))
        nginx_proc = stack.enter_context(
            process(["nginx", "-c", str(tmp / "upstream.conf"), "-p", str(tmp)], up,
                    tmp / "upstream.stderr")
        )  # fmt: skip
        ports: dict[tuple[int, str], tuple[int, int]] = {}  # (build, limits) -> (pid, port)
        for i, src in enumerate(srcs):
            for limits in LIMITS:
                cm, port = start_gateway(src, tmp, f"gateway-{i}-{limits}", up, limits)
                proc = stack.enter_context(cm)
                ports[i, limits] = (proc.pid, port)
        for _, limits, method in CASES:  # warm-up: connections, pools, caches
            for i in range(len(srcs)):
                pid, port = ports[i, limits]
                run_wrk(f"http://127.0.0.1:{port}/", 1, c, script if method else None)
        for _ in range(r):
            for case, limits, method in CASES:
                for i in range(len(srcs)):
                    pid, port = ports[i, limits]
                    url = f"http://127.0.0.1:{port}/"
                    sample = measure(pid, nginx_proc.pid, url, args, script if method else None)
                    samples.setdefault((case, i), []).append(sample)
        case_limits = {case: limits for case, limits, _ in CASES}
        for (i, limits), (pid, _) in ports.items():  # a failing gateway: say why
            errors = sum(
                s.errors
                for (case, j), runs in samples.items()
                if j == i and case_limits[case] == limits
                for s in runs
            )
            if errors:
                tail = (tmp / f"gateway-{i}-{limits}.stderr").read_text().splitlines()[-8:]
                print(f"\n[{i}] {limits} gateway (pid {pid}) had socket errors; stderr ends:")
                print("\n".join(f"    {line}" for line in tail))
    print(
        f"\n  {'case':<16} {'build':<5} {'req/s':>9} {'user us':>8} {'sys us':>7} "
        f"{'CPU us':>7} {'non-2xx':>8} {'errors':>6} {'nginx us':>8}   {'x req/s':>7} "
        f"{'x CPU':>6}"
    )
    for case, _, _ in CASES:
        base_rps = base_cpu = math.nan
        for i, label in enumerate(labels):
            runs = samples[case, i]
            rps, cpu = median(s.rps for s in runs), median(s.cpu_us for s in runs)
            if i == 0:
                base_rps, base_cpu = rps, cpu
            print(
                f"  {case if i == 0 else '':<16} {label:<5} {rps:>9.0f} "
                f"{_us(median(s.user_us for s in runs), 8)} "
                f"{_us(median(s.sys_us for s in runs), 7)} {_us(cpu, 7)} "
                f"{median(s.non_2xx for s in runs):>8.0f} "
                f"{median(s.errors for s in runs):>6.0f} "
                f"{_us(median(s.nginx_us for s in runs), 8)}   "
                f"{_ratio(rps, base_rps)} {_ratio(cpu, base_cpu)}"
            )
    print(
        "\nus = microseconds of CPU per completed request: gateway user, sys, their sum "
        "(median of\nper-round sums); nginx us: the upstream's (the denied cases barely "
        "reach it). errors = wrk's\nsocket errors (connect, read, write, timeout). "
        "x = ratio to [0]. -: no request completed."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
