"""⟳ Active health checks: one task per upstream, probing every server.

Every ``health_check.interval`` the task sends ``GET path`` to each server of
its upstream at once, on a connection of its own (``Connection: close``), and
reads the status line: 2xx or 3xx within ``health_check.timeout`` (connect
included) passes, as nginx Plus's ``health_check`` judges by default;
anything else fails. Rounds do not overlap: the next starts ``interval``
after the last began, or when it ended if it took longer.

A probe goes from the gateway straight to the server, never through the
proxy listener: it takes no client's tokens and is not in the access log or
``gateway_requests_total``. With ``workers: N`` each worker probes for
itself (N probes per interval per server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from gateway.balancer import ServerState
from gateway.config.model import HealthCheckConfig

__all__ = ["HealthCheck", "probe"]

log = logging.getLogger("gateway.health_check")

# The status line, at most: a server answering with more is not healthy.
_MAX_STATUS_LINE_BYTES = 8192


async def probe(url: str, path: str, timeout_seconds: float) -> str | None:
    """GET ``path`` from the server at ``url``: None when it answered 2xx or
    3xx within ``timeout_seconds``, else why not."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = f"{parts.path.rstrip('/')}{path}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "User-Agent: ratelimit-gateway-health-check\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls or None, limit=_MAX_STATUS_LINE_BYTES
            )
            writer.write(request)
            line = await reader.readline()
    except TimeoutError:
        return f"no answer within {timeout_seconds:g}s"
    except (OSError, ValueError) as exc:  # ValueError: a status line past the limit
        return f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            # Not awaiting the close: a TLS peer that never acknowledges it
            # must not hold the round past its timeout.
            writer.close()
    fields = line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return f"not an HTTP answer: {line[:80]!r}"
    status = int(fields[1])
    if 200 <= status < 400:
        return None
    return f"status {status}"


class HealthCheck:
    """The probing task of one upstream. ``report(server, ok, detail)``
    takes each verdict (upstream.py passes it to the balancer)."""

    def __init__(
        self,
        upstream: str,
        config: HealthCheckConfig,
        servers: Sequence[ServerState],
        report: Callable[[ServerState, bool, str], None],
    ) -> None:
        self.upstream = upstream
        self.config = config
        self.servers = tuple(servers)
        self._report = report
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"health-check-{self.upstream}"
        )

    async def stop(self) -> None:
        """Cancel the task: a probe in flight is abandoned (its connection
        closed), nothing else is lost."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def probe_all(self) -> None:
        """One round: every server probed at once, each verdict reported."""
        config = self.config
        verdicts = await asyncio.gather(
            *(probe(s.url, config.path, config.timeout_seconds) for s in self.servers)
        )
        for server, problem in zip(self.servers, verdicts, strict=True):
            self._report(server, problem is None, problem or "")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval_seconds
        while True:
            began = loop.time()
            try:
                await self.probe_all()
            except Exception:  # a bug, not a server's failure: keep probing
                log.exception("upstream %s: a health check round failed", self.upstream)
            await asyncio.sleep(max(0.0, began + interval - loop.time()))
