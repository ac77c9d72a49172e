"""The installed ``gateway`` command, end to end, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import gateway
from tests.helpers import (
    CLI_TIMEOUT_SECONDS,
    GATEWAY,
    POLL_ATTEMPTS,
    PROBLEM_LINE,
    base_url,
    bucket,
    free_port,
    gateway_run,
    limits,
    poll,
    run,
    run_cli,
    wait_healthy,
    write_config,
)
from tests.upstream_app import HITS


def problem_lines(stderr: str, config_path: Path) -> list[re.Match[str]]:
    """The ``PATH:LINE:COL: key.path: message`` lines of ``stderr``."""
    prefix = f"{config_path}:"
    matches = []
    for line in stderr.splitlines():
        if line.startswith(prefix):
            match = PROBLEM_LINE.match(line)
            assert match is not None, f"malformed problem line: {line!r}"
            assert match["path"] == str(config_path)
            matches.append(match)
    return matches


VALID_CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "admin": "127.0.0.1:0",
    "upstream": {"url": "http://127.0.0.1:8000"},
    "limits": {"default": {"refill_period": "1s", "refill_tokens": 10, "max_tokens": 20}},
    "routes": [{"path_prefix": "/healthz", "limit": "unlimited"}],
    "access_log": {"path": "off"},
}

# Two problems at known places: line 7 col 17 and line 9 col 1.
INVALID_CONFIG = """\
upstream:
  url: http://127.0.0.1:8000
limits:
  default:
    refill_period: 1s
    refill_tokens: 10
    max_tokens: -1
  overrides: []
