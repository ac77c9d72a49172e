"""The bundled demo upstream and ``gateway demo``."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Final

from aiohttp import WSMsgType, web

from gateway.config import GatewayConfig, parse_config
from gateway.server import Server, bound_port

__all__ = ["DEMO_CONFIG", "build_demo_upstream", "demo_config", "run_demo"]

DEMO_CONFIG: Final = """\
listen: "{listen}"
admin: "{admin}"
upstream:
  url: "{upstream}"
clients:
  # The API key when sent (so the premium override below can be tried),
  # else the peer address as "ip:<address>".
  identify_by: header
  header: X-API-Key
  allow: ["key:demo-partner"]   # no limit applies
  deny: ["key:demo-banned"]     # 403 at once
limits:
  default: {{refill_period: 1s, refill_tokens: 2, max_tokens: 5}}
  overrides:
    - {{client: "key-premium-1", refill_period: 1s, refill_tokens: 50, max_tokens: 100}}
routes:
  - path_prefix: /login
    methods: [POST]
    # Per address, whatever key is sent; only failed logins (401) cost a
    # token, so users behind one NAT do not lock each other out.
    limit: {{refill_period: 1m, refill_tokens: 3, max_tokens: 3, per: ip}}
    count_statuses: ["401"]
  - path_prefix: /api
    limit:
      - {{refill_period: 1s, refill_tokens: 2, max_tokens: 5}}
      - {{refill_period: 1m, refill_tokens: 30, max_tokens: 30, name: per-minute}}
      - {{refill_period: 1s, refill_tokens: 20, max_tokens: 20, per: route, name: backend}}
    queue: {{max_wait: 1s, max_queued: 100}}   # a burst waits for its token
  - path_prefix: /healthz
    limit: unlimited
  - path_prefix: /beta
    mode: shadow
access_log:
  path: "-"
"""


def build_demo_upstream() -> web.Application:
    """A small backend to put the gateway in front of."""

    async def hello(request: web.Request) -> web.Response:
        body = {
            "hello": "from the demo upstream",
            "path": request.path_qs,
            "method": request.method,
            "x_forwarded_for": request.headers.get("X-Forwarded-For"),
            "x_request_id": request.headers.get("X-Request-ID"),
        }
        return web.json_response(body)

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(5):
            await response.write(f"chunk {i}\n".encode())
            await asyncio.sleep(0.2)
        await response.write_eof()
        return response

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("password") == "secret":
            return web.json_response({"login": "ok"})
        return web.json_response({"login": "failed"}, status=401)

    async def echo_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(json.dumps({"echo": message.data}))
        return ws

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", echo_ws)
    app.router.add_post("/login", login)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def demo_config(upstream_url: str, listen: str, admin: str) -> GatewayConfig:
    """The demo's config, in front of ``upstream_url``."""
    text = DEMO_CONFIG.format(listen=listen, admin=admin, upstream=upstream_url)
    return parse_config(text, "<demo>")


async def run_demo(listen: str, admin: str) -> None:
    """Start the bundled upstream and a gateway in front of it; print what to
    try; serve until stopped."""
    runner = web.AppRunner(build_demo_upstream(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_url = f"http://127.0.0.1:{bound_port(site)}"
    server = Server(demo_config(upstream_url, listen, admin))
    try:
        await server.start()
        proxy = f"http://127.0.0.1:{server.proxy_port}"
        admin_url = f"http://127.0.0.1:{server.admin_port}"
        print(
            f"ratelimit-gateway demo\n"
            f"  demo upstream : {upstream_url}\n"
            f"  gateway       : {proxy}\n"
            f"  admin         : {admin_url}\n"
            f"  dashboard     : {admin_url}/   (open it in a browser)\n\n"
            f"Try:\n"
            f"  curl -i {proxy}/hello            # 5 at once, then 2 per second; then 429\n"
            f"  curl -i -H 'X-API-Key: key-premium-1' {proxy}/hello   # 100 at once\n"
            f"  curl -i {proxy}/api/items        # 5 at once, 2/s, 30/min; bursts wait 1s\n"
            f"  curl -i -d password=wrong {proxy}/login    # failed logins: 3 per minute\n"
            f"  curl -i -d password=secret {proxy}/login   # a good login costs nothing\n"
            f"  curl -i -H 'X-API-Key: demo-partner' {proxy}/hello   # allow list: no limit\n"
            f"  curl -i -H 'X-API-Key: demo-banned' {proxy}/hello    # deny list: 403\n"
            f"  curl -i {proxy}/beta             # shadow mode: never denied, counted\n"
            f"  curl {admin_url}/metrics | grep gateway_requests_total\n"
            f"  curl {admin_url}/admin/clients/ip:127.0.0.1\n"
            f"  curl {admin_url}/admin/clients   # who was denied most, last 5 minutes\n\n"
            f"Ctrl-C to stop. Access log follows (JSON lines):",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await server.stop()
        await runner.cleanup()
