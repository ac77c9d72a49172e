"""The shape the code keeps: aiohttp's private server parts in one module.

The import graph's order (no cycles, nothing reaching back up the request
path, an I/O-free core) is held by import-linter's contracts in
pyproject.toml, run by scripts/test. What import-linter cannot see, the use
of aiohttp's private attributes, is checked here, so an aiohttp upgrade
breaks connection.py and no other file."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"
# aiohttp names that are not its public API, as this project uses them.
_PRIVATE_AIOHTTP = re.compile(
    r"aiohttp\.web_protocol|aiohttp\.web_server|_ErrInfo|\._connections\b|\._messages\b"
    r"|\._current_request\b|\._request_count\b|\._eof_sent\b|site\._server\b|\._kwargs\b"
)


def test_private_aiohttp_parts_are_used_in_connection_py_alone() -> None:
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if _PRIVATE_AIOHTTP.search(path.read_text())
    )
    assert users == ["connection.py"]


def test_the_check_sees_a_private_use() -> None:
    assert _PRIVATE_AIOHTTP.search("self._server._connections.pop(self, None)")
    assert _PRIVATE_AIOHTTP.search("from aiohttp.web_protocol import RequestHandler")