lisen: "127.0.0.1:8080"
"""


# -- gateway run: serve, limit, log, drain on SIGTERM --


async def test_run_serves_limits_and_drains_on_sigterm(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    proxy_port, admin_port = free_port(), free_port()
    access_log = tmp_path / "access.log"
    config_path = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": f"127.0.0.1:{proxy_port}",
            "admin": f"127.0.0.1:{admin_port}",
            "upstream": {"url": base_url(upstream)},
            "limits": limits(3),
            "access_log": {"path": str(access_log)},
            "drain_timeout": "5s",
        },
    )
    async with gateway_run(
        config_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    ) as process:
        admin = f"http://127.0.0.1:{admin_port}"
        proxy = f"http://127.0.0.1:{proxy_port}"
        await wait_healthy(http, admin, process)  # up to ~10 s for the process to come up

        statuses = []
        for i in range(5):
            async with http.get(f"{proxy}/cli/{i}") as response:
                await response.read()
                statuses.append(response.status)
        assert statuses == [200, 200, 200, 429, 429]
        assert upstream.app[HITS] == ["/cli/0", "/cli/1", "/cli/2"]

        process.send_signal(signal.SIGTERM)
        _stdout, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    assert process.returncode == 0, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr

    lines = access_log.read_text().splitlines()
    assert len(lines) == 5
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == [f"/cli/{i}" for i in range(5)]
    assert [r["status"] for r in records] == statuses
    assert [r["decision"] for r in records] == ["allowed"] * 3 + ["denied"] * 2


async def test_run_with_invalid_config_exits_2_without_traceback(tmp_path: Path) -> None:
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(INVALID_CONFIG)
    async with gateway_run(
        config_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    ) as process:
        _stdout, stderr_bytes = await asyncio.wait_for(
            process.communicate(), CLI_TIMEOUT_SECONDS
        )
    stderr = stderr_bytes.decode()
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    keys = [m["key"] for m in problem_lines(stderr, config_path)]
    assert keys == ["limits.default.max_tokens", "lisen"]


# -- gateway check --


def test_check_valid_config_exits_0(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "ok.yaml", VALID_CONFIG)
    result = run_cli("check", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert problem_lines(result.stderr, config_path) == []


def test_check_invalid_config_reports_every_problem_with_location(tmp_path: Path) -> None:
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(INVALID_CONFIG)
    result = run_cli("check", "--config", str(config_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    problems = problem_lines(result.stderr, config_path)
    located = [(int(m["line"]), int(m["col"]), m["key"]) for m in problems]
    assert located == [(7, 17, "limits.default.max_tokens"), (9, 1, "lisen")]
    assert all(m["msg"].strip() for m in problems)


def test_check_reports_yaml_syntax_error_with_location(tmp_path: Path) -> None:
    config_path = tmp_path / "broken.yaml"
    config_path.write_text("upstream:\n  url: [unclosed\n")
    result = run_cli("check", "--config", str(config_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(problem_lines(result.stderr, config_path)) >= 1


def test_check_unknown_key_is_an_error(tmp_path: Path) -> None:
    config = {**VALID_CONFIG, "limits": {"default": {"max_token": 5}}}
    config_path = write_config(tmp_path / "typo.yaml", config)
    result = run_cli("check", "--config", str(config_path))
    assert result.returncode == 2
    keys = [m["key"] for m in problem_lines(result.stderr, config_path)]
    assert keys == ["limits.default.max_token"]


def test_missing_config_file_exits_2_with_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    for command in ("check", "run"):
        result = run_cli(command, "--config", str(missing))
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert str(missing) in result.stderr
        assert "No such file" in result.stderr or "not found" in result.stderr.lower()


def test_python_dash_m_gateway_help() -> None:
    result = run([sys.executable, "-m", "gateway", "--help"], timeout=CLI_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr
    for command in ("run", "check", "demo"):
        assert command in result.stdout


async def test_demo_serves_what_its_banner_suggests(http: aiohttp.ClientSession) -> None:
    """``gateway demo`` as the README's first command runs it: the demo
    upstream behind the gateway, and each hint in the banner does what its
    comment says."""
    proxy_port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        GATEWAY, "demo", "--listen", f"127.0.0.1:{proxy_port}",
        "--admin", f"127.0.0.1:{admin_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(CLI_TIMEOUT_SECONDS):
            banner = (await process.stdout.readuntil(b"JSON lines):")).decode()
        proxy, admin = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{admin_port}"
        assert f"curl -i {proxy}/hello" in banner
        assert f"curl {admin}/admin/clients/ip:127.0.0.1" in banner

        statuses = []
        for _ in range(10):  # "5 at once, then 2 per second; then 429"
            async with http.get(proxy + "/hello") as response:
                statuses.append(response.status)
        # The demo runs on the real clock: a refill (2 tokens) may fall
        # between two of these requests.
        assert statuses[:5] == [200] * 5
        assert 429 in statuses
        assert statuses.count(200) <= 7, statuses
        premium = {"X-API-Key": "key-premium-1"}
        async with http.get(proxy + "/hello", headers=premium) as response:
            assert response.status == 200  # its own, larger bucket
            assert response.headers["X-RateLimit-Limit"] == "100"
        async with http.get(admin + "/admin/clients/ip:127.0.0.1") as response:
            assert response.status == 200
            buckets = (await response.json())["buckets"]
        assert [b["max_tokens"] for b in buckets if b["route"] == "default"] == [5]
        # The banner's dashboard and top list, as a newcomer would open them.
        assert f"dashboard     : {admin}/ " in banner
        async with http.get(admin + "/") as response:
            assert response.status == 200
            assert "<title>ratelimit-gateway</title>" in await response.text()
        async with http.get(admin + "/admin/clients") as response:
            clients = (await response.json())["clients"]
        assert [c["client"] for c in clients] == ["ip:127.0.0.1"]
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(CLI_TIMEOUT_SECONDS):
            await process.communicate()
    assert process.returncode == 0


# -- the first ten minutes: what a newcomer types --

EX_USAGE = 64


def gateway_in(cwd: Path, *args: str) -> Any:
    """The installed ``gateway`` with ``args``, run in ``cwd``."""
    return run([GATEWAY, *args], timeout=CLI_TIMEOUT_SECONDS, cwd=cwd)


def test_check_takes_the_file_as_a_positional_argument(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "ok.yaml", VALID_CONFIG)
    result = run_cli("check", str(config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config_path}: ok (")

    bad = tmp_path / "bad.yaml"
    bad.write_text(INVALID_CONFIG)
    result = run_cli("check", str(bad))
    assert result.returncode == 2
    keys = [m["key"] for m in problem_lines(result.stderr, bad)]
    assert keys == ["limits.default.max_tokens", "lisen"]

    # The same file both ways is fine; two different files are a usage error.
    assert run_cli("check", "--config", str(config_path), str(config_path)).returncode == 0
    result = run_cli("check", "--config", str(config_path), str(bad))
    assert result.returncode == EX_USAGE
    assert "two config files given" in result.stderr


def test_without_config_check_uses_gateway_yaml_in_the_working_directory(
    tmp_path: Path,
) -> None:
    write_config(tmp_path / "gateway.yaml", VALID_CONFIG)
    result = gateway_in(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no --config given; checking ./gateway.yaml",
        "./gateway.yaml: ok (1 route, 0 overrides, upstream http://127.0.0.1:8000)",
    ]


def test_without_config_run_says_which_file_it_uses(tmp_path: Path) -> None:
    # An invalid file: run stops after saying which file and what is wrong.
    (tmp_path / "gateway.yaml").write_text(INVALID_CONFIG)
    result = gateway_in(tmp_path, "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "gateway: no --config given; using ./gateway.yaml"
    assert lines[1].startswith("./gateway.yaml:7:17: limits.default.max_tokens: ")


def test_without_config_and_no_default_file_is_a_usage_error(tmp_path: Path) -> None:
    if Path("/etc/ratelimit-gateway/gateway.yaml").exists():
        pytest.skip("this machine has a system-wide gateway config")
    for command in ("check", "run"):
        result = gateway_in(tmp_path, command)
        assert result.returncode == EX_USAGE, (command, result.stderr)
        assert result.stderr.splitlines()[-1] == (
            f"gateway {command}: error: no config file: give --config PATH (looked for "
            "./gateway.yaml and /etc/ratelimit-gateway/gateway.yaml)"
        )


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["serve"], id="unknown-command"),
        pytest.param(["check", "--conifg", "x.yaml"], id="unknown-option"),
        pytest.param(["--log-level", "LOUD", "check", "x.yaml"], id="bad-log-level"),
        pytest.param(["demo", "--listen"], id="option-without-value"),
    ],
)
def test_usage_errors_exit_64_not_2(argv: list[str]) -> None:
    result = run_cli(*argv)
    assert result.returncode == EX_USAGE, result.stderr
    assert result.stderr.startswith("usage: gateway")
    assert "Traceback" not in result.stderr


def test_invalid_config_still_exits_2_beside_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(INVALID_CONFIG)
    assert run_cli("check", "--config", str(bad)).returncode == 2
    assert run_cli("check", "--config", str(bad), "--bogus").returncode == EX_USAGE


def test_log_level_is_accepted_before_or_after_the_command(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "ok.yaml", VALID_CONFIG)
    for argv in (
        ["--log-level", "DEBUG", "check", str(config_path)],
        ["check", str(config_path), "--log-level", "debug"],
        ["check", "--log-level", "WARNING", "--config", str(config_path)],
    ):
        result = run_cli(*argv)
        assert result.returncode == 0, (argv, result.stderr)


def test_help_lists_the_commands_but_not_the_internal_worker() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "worker" not in result.stdout
    assert "{run,check,demo}" in result.stdout
    assert "./gateway.yaml" in result.stdout  # where the config is looked for
    # Nor in the message for a mistyped command.
    assert "worker" not in run_cli("serve").stderr
    # It still works for the supervisor, which starts it.
    result = run_cli("worker", "--help")
    assert result.returncode == 0
    assert "--fd" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    build = gateway.request_path_build()
    assert build in ("compiled (mypyc)", "pure Python")
    assert result.stdout == f"ratelimit-gateway {gateway.__version__}, request path {build}\n"
    pyproject = tomllib.loads(
        (Path(gateway.__file__).parents[1] / "pyproject.toml").read_text()
    )
    assert gateway.__version__ == pyproject["project"]["version"]


@pytest.mark.parametrize(
    ("routes", "overrides", "summary"),
    [
        (1, 1, "1 route, 1 override"),
        (2, 0, "2 routes, 0 overrides"),
        (0, 2, "0 routes, 2 overrides"),
    ],
)
def test_check_summary_counts_in_words(
    tmp_path: Path, routes: int, overrides: int, summary: str
) -> None:
    config = {
        "upstream": {"url": "http://127.0.0.1:8000"},
        "limits": {
            "default": bucket(20),
            "overrides": [{"client": f"k{i}", **bucket(30)} for i in range(overrides)],
        },
        "routes": [{"path_prefix": f"/r{i}"} for i in range(routes)],
    }
    config_path = write_config(tmp_path / "c.yaml", config)
    result = run_cli("check", str(config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config_path}: ok ({summary}, upstream http://127.0.0.1:8000)\n"


def test_check_shows_a_limit_written_as_a_rate_how_to_write_it(tmp_path: Path) -> None:
    config_path = tmp_path / "rate.yaml"
    config_path.write_text(
        "upstream: {url: 'http://127.0.0.1:8000'}\nlimits:\n  default: 10/s\n"
    )
    result = run_cli("check", str(config_path))
    assert result.returncode == 2
    [problem] = problem_lines(result.stderr, config_path)
    assert problem["key"] == "limits.default"
    assert "{refill_period: 1s, refill_tokens: 10, max_tokens: 20}" in problem["msg"]
    assert problem["msg"].endswith("got '10/s'")


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_a_taken_port_fails_the_start_with_one_clear_line(tmp_path: Path, taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        other = free_port()
        ports = {"listen": port, "admin": other} if taken == "listen" else {
            "listen": other, "admin": port,
        }  # fmt: skip
        config_path = write_config(
            tmp_path / "gateway.yaml",
            {**VALID_CONFIG, **{key: f"127.0.0.1:{p}" for key, p in ports.items()}},
        )
        result = run_cli("run", str(config_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"gateway: cannot start: {taken} 127.0.0.1:{port}: address already in use\n"
    )


def test_demo_on_a_taken_port_fails_with_one_clear_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        listen, admin = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"
        result = run_cli("demo", "--listen", listen, "--admin", admin)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"gateway demo: cannot start: listen 127.0.0.1:{port}: address already in use\n"
    )


def test_an_unopenable_access_log_fails_the_start_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    config = {**VALID_CONFIG, "access_log": {"path": str(missing)}}
    config_path = write_config(tmp_path / "gateway.yaml", config)
    result = run_cli("run", str(config_path))
    assert result.returncode == 1
    assert result.stderr == f"gateway: cannot start: No such file or directory: {missing}\n"


@asynccontextmanager
async def running(config_path: Path, log: IO[bytes], *extra: str) -> AsyncIterator[Any]:
    """``gateway run CONFIG_PATH *extra`` logging into ``log``; stopped with
    SIGTERM at the end (killed if it is still running)."""
    process = await asyncio.create_subprocess_exec(
        GATEWAY, "run", str(config_path), *extra, stdout=asyncio.subprocess.DEVNULL, stderr=log
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), CLI_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()


def logged(path: Path) -> list[str]:
    """The log's messages, without time, level and logger."""
    return [
        line.split(" gateway: ", 1)[1]
        for line in path.read_text().splitlines()
        if " INFO gateway: " in line
    ]


