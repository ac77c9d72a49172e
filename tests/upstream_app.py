"""The real backend the tests put the gateway in front of."""

from __future__ import annotations

import asyncio
import gzip
import hashlib

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

HITS = web.AppKey("hits", list)


class Arrivals:
    """Counts requests whose head reached the upstream, from when it was made,
    and lets a test await a count instead of sleeping (``tests.helpers.arrivals``)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def arrived(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10), self._changed:  # a bound on a hang, not a timing
            await self._changed.wait_for(lambda: self.count >= count)


ARRIVALS = web.AppKey("arrivals", list[Arrivals])


@web.middleware
async def _count_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
    for arrivals in request.app[ARRIVALS]:
        await arrivals.arrived()
    return await handler(request)


def build_upstream_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        request.app[HITS].append(request.raw_path)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    async def status(request: web.Request) -> web.Response:
        request.app[HITS].append(request.raw_path)
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"v1"'})
        return web.Response(status=code, text=f"status {code}")

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="cookies")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("n", "5"))
        delay = float(request.query.get("delay", "0.01"))
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(count):
            await response.write(f"part {i}\n".encode())
            await asyncio.sleep(delay)
        await response.write_eof()
        return response

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        chunk = b"x" * 65536
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":  # StreamResponse does not suppress writes
            return response
        sent = 0
        try:
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
        except ConnectionResetError:
            # Its client (the gateway) hung up mid-download: normal for a
            # download, and not this backend's error to log (tests assert
            # that nothing in the process logs a traceback).
            pass
        return response

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            total += len(piece)
        return web.json_response({"received": total, "sha256": digest.hexdigest()})

    async def slow(request: web.Request) -> web.Response:
        request.app[HITS].append(request.raw_path)
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="slow")

    async def reset(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"y" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"hello gzip" * 10),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def hop(request: web.Request) -> web.Response:
        return web.Response(
            text="hop",
            headers={
                "Connection": "X-Private",
                "X-Private": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Kept": "yes",
            },
        )

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if message.data == "close":
                    await ws.close(code=4001, message=b"bye")
                    break
                await ws.send_str("echo:" + message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app = web.Application(middlewares=[_count_arrival])
    app[HITS] = []
    app[ARRIVALS] = []
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/download", download)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/slow", slow)
    app.router.add_get("/reset", reset)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/hop", hop)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
