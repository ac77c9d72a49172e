"""The event loop every process runs on: uvloop where it is installed.

Its own module so the CLI and the worker processes both use it without
importing each other."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_loop"]


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on uvloop (asyncio's loop without it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
        return
    uvloop.run(main)
