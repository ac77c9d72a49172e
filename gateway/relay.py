"""④ The relay: an upstream's answer to the client, one way for both paths.

The client's side is a ``Downstream`` (front.py's ``FrontConnection``, or
connection.py's ``AiohttpDownstream`` over a connection aiohttp's server
holds); the upstream's side is the head it sent (raw header bytes) and its
body, either all here already (``relay_whole``: one write) or still arriving
(``relay_stream``, read through ``next_chunk``). Response fields are filtered
in one place (``raw_response.response_head``), so the plain path and aiohttp's
relay the same bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from gateway.core import Ours, Outcome, RequestHead
from gateway.errors import UpstreamError
from gateway.raw_response import NO_BODY_STATUSES, response_head
from gateway.upstream_pool import UpstreamConnection, UpstreamPool

__all__ = ["Downstream", "relay_pooled", "relay_stream", "relay_whole", "serialise_whole"]


class Downstream(Protocol):
    """The client's connection, as the relay writes to it."""

    def write(self, data: bytes) -> None:
        """Queue bytes; raises ConnectionError once the client is gone."""
        ...

    async def drain(self) -> None:
        """Wait while the client reads slower than we write."""
        ...

    def abort(self) -> None:
        """Cut the connection: the response cannot be completed."""
        ...


def serialise_whole(
    upstream: UpstreamConnection, ours: Ours, head: RequestHead
) -> tuple[bytes, int]:
    """A complete upstream answer, head and body, as one piece to write, and
    the body length in it (none for 204/304)."""
    status = upstream.status
    body = upstream.take_buffered()
    no_body = status in NO_BODY_STATUSES
    data = response_head(
        status, upstream.raw_reason, upstream.raw_headers, ours.fields,
        replaced=ours.replaced, content_length=None if no_body else len(body),
        chunked=False, keep_alive=head.keep_alive, http10=head.http10,
    )  # fmt: skip
    if no_body:
        return data, 0
    return data + body, len(body)


def relay_whole(
    upstream: UpstreamConnection,
    down: Downstream,
    ours: Ours,
    head: RequestHead,
    outcome: Outcome,
) -> bool:
    """Write a complete upstream answer in one write. True when the client
    connection may carry the next request."""
    outcome.status = upstream.status
    data, sent = serialise_whole(upstream, ours, head)
    try:
        down.write(data)
    except ConnectionError:
        outcome.client_gone = True
        return False
    outcome.response_started = True
    outcome.bytes_out = sent
    return True


async def relay_stream(
    status: int,
    reason: bytes,
    raw_headers: Sequence[tuple[bytes, bytes]],
    next_chunk: Callable[[], Awaitable[bytes]],
    down: Downstream,
    ours: Ours,
    head: RequestHead,
    outcome: Outcome,
) -> bool:
    """Relay an answer whose body is still arriving (``next_chunk``: b"" at
    the end, UpstreamError on a failure): with the upstream's Content-Length,
    else chunked, else (an HTTP/1.0 client) delimited by closing the
    connection. A HEAD, 204 or 304 answer has no body. True when the client
    connection may carry the next request."""
    outcome.status = status
    content_length = None
    framed = False
    for name, value in raw_headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            framed, content_length = True, None
        elif lower == b"content-length" and not framed:
            content_length = int(value)
    no_body = head.method == "HEAD" or status in NO_BODY_STATUSES
    if status in NO_BODY_STATUSES:
        content_length = None
    chunked = content_length is None and not head.http10 and not no_body
    keep_alive = head.keep_alive and (content_length is not None or chunked or no_body)
    try:
        down.write(
            response_head(
                status, reason, raw_headers, ours.fields,
                replaced=ours.replaced, content_length=content_length, chunked=chunked,
                keep_alive=keep_alive, http10=head.http10,
            )
        )  # fmt: skip
        outcome.response_started = True
        if no_body:
            return keep_alive
        while chunk := await next_chunk():
            if chunked:
                down.write(b"%x\r\n" % len(chunk))
                down.write(chunk)
                down.write(b"\r\n")
            else:
                down.write(chunk)
            outcome.bytes_out += len(chunk)
            await down.drain()
        if chunked:
            down.write(b"0\r\n\r\n")
    except ConnectionError:
        outcome.client_gone = True
        return False
    except UpstreamError as exc:
        # The head is gone already: cut the connection so the client sees a
        # truncated response.
        outcome.error = exc
        down.abort()
        return False
    return keep_alive


async def relay_pooled(
    pool: UpstreamPool,
    upstream: UpstreamConnection,
    down: Downstream,
    ours: Ours,
    head: RequestHead,
    outcome: Outcome,
) -> bool:
    """Relay the answer on a plain-pool connection whose head arrived, then
    give the connection back to ``pool``. True when the client connection
    may carry the next request."""
    try:
        if upstream.complete:
            return relay_whole(upstream, down, ours, head, outcome)
        return await relay_stream(
            upstream.status, upstream.raw_reason, upstream.raw_headers, upstream.next_chunk,
            down, ours, head, outcome,
        )  # fmt: skip
    finally:
        pool.release(upstream)
