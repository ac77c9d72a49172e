"""``pip install .`` as the Dockerfile runs it: a fresh virtualenv, the
project's sources alone, an isolated build. The wheel it builds carries the
mypyc-compiled request path, and the gateway it installs serves requests
with it. Run in scripts/test's compiled leg only (it takes about two minutes,
and the pure leg's environment variable would make the build pure)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers import (
    CLI_TIMEOUT_SECONDS,
    base_url,
    free_port,
    limits,
    wait_healthy,
    write_config,
)
from tests.upstream_app import HITS

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.environ.get("GATEWAY_NO_EXTENSIONS", "") not in ("", "0"),
        reason="the pure leg: the build would be pure on request",
    ),
]


def _sources(destination: Path) -> Path:
    """What the Dockerfile copies: pyproject.toml, setup.py, README.md and
    gateway/'s tracked files; no in-place build, venv or cache."""
    listed = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "setup.py", "README.md", "gateway"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return destination


def _run(*command: str | Path, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


async def test_pip_install_builds_and_serves_the_compiled_request_path(
    tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    source = _sources(tmp_path / "src")
    assert (source / "setup.py").exists()
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    loop = asyncio.get_running_loop()

    def install() -> str:
        _run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
        return _run(venv / "bin" / "pip", "install", "-v", source, cwd=tmp_path, env=env)

    output = await loop.run_in_executor(None, install)
    assert "installing pure Python" not in output, output

    # Outside the repository, so nothing but the installed package is found.
    installed = _run(
        venv / "bin" / "python",
        "-c",
        "import gateway.core, gateway.front; print(gateway.core.__file__);"
        "print(gateway.front.__file__)",
        cwd=tmp_path,
        env=env,
    ).split()
    assert all(path.startswith(str(venv)) and path.endswith(".so") for path in installed), (
        installed
    )
    version = _run(venv / "bin" / "gateway", "--version", cwd=tmp_path, env=env)
    assert "request path compiled (mypyc)" in version

    proxy_port, admin_port = free_port(), free_port()
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": f"127.0.0.1:{proxy_port}",
            "admin": f"127.0.0.1:{admin_port}",
            "upstream": {"url": base_url(upstream)},
            "limits": limits(2),
            "access_log": {"path": "off"},
        },
    )
    process = await asyncio.create_subprocess_exec(
        venv / "bin" / "gateway",
        "run",
        "--config",
        str(config),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_healthy(http, f"http://127.0.0.1:{admin_port}", process)
        statuses = []
        for i in range(3):
            async with http.get(f"http://127.0.0.1:{proxy_port}/wheel/{i}") as response:
                await response.read()
                statuses.append(response.status)
        assert statuses == [200, 200, 429]
        assert upstream.app[HITS] == ["/wheel/0", "/wheel/1"]
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert b"request path compiled (mypyc)" in stderr
    assert b"Traceback" not in stderr
