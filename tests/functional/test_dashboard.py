"""The dashboard page in a real browser: Debian's Chromium, headless, driven
by Playwright, against a real gateway serving live traffic on 127.0.0.1.

Each test saves screenshots under its tmp dir (``dashboard-*.png``). The page
polls every 0.5 s here (``?refresh=0.5``); every wait is Playwright's bounded
``expect``, never a sleep.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from playwright.async_api import (
    ConsoleMessage,
    Error,
    Page,
    Response,
    async_playwright,
    expect,
)

from tests.conftest import RedisServer, RunningGateway, StartGateway
from tests.helpers import bucket, free_port, limits

EXPECT_TIMEOUT_MS = 10_000  # a bound so a broken page fails clearly, not a timing target
API_KEY = {"identify_by": "header"}
NO_RATE = re.compile("^(0|\u2013)$")  # a rate of zero, or none yet (an en dash)
# Answers the page expects besides 200: a lookup of an untracked client, and
# a storage outage (a lookup, /readyz).
EXPECTED_STATUSES = re.compile(r"^(404|503) /admin/clients/.+$|^503 /readyz$")


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A page of headless Chromium (the system's, as Debian ships it). At
    teardown: no script error, and no answer >= 400 the page did not expect."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed; scripts/setup --test installs it")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # Chromium logs every answer >= 400; on_response judges those.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"console: {message.text}")

    def on_response(response: Response) -> None:
        answer = f"{response.status} {urlsplit(response.url).path}"
        if response.status >= 400 and not EXPECTED_STATUSES.match(answer):
            problems.append(f"response: {answer}")

    def on_page_error(error: Error) -> None:
        problems.append(f"script: {error}")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1100})
            page.on("console", on_console)
            page.on("pageerror", on_page_error)
            page.on("response", on_response)
            yield page
        finally:
            await browser.close()
    assert problems == []


async def send(gw: RunningGateway, key: str, path: str, count: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(gw.url + path, headers={"X-API-Key": key}) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


def route_cell(page: Page, route: str, field: str) -> Any:
    return page.locator(f'#routes tr[data-route="{route}"] [data-field="{field}"]')


def denied_cell(page: Page, client: str) -> Any:
    return page.locator(f'#clients tr[data-client="{client}"] [data-field="denied"]')


async def open_dashboard(page: Page, gw: RunningGateway) -> None:
    await page.goto(gw.admin_url + "/?refresh=0.5")
    await expect(page.locator("h1")).to_have_text("ratelimit-gateway")


async def test_the_page_follows_live_traffic_and_finds_a_client(
    start_gateway: StartGateway, page: Page, tmp_path: Path
) -> None:
    gw = await start_gateway(
        limits=limits(50),
        clients=API_KEY,
        routes=[
            {"path_prefix": "/api", "limit": bucket(3)},
            {"path_prefix": "/login", "limit": bucket(2)},
            {"path_prefix": "/beta", "limit": bucket(1), "mode": "shadow"},
        ],
    )
    assert await send(gw, "key-alpha", "/api/items", 8) == [200] * 3 + [429] * 5
    assert await send(gw, "key-beta", "/login", 3) == [200] * 2 + [429]
    await open_dashboard(page, gw)

    # A route and the top denied client, from that traffic.
    await expect(route_cell(page, "/api", "total")).to_have_text("8")
    await expect(route_cell(page, "/login", "total")).to_have_text("3")
    await expect(page.locator("#clients tbody tr").first).to_have_attribute(
        "data-client", "key-alpha"
    )
    await expect(denied_cell(page, "key-alpha")).to_have_text("5")
    await expect(denied_cell(page, "key-beta")).to_have_text("1")
    await expect(route_cell(page, "/api", "top-client")).to_contain_text("key-alpha")
    await expect(page.locator("#ready")).to_have_text("ready")
    await expect(page.locator("#checks")).to_contain_text("storage reachable")
    await page.screenshot(path=tmp_path / "dashboard-first.png", full_page=True)

    # More traffic: the numbers follow, and a new client takes the top.
    assert await send(gw, "key-alpha", "/api/items", 6) == [429] * 6
    await expect(route_cell(page, "/api", "total")).to_have_text("14")
    await expect(denied_cell(page, "key-alpha")).to_have_text("11")
    await expect(route_cell(page, "/api", "rps")).not_to_have_text(NO_RATE)
    assert await send(gw, "key-gamma", "/login", 20) == [200] * 2 + [429] * 18
    await expect(page.locator("#clients tbody tr").first).to_have_attribute(
        "data-client", "key-gamma"
    )
    await expect(denied_cell(page, "key-gamma")).to_have_text("18")
    await expect(route_cell(page, "/login", "top-client")).to_contain_text("key-gamma")
    # Shadow mode's would-be denials show without a 429.
    assert await send(gw, "key-delta", "/beta", 4) == [200] * 4
    await expect(denied_cell(page, "key-delta")).to_have_text("3")
    await expect(page.locator("#card-shadow")).not_to_have_text(NO_RATE)

    # The lookup box: a tracked client, its buckets and tokens.
    await page.fill("#lookup-input", "key-alpha")
    await page.click("#lookup button")
    result = page.locator("#lookup-result")
    await expect(result.locator('[data-field="lookup-status"]')).to_contain_text(
        "tracked denied 11 times"
    )
    await expect(result.locator('tr[data-bucket="/api /api"]')).to_contain_text("0 / 3")
    await expect(result.locator('tr[data-bucket="default default"]')).to_contain_text("50 / 50")
    await page.screenshot(path=tmp_path / "dashboard-lookup.png", full_page=True)
    # A typo is not mistaken for a client with full buckets.
    await page.fill("#lookup-input", "key-alpah")
    await page.press("#lookup-input", "Enter")
    await expect(result.locator('[data-field="lookup-status"]')).to_contain_text("not tracked")
    # A name in the top list looks itself up.
    await page.locator('#clients tr[data-client="key-gamma"] button').click()
    await expect(result.locator('[data-field="lookup-client"]')).to_have_text("key-gamma")
    await expect(result.locator('tr[data-bucket="/login /login"]')).to_contain_text("0 / 2")
    await page.screenshot(path=tmp_path / "dashboard-after.png", full_page=True)


async def test_fifty_routes_stay_usable(
    start_gateway: StartGateway, page: Page, tmp_path: Path
) -> None:
    routes = [{"path_prefix": f"/svc{i}/", "limit": bucket(2)} for i in range(50)]
    gw = await start_gateway(limits=limits(50), clients=API_KEY, routes=routes)
    assert await send(gw, "key-busy", "/svc7/x", 4) == [200] * 2 + [429] * 2
    assert await send(gw, "key-other", "/svc42/x", 3) == [200] * 2 + [429]
    await open_dashboard(page, gw)
    rows = page.locator("#routes tbody tr")
    await expect(rows).to_have_count(51)
    # Busiest first.
    await expect(rows.nth(0)).to_have_attribute("data-route", "/svc7/")
    await expect(rows.nth(1)).to_have_attribute("data-route", "/svc42/")
    await expect(route_cell(page, "/svc42/", "top-client")).to_contain_text("key-other")
    await page.fill("#route-filter", "/svc4")
    await expect(page.locator("#routes tbody tr:visible")).to_have_count(
        11
    )  # /svc4/, /svc40/ to /svc49/
    await expect(page.locator("#routes-count")).to_contain_text("11 shown")
    await page.screenshot(path=tmp_path / "dashboard-50-routes.png", full_page=True)


async def test_the_page_shows_storage_down(
    start_gateway: StartGateway, page: Page, redis_server: RedisServer, tmp_path: Path
) -> None:
    gw = await start_gateway(
        limits=limits(5),
        clients=API_KEY,
        storage={
            "backend": "redis",
            "redis_url": redis_server.url,
            "on_error": "deny",
            "timeout": "200ms",
        },
    )
    assert await send(gw, "key-a", "/x", 1) == [200]
    await open_dashboard(page, gw)
    await expect(page.locator("#ready")).to_have_text("ready")
    redis_server.stop()
    assert await send(gw, "key-a", "/x", 1) == [429]  # on_error: deny
    await expect(page.locator("#ready")).to_have_text("not ready")
    await expect(page.locator("#checks .bad")).to_have_text("storage reachable")
    await page.fill("#lookup-input", "key-a")
    await page.click("#lookup button")
    await expect(page.locator("#lookup-result")).to_contain_text("storage unreachable")
    await page.screenshot(path=tmp_path / "dashboard-storage-down.png", full_page=True)


async def test_the_page_shows_upstream_errors(
    start_gateway: StartGateway, page: Page, tmp_path: Path
) -> None:
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{free_port()}", clients=API_KEY)
    await open_dashboard(page, gw)
    await expect(page.locator("#card-upstream-sub")).to_have_text("none since start")
    assert await send(gw, "key-a", "/x", 3) == [502] * 3  # nothing listens there
    await expect(page.locator("#card-upstream-sub")).to_have_text(
        "since start: 3 connect, 0 timeout, 0 reset, 0 invalid, 0 busy"
    )
    await expect(page.locator("#card-upstream")).not_to_have_text(NO_RATE)
    await page.screenshot(path=tmp_path / "dashboard-upstream-down.png", full_page=True)
