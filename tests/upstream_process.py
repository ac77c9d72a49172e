"""A named backend in a process of its own, for tests that kill a server and
start it again on the same port (tests/functional/test_upstream_servers.py).

    python -m tests.upstream_process PORT NAME

Every request is answered 200 with ``{"server": NAME, "method", "path",
"body_sha256"}``; ``/health`` answers ``ok``. Prints ``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from aiohttp import web


def build_app(name: str) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "server": name,
                "method": request.method,
                "path": request.raw_path,
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(port: int, name: str) -> None:
    runner = web.AppRunner(build_app(name), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
