"""The installed ``gateway`` command, end to end, as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.helpers import (
    CLI_TIMEOUT_SECONDS,
    GATEWAY,
    PROBLEM_LINE,
    base_url,
    free_port,
    gateway_run,
    limits,
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
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(CLI_TIMEOUT_SECONDS):
            await process.communicate()
    assert process.returncode == 0
