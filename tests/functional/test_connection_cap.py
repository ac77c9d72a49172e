"""``server.max_connections`` and the descriptor limit (issue 13, item 6).

At the cap the listener stops accepting: a new client waits in the listen
backlog and is served as soon as a connection closes, instead of being
accepted and dropped when descriptors run out. At start the soft
descriptor limit is raised to the hard one, and a cap the limit cannot
honour is warned about."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAND_OVER, StartGateway
from tests.helpers import build_request, free_port, raw_connection, read_response, write_config

GUARD_SECONDS = 10
# How long a capped client is watched to get no answer: absence cannot be
# awaited as an event, so this is the one bounded wait.
NO_ANSWER_SECONDS = 0.3


@pytest.mark.parametrize("closing", ["plain", "handed_over"])
async def test_at_the_cap_a_new_client_waits_until_a_connection_closes(
    start_gateway: StartGateway, closing: str
) -> None:
    gw = await start_gateway(server={"max_connections": 2})
    async with contextlib.AsyncExitStack() as stack:
        held = {}
        for name, lead in (("plain", b""), ("handed_over", HAND_OVER)):
            reader, writer = await stack.enter_async_context(raw_connection(gw))
            writer.write(lead + build_request("GET", f"/{name}"))
            response = await asyncio.wait_for(read_response(reader), GUARD_SECONDS)
            assert response.status == 200
            held[name] = writer
        assert gw.metric("gateway_open_connections") == 2

        reader, writer = await stack.enter_async_context(raw_connection(gw))
        writer.write(build_request("GET", "/third"))
        waiting = asyncio.ensure_future(read_response(reader))
        done, _ = await asyncio.wait({waiting}, timeout=NO_ANSWER_SECONDS)
        assert not done, "a third connection was served past max_connections"
        assert gw.metric("gateway_connections_capped_total") >= 1

        held[closing].close()
        response = await asyncio.wait_for(waiting, GUARD_SECONDS)
        assert response.status == 200
        assert gw.metric("gateway_open_connections") == 2


async def test_connections_that_close_give_their_place_back(
    start_gateway: StartGateway,
) -> None:
    """Many short connections in a row, with a cap of one: each is counted
    out when it closes, on either path, or the listener would stall."""
    gw = await start_gateway(server={"max_connections": 1})
    for index in range(20):
        lead = HAND_OVER if index % 2 else b""
        async with raw_connection(gw) as (reader, writer):
            writer.write(lead + build_request("GET", f"/{index}"))
            response = await asyncio.wait_for(read_response(reader), GUARD_SECONDS)
            assert response.status == 200


def _limited(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.parametrize(("max_connections", "warned"), [(0, False), (100_000, True)])
def test_the_soft_descriptor_limit_is_raised_and_an_impossible_cap_warned(
    tmp_path: Path, max_connections: int, warned: bool
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 4096)
    config_path = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": f"127.0.0.1:{free_port()}",
            "admin": f"127.0.0.1:{free_port()}",
            "upstream": {"url": "http://127.0.0.1:9"},
            "server": {"max_connections": max_connections},
            "access_log": {"path": "off"},
        },
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: _limited(256, hard),
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    try:
        for line in process.stdout:  # up to the line saying it serves
            lines.append(line.decode(errors="replace"))
            if "proxy on" in lines[-1]:
                break
        assert process.poll() is None, "".join(lines)
        assert _soft_limit(process.pid) == hard
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=GUARD_SECONDS)
    text = "".join(lines) + rest.decode(errors="replace")
    assert ("cannot be honoured" in text) is warned, text
    assert "Traceback" not in text
