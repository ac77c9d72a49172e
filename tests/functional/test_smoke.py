from __future__ import annotations

import aiohttp

from tests.conftest import StartGateway
from tests.helpers import limits, sequential


async def test_proxies_and_denies(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(limits=limits(3))
    statuses = await sequential(http, gw.url + "/a?b=1", 5)
    assert statuses == [200, 200, 200, 429, 429]
