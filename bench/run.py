"""The gateway beside nginx, in one run, on one machine.

    .venv/bin/python -m bench.run [--rounds 3] [--duration 5] [--connections 50]

Loads, each with ``wrk`` in turn, several rounds, medians:
  direct    nginx returning a small body (the upstream of the two below)
  nginx     nginx limit_req + proxy_pass (keep-alive upstream), one worker
  gateway   ratelimit-gateway, one worker, metrics and access log (to a file) on
for the allowed path (limits never reached), the denied path (every request
but the first denied: nginx with limit_req_status 429), the allowed path over
TLS (both terminating TLS 1.2/1.3 with the same P-256 certificate, made here
with openssl; wrk keeps its connections alive, so this is the cost of TLS
records, not of handshakes), at workers = cores (nginx worker_processes N;
gateway workers: N sharing buckets through Redis), and round robin over two
upstream servers (nginx's ``upstream`` block with two servers; the gateway's
``upstream.servers``), allowed path.
Then memory per tracked client and the cost of one limiter decision beside the
in-memory limiters of ``limits`` and ``pyrate-limiter`` (when installed).

wrk, nginx, Redis and the gateway share the machine's cores: absolute numbers
are pessimistic; the ratios are the point.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / ".venv" / "bin" / "gateway"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(url: str, duration: int, connections: int) -> Load:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else float("nan")

    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Load(rps, pct("50"), pct("99"), int(non.group(1)) if non else 0)


def fixed_rate(url: str, rate: float, duration: int, connections: int) -> Load:
    """Latency at a fixed offered load (hey's -q is per connection)."""
    per_connection = max(1, round(rate / connections))
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", "-c", str(connections), "-q", str(per_connection), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}% in ([\d.]+) secs", out, re.M)
        return float(m.group(1)) * 1000 if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return Load(float(rps.group(1)) if rps else float("nan"), pct("50"), pct("99"), 0)


def median_load(loads: list[Load]) -> Load:
    return Load(
        statistics.median(x.rps for x in loads),
        statistics.median(x.p50_ms for x in loads),
        statistics.median(x.p99_ms for x in loads),
        int(statistics.median(x.non_2xx for x in loads)),
    )


NGINX_UPSTREAM = """
worker_processes 1;
daemon off;
pid {tmp}/upstream.pid;
error_log {tmp}/upstream-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
  }}
}}
"""

NGINX_LIMIT = """
worker_processes {workers};
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log {tmp}/{name}-access.log;
  limit_req_zone $binary_remote_addr zone=perclient:10m rate={rate};
  limit_req_status 429;
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port}{ssl};
    {tls}
    location / {{
      limit_req zone=perclient{burst};
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""

GATEWAY_CONFIG = """
listen: "127.0.0.1:{port}"
admin: "127.0.0.1:{admin}"
workers: {workers}
upstream: {{url: "http://127.0.0.1:{upstream}", max_connections: 256}}
limits:
  default: {{refill_period: {period}, refill_tokens: {refill}, max_tokens: {max_tokens}}}
storage: {{backend: {backend}, redis_url: "redis://127.0.0.1:{redis}/0"}}
access_log: {{path: "{tmp}/{name}-access.log"}}
"""

# The same certificate and protocols for both (nginx 1.22's default still has TLS 1.0/1.1).
NGINX_TLS = (
    "ssl_certificate {tmp}/tls.crt; ssl_certificate_key {tmp}/tls.key; "
    "ssl_protocols TLSv1.2 TLSv1.3;"
)
GATEWAY_TLS = 'tls: {{cert: "{tmp}/tls.crt", key: "{tmp}/tls.key"}}'


def with_servers(gateway_config: str, ports: list[int]) -> str:
    """GATEWAY_CONFIG's one upstream url replaced by ``servers`` on ``ports``."""
    servers = ", ".join(f'"http://127.0.0.1:{port}"' for port in ports)
    lines = [
        f"upstream: {{servers: [{servers}], max_connections: 256}}"
        if line.startswith("upstream:")
        else line
        for line in gateway_config.splitlines()
    ]
    return "\n".join(lines) + "\n"


