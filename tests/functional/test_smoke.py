from __future__ import annotations

import aiohttp

from tests.conftest import StartGateway


async def test_proxies_and_denies(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        limits={"default": {"refill_period": "1h", "refill_tokens": 1, "max_tokens": 3}}
    )
    statuses = []
    for _ in range(5):
        async with http.get(gw.url + "/a?b=1") as response:
            await response.read()
            statuses.append(response.status)
    assert statuses == [200, 200, 200, 429, 429]