async def test_run_logs_each_route_at_start_and_after_each_reload(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    admin_port = free_port()
    config: dict[str, Any] = {
        **VALID_CONFIG,
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{admin_port}",
        "limits": {
            **VALID_CONFIG["limits"],
            "overrides": [{"client": "key-1", **bucket(50, 50, "1s")}],
        },
        "routes": [
            {
                "path_prefix": "/login",
                "methods": ["POST"],
                "limit": {**bucket(5, 5, "1m"), "per": "ip"},
                "count_statuses": ["401", "403"],
            },
            {"path_prefix": "/healthz", "limit": "unlimited"},
            {"path_prefix": "/beta", "mode": "shadow"},
        ],
    }
    config_path = write_config(tmp_path / "gateway.yaml", config)
    log_path = tmp_path / "gateway.log"
    up = "upstream http://127.0.0.1:8000"
    default = 'limits.default "default" q=20;w=2 (10 per 1s) (or the client\'s own: 1 override)'
    with log_path.open("wb") as log:
        async with running(config_path, log) as process:
            await wait_healthy(http, f"http://127.0.0.1:{admin_port}", process)
            await poll(lambda: "route default" in log_path.read_text(), "no route lines",
                       attempts=POLL_ATTEMPTS)  # fmt: skip
            started = logged(log_path)
            routes = started[started.index(f"{config_path}: 3 routes (the first match wins), "
                                           "then the default route"):]  # fmt: skip
            assert routes == [
                f"{config_path}: 3 routes (the first match wins), then the default route",
                'route /login [POST]: limit "/login" q=5;w=60 (5 per 1m, per ip); '
                f"mode enforce; counts 401, 403 only; {up}",
                f"route /healthz: unlimited; mode enforce; {up}",
                f"route /beta: {default}; mode shadow (never denies: watch "
                f"decision=shadow_denied); {up}",
                f"route default (no route matched): {default}; mode enforce; {up}",
            ]

            config["routes"] = [{"path_prefix": "/api", "limit": [bucket(7, 7, "1s"),
                                 {**bucket(100, 100, "1h"), "name": "hourly"}]}]  # fmt: skip
            write_config(config_path, config)
            process.send_signal(signal.SIGHUP)
            await poll(lambda: len(logged(log_path)) > len(started) + 2, "no reload lines",
                       attempts=POLL_ATTEMPTS)  # fmt: skip
            await poll(lambda: logged(log_path)[-1].startswith("route default"),
                       "reload lines incomplete", attempts=POLL_ATTEMPTS)  # fmt: skip
            reloaded = logged(log_path)[len(started) :]
    assert reloaded == [
        f"config reloaded from {config_path}",
        f"{config_path}: 1 route (the first match wins), then the default route",
        'route /api: limit "/api" q=7;w=1 (7 per 1s), "hourly" q=100;w=3600 (100 per 1h); '
        f"mode enforce; {up}",
        f"route default (no route matched): {default}; mode enforce; {up}",
    ]


async def test_log_level_after_the_command_takes_effect(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    admin_port = free_port()
    config = {**VALID_CONFIG, "listen": f"127.0.0.1:{free_port()}",
              "admin": f"127.0.0.1:{admin_port}"}  # fmt: skip
    config_path = write_config(tmp_path / "gateway.yaml", config)
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        async with running(config_path, log, "--log-level", "warning") as process:
            await wait_healthy(http, f"http://127.0.0.1:{admin_port}", process)
        assert process.returncode == 0
    assert " INFO " not in log_path.read_text()


async def test_a_long_period_refills_a_new_client_sooner_as_the_readme_shows(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """README, "The refill clock": periods count from the process's start, not
    from a client's first request. Two clients who drain an hourly bucket
    2 s apart are told to wait until the same instant (Retry-After: the true
    wait), and that instant is less than an hour after either began."""
    proxy_port, admin_port = free_port(), free_port()
    config = {
        **VALID_CONFIG,
        "listen": f"127.0.0.1:{proxy_port}",
        "admin": f"127.0.0.1:{admin_port}",
        "clients": {"identify_by": "header", "header": "X-API-Key"},
        "limits": {"default": bucket(2, 2, "1h")},
        "routes": [],
    }
    config_path = write_config(tmp_path / "gateway.yaml", config)
    proxy = f"http://127.0.0.1:{proxy_port}/x"
    loop = asyncio.get_running_loop()

    async def drain(key: str) -> int:
        """Retry-After of the first 429 for the client ``key``."""
        for _ in range(3):
            async with http.get(proxy, headers={"X-API-Key": key}) as response:
                await response.read()
                if response.status == 429:
                    return int(response.headers["Retry-After"])
        raise AssertionError("never denied")

    with (tmp_path / "gateway.log").open("wb") as log:
        spawned = loop.time()
        async with running(config_path, log) as process:
            await wait_healthy(http, f"http://127.0.0.1:{admin_port}", process)
            first = await drain("key-a")
            first_at = loop.time()
            await asyncio.sleep(2.2)
            second = await drain("key-b")
    # The first client's wait: an hour from the process's start, not its own.
    assert 3600 - (first_at - spawned) - 1 <= first <= 3600
    # The second, 2.2 s later, refills at the same instant: a shorter wait.
    assert second <= first - 2


def test_readme_first_screen_tells_the_two_commands_the_config_and_what_check_prints(
    tmp_path: Path,
) -> None:
    repo = Path(gateway.__file__).parents[1]
    readme = (repo / "README.md").read_text()
    first_screen = readme[: readme.index("\n## ")]
    # It opens with the two set-up commands (the demo, the whole suite).
    commands = first_screen.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[0] for line in commands] == ["./scripts/demo", "./scripts/test"]
    for text in ("gateway check", "gateway run", "./gateway.yaml",
                 "/etc/ratelimit-gateway/gateway.yaml", "--config PATH"):  # fmt: skip
        assert text in first_screen, text
    # What check prints, as check prints it.
    result = gateway_in(repo, "check", "config/gateway.yaml")
    assert result.returncode == 0, result.stderr
    assert f"$ gateway check config/gateway.yaml\n{result.stdout}" in first_screen
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'upstream:\n  url: http://127.0.0.1:8000\nlimits:\n  default: 10/s\nlisen: ":8080"\n'
    )
    result = gateway_in(tmp_path, "check", "bad.yaml")
    assert result.returncode == 2
    shown = first_screen.split("$ gateway check bad.yaml\n", 1)[1].split("```", 1)[0]
    for printed, readme_line in zip(
        result.stderr.splitlines(), shown.splitlines(), strict=True
    ):
        assert printed.startswith(readme_line.removesuffix("..."))