def nginx_second_upstream(tmp: Path, port: int) -> str:
    """NGINX_UPSTREAM for a second instance: its own pid and error log."""
    return NGINX_UPSTREAM.format(tmp=tmp, port=port).replace(
        f"{tmp}/upstream", f"{tmp}/upstream2"
    )


ALLOWED = {"rate": "100000000r/s", "burst": " burst=1000000 nodelay",
           "period": "1s", "refill": 100000000, "max_tokens": 100000000}  # fmt: skip
DENIED = {"rate": "1r/m", "burst": "", "period": "1h", "refill": 1, "max_tokens": 1}


@contextmanager
def process(argv: list[str], port: int, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx(tmp: Path, name: str, conf: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    return process(["nginx", "-c", str(path), "-p", str(tmp)], port)  # type: ignore[return-value]


def gateway(
    tmp: Path,
    name: str,
    port: int,
    tls: str = "",
    *,
    servers: list[int] | None = None,
    **fields: object,
) -> Iterator[subprocess.Popen[bytes]]:
    path = tmp / f"{name}.yaml"
    text = GATEWAY_CONFIG.format(tmp=tmp, name=name, port=port, **fields)
    if servers:
        text = with_servers(text, servers)
    path.write_text(text + tls)
    return process([str(GATEWAY), "run", "--config", str(path)], port)  # type: ignore[return-value]


def make_certificate(tmp: Path) -> None:
    """A self-signed P-256 pair for 127.0.0.1 (wrk does not verify it)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp / "tls.key"), "-out", str(tmp / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip


def measure(label: str, url: str, rounds: int, duration: int, connections: int) -> Load:
    run_wrk(url, 1, connections)  # warm-up: connections, pools, caches
    loads = [run_wrk(url, duration, connections) for _ in range(rounds)]
    m = median_load(loads)
    print(
        f"  {label:<28} {m.rps:>10.0f} req/s   p50 {m.p50_ms:>7.2f} ms   "
        f"p99 {m.p99_ms:>7.2f} ms   non-2xx {m.non_2xx}",
        flush=True,
    )
    return m


def http_load_section(args: argparse.Namespace, tmp: Path) -> None:
    cores = os.cpu_count() or 1
    up = free_port()
    redis_port = free_port()
    common = {"upstream": up, "redis": redis_port}
    r, d, c = args.rounds, args.duration, args.connections
    print(f"HTTP load: wrk -t1 -c{c} -d{d}s, {r} rounds, medians; {cores} cores")
    with nginx(tmp, "upstream", NGINX_UPSTREAM.format(tmp=tmp, port=up), up):
        direct = measure("direct upstream (nginx)", f"http://127.0.0.1:{up}/", r, d, c)
        results: dict[str, tuple[Load, Load]] = {}
        half_load: tuple[float, Load, Load] | None = None
        for path_name, limits in (("allowed", ALLOWED), ("denied", DENIED)):
            np, gp = free_port(), free_port()
            conf = NGINX_LIMIT.format(
                tmp=tmp, name=f"nginx-{path_name}", workers=1, port=np, upstream=up,
                rate=limits["rate"], burst=limits["burst"], ssl="", tls="",
            )  # fmt: skip
            nginx_url, gateway_url = f"http://127.0.0.1:{np}/", f"http://127.0.0.1:{gp}/"
            with nginx(tmp, f"nginx-{path_name}", conf, np), gateway(
                tmp, f"gateway-{path_name}", gp, admin=free_port(), workers=1,
                backend="memory", period=limits["period"], refill=limits["refill"],
                max_tokens=limits["max_tokens"], **common,
            ):  # fmt: skip
                n = measure(f"nginx limit_req, {path_name}", nginx_url, r, d, c)
                g = measure(f"gateway, {path_name}", gateway_url, r, d, c)
                if path_name == "allowed" and shutil.which("hey"):
                    rate = g.rps / 2
                    half_load = (
                        rate,
                        fixed_rate(nginx_url, rate, d, c),
                        fixed_rate(gateway_url, rate, d, c),
                    )
            results[path_name] = (n, g)
        results["tls"] = tls_load(tmp, args, common)
        np, gp = free_port(), free_port()
        conf = NGINX_LIMIT.format(
            tmp=tmp, name="nginx-cores", workers=cores, port=np, upstream=up,
            rate=ALLOWED["rate"], burst=ALLOWED["burst"], ssl="", tls="",
        )  # fmt: skip
        with nginx(tmp, "nginx-cores", conf, np):
            n = measure(f"nginx x{cores} workers, allowed", f"http://127.0.0.1:{np}/", r, d, c)
        redis = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no"]  # fmt: skip
        with process(redis, redis_port), gateway(
            tmp, "gateway-cores", gp, admin=free_port(), workers=cores, backend="redis",
            period=ALLOWED["period"], refill=ALLOWED["refill"],
            max_tokens=ALLOWED["max_tokens"], **common,
        ):  # fmt: skip
            g = measure(f"gateway x{cores} workers (redis)", f"http://127.0.0.1:{gp}/", r, d, c)
        results["cores"] = (n, g)
        results["2 servers"] = round_robin_section(args, tmp, up, common)
    print("\nRatios, gateway / nginx limit_req (requests/s; p99 difference):")
    for key, (n, g) in results.items():
        print(f"  {key:<9} {g.rps / n.rps:>5.2f} x   p99 {g.p99_ms - n.p99_ms:+7.2f} ms")
    print(
        f"  gateway allowed / direct upstream: {results['allowed'][1].rps / direct.rps:.2f} x"
    )
    if half_load is not None:
        rate, n, g = half_load
        print(
            f"\nAt half the gateway's peak ({rate:.0f} req/s fixed rate, hey -c{c}), allowed "
            f"path:\n  nginx   p50 {n.p50_ms:.2f} ms  p99 {n.p99_ms:.2f} ms\n"
            f"  gateway p50 {g.p50_ms:.2f} ms  p99 {g.p99_ms:.2f} ms   "
            f"p99 difference {g.p99_ms - n.p99_ms:+.2f} ms"
        )


def tls_load(tmp: Path, args: argparse.Namespace, common: dict[str, int]) -> tuple[Load, Load]:
    """The allowed path over TLS: nginx and the gateway, one worker each,
    the same certificate, the same wrk run against https://."""
    make_certificate(tmp)
    np, gp = free_port(), free_port()
    conf = NGINX_LIMIT.format(
        tmp=tmp, name="nginx-tls", workers=1, port=np, upstream=common["upstream"],
        rate=ALLOWED["rate"], burst=ALLOWED["burst"], ssl=" ssl", tls=NGINX_TLS.format(tmp=tmp),
    )  # fmt: skip
    with nginx(tmp, "nginx-tls", conf, np), gateway(
        tmp, "gateway-tls", gp, admin=free_port(), workers=1, backend="memory",
        period=ALLOWED["period"], refill=ALLOWED["refill"], max_tokens=ALLOWED["max_tokens"],
        tls=GATEWAY_TLS.format(tmp=tmp), **common,
    ):  # fmt: skip
        r, d, c = args.rounds, args.duration, args.connections
        n = measure("nginx limit_req, TLS allowed", f"https://127.0.0.1:{np}/", r, d, c)
        g = measure("gateway, TLS allowed", f"https://127.0.0.1:{gp}/", r, d, c)
    return n, g


def round_robin_section(
    args: argparse.Namespace, tmp: Path, up: int, common: dict[str, int]
) -> tuple[Load, Load]:
    """Allowed path, round robin over two upstream nginx servers: nginx's
    ``upstream`` block with both beside the gateway's ``upstream.servers``.
    Prints how the gateway's access log split the requests."""
    r, d, c = args.rounds, args.duration, args.connections
    up2 = free_port()
    np, gp = free_port(), free_port()
    conf = NGINX_LIMIT.format(
        tmp=tmp, name="nginx-rr", workers=1, port=np, upstream=up,
        rate=ALLOWED["rate"], burst=ALLOWED["burst"],
    )  # fmt: skip
    one, two = f"server 127.0.0.1:{up};", f"server 127.0.0.1:{up2};"
    conf = conf.replace(one, f"{one} {two}")
    with nginx(tmp, "upstream2", nginx_second_upstream(tmp, up2), up2), nginx(
        tmp, "nginx-rr", conf, np
    ), gateway(
        tmp, "gateway-rr", gp, servers=[up, up2], admin=free_port(), workers=1,
        backend="memory", period=ALLOWED["period"], refill=ALLOWED["refill"],
        max_tokens=ALLOWED["max_tokens"], **common,
    ):  # fmt: skip
        n = measure("nginx upstream x2, allowed", f"http://127.0.0.1:{np}/", r, d, c)
        g = measure("gateway servers x2, allowed", f"http://127.0.0.1:{gp}/", r, d, c)
    split: dict[str, int] = {}
    log = tmp / "gateway-rr-access.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        found = re.search(r'"upstream_addr":"([^"]*)"', line)
        if found:
            split[found.group(1)] = split.get(found.group(1), 0) + 1
    total = sum(split.values()) or 1
    shares = ", ".join(f"{addr} {count / total:.1%}" for addr, count in sorted(split.items()))
    print(f"  gateway's split over the two servers: {shares}")
    return n, g


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_section() -> None:
    sys.path.insert(0, str(ROOT))
    from gateway.config.model import BucketSpec
    from gateway.limiting.memory_store import MemoryStore
    from gateway.limiting.policy import Limit
    from gateway.limiting.refill_clock import ManualRefillClock

    count = 100_000
    clock = ManualRefillClock()
    store = MemoryStore(clock, max_tracked=count, idle_timeout_seconds=600)
    limit = Limit(BucketSpec(1.0, 10, 20), clock)
    # Client ids as the gateway makes them (IPv4 text), created before the
    # baseline: the request already holds them; the table's cost is measured.
    ids = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]
    keys = [[("default", "default", client, client)] for client in ids]
    limits = [limit]
    gc.collect()
    before = rss_bytes()
    for key in keys:
        store.take_now(key, limits)
    gc.collect()
    grown = rss_bytes() - before
    print(
        f"\nMemory: {count:,} tracked clients grew RSS by {grown / 2**20:.1f} MiB = "
        f"{grown / count:.0f} bytes per client (the table only; the id strings "
        "belong to the requests)"
    )


def _ns_per_call(fn: Callable[[], object], calls: int = 200_000) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls


def decision_section() -> None:
    from gateway.config.model import BucketSpec
    from gateway.limiting.memory_store import MemoryStore
    from gateway.limiting.policy import Limit
    from gateway.limiting.refill_clock import ManualRefillClock

    clock = ManualRefillClock()
    store = MemoryStore(clock, max_tracked=100_000, idle_timeout_seconds=600)
    one = [Limit(BucketSpec(1.0, 10**9, 10**9), clock)]
    three = [
        Limit(BucketSpec(period, 10**9, 10**9, name), clock)
        for period, name in ((1.0, "default"), (60.0, "minute"), (3600.0, "hourly"))
    ]
    client = "10.0.0.1"
    one_key = [("default", "default", client, client)]
    three_keys = [("default", limit.name, client, client) for limit in three]
    rows = [
        (
            "ratelimit-gateway MemoryStore.take_now",
            _ns_per_call(lambda: store.take_now(one_key, one)),
        ),
        (
            "ratelimit-gateway MemoryStore.take_now, 3 limits",
            _ns_per_call(lambda: store.take_now(three_keys, three)),
        ),
    ]
    try:
        from limits import RateLimitItemPerSecond, storage, strategies

        item = RateLimitItemPerSecond(10**9)
        for name, cls in (
            ("fixed window", strategies.FixedWindowRateLimiter),
            ("moving window", strategies.MovingWindowRateLimiter),
            ("sliding window counter", strategies.SlidingWindowCounterRateLimiter),
        ):
            limiter = cls(storage.MemoryStorage())
            rows.append(
                (
                    f"limits {name} hit()",
                    _ns_per_call(lambda lim=limiter: lim.hit(item, "10.0.0.1"), 50_000),
                )
            )
    except ImportError:
        rows.append(("limits (not installed: pip install limits)", float("nan")))
    try:
        from pyrate_limiter import Duration, Limiter, Rate

        pyrate = Limiter(Rate(10**9, Duration.SECOND))
        rows.append(
            (
                "pyrate-limiter try_acquire()",
                _ns_per_call(lambda: pyrate.try_acquire("10.0.0.1", blocking=False), 50_000),
            )
        )
    except ImportError:
        rows.append(
            ("pyrate-limiter (not installed: pip install pyrate-limiter)", float("nan"))
        )
    print("\nOne limiter decision (in-memory, same key, admitted), ns:")
    for name, ns in rows:
        print(f"  {name:<48} {ns:>9.0f} ns")


async def _redis_decisions(
    url: str, seconds: float, concurrency: int, limit_count: int = 1
) -> int:
    """Decisions made through one RedisStore (one gateway process's view) by
    ``concurrency`` tasks, each deciding for its own client over
    ``limit_count`` limits (the later ones per route and per ip), in
    ``seconds``."""
    import asyncio

    from gateway.config.model import BucketSpec, StorageConfig
    from gateway.limiting.memory_store import MemoryStore
    from gateway.limiting.policy import Limit
    from gateway.limiting.redis_store import RedisStore
    from gateway.limiting.refill_clock import RefillClock

    clock = RefillClock()
    store = RedisStore(
        StorageConfig(backend="redis", redis_url=url, timeout_seconds=1.0),
        MemoryStore(clock, 10, 60.0),
    )
    pers = (("client",), ("route",), ("ip",))[:limit_count]
    limits = [
        Limit(BucketSpec(1.0, 10**9, 10**9, f"l{n}", per=per), clock)
        for n, per in enumerate(pers)
    ]
    done = 0
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        who = f"client-{os.getpid()}-{i}"
        # One tag for a request's keys, as RouteLimits.keys gives them.
        subjects = (who, "*", f"ip:10.0.{i >> 8 & 255}.{i & 255}")[:limit_count]
        tag = who if limit_count == 1 else "default"
        keys = [("default", f"l{n}" if n else "", s, tag) for n, s in enumerate(subjects)]
        while time.monotonic() < deadline:
            await store.take(keys, limits)
            done += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    await store.close()
    return done


def decisions_per_second_section(seconds: float = 3.0, concurrency: int = 256) -> None:
    import asyncio

    from gateway.config.model import BucketSpec
    from gateway.limiting.memory_store import MemoryStore
    from gateway.limiting.policy import Limit
    from gateway.limiting.refill_clock import ManualRefillClock

    clock = ManualRefillClock()
    store = MemoryStore(clock, max_tracked=100_000, idle_timeout_seconds=600)
    limits = [Limit(BucketSpec(1.0, 10**9, 10**9), clock)]
    keys = [[("default", "default", f"client-{i}", f"client-{i}")] for i in range(concurrency)]
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key in keys:
            store.take_now(key, limits)
        count += len(keys)
    print(f"\nDecisions per second ({concurrency} concurrent clients, {seconds:.0f} s):")
    print(f"  memory backend, one process               {count / seconds:>10.0f} /s")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"]  # fmt: skip
    with process(redis, port):
        one = asyncio.run(_redis_decisions(url, seconds, concurrency))
        print(f"  redis backend, one instance               {one / seconds:>10.0f} /s")
        three = asyncio.run(_redis_decisions(url, seconds, concurrency, 3))
        print(f"  redis backend, one instance, 3 limits     {three / seconds:>10.0f} /s")
        argv = [sys.executable, "-m", "bench.run", "--redis-decisions", url, str(seconds),
                str(concurrency)]  # fmt: skip
        pair = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            for _ in range(2)
        ]
        both = sum(int(p.communicate()[0].strip()) for p in pair)
        print(f"  redis backend, two instances (sum)        {both / seconds:>10.0f} /s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk round")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--skip-http", action="store_true", help="only memory and decisions")
    parser.add_argument("--redis-decisions", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.redis_decisions:  # one of the two instances of decisions_per_second_section
        import asyncio

        url, seconds, concurrency = args.redis_decisions
        print(asyncio.run(_redis_decisions(url, float(seconds), int(concurrency))))
        return 0
    missing = [tool for tool in ("wrk", "nginx", "redis-server") if shutil.which(tool) is None]
    if missing and not args.skip_http:
        print(f"bench: missing {', '.join(missing)}; run scripts/setup --test", file=sys.stderr)
        return 2
    if not GATEWAY.exists():
        print("bench: no .venv/bin/gateway; run scripts/setup first", file=sys.stderr)
        return 2
    if not args.skip_http:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
            http_load_section(args, Path(tmp))
    memory_section()
    decision_section()
    if shutil.which("redis-server"):
        decisions_per_second_section()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
