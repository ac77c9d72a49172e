"""front.FrontConnection without sockets: bytes in through ``data_received``
on a fake transport, as uvicorn's protocol tests do on a MockTransport; a
fake acceptor records hand-overs to aiohttp's handler."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

from gateway.config.model import ServerConfig
from gateway.core import RequestHead
from gateway.front import PENDING, PIPELINE_BUFFER_BYTES, FrontConnection, PlainOutcome

PEER = ("198.51.100.9", 40000)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class FakeTransport:
    """What FrontConnection calls on its transport, recorded."""

    def __init__(self, peer: tuple[str, int] | None = PEER) -> None:
        self.peer = peer
        self.written = bytearray()
        self.closing = False
        self.aborted = False
        self.reading = True
        self.pauses = 0
        self.protocol: asyncio.BaseProtocol | None = None
        self.closed = asyncio.Event()

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.written += data

    def close(self) -> None:
        self.closing = True
        self.closed.set()

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class RecordingProtocol(asyncio.Protocol):
    """Stands in for aiohttp's RequestHandler after a hand-over."""

    def __init__(self, header_deadline_at: float) -> None:
        self.header_deadline_at = header_deadline_at
        self.transport: asyncio.BaseTransport | None = None
        self.data = bytearray()
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None, "data before connection_made"
        self.data += data

    def pause_writing(self) -> None:
        self.write_paused = True


class FakeAcceptor:
    def __init__(self) -> None:
        self.connections: list[FrontConnection] = []
        self.forgotten: list[FrontConnection] = []
        self.closed = 0
        self.handlers: list[RecordingProtocol] = []

    def connection_made(self, conn: Any, transport: asyncio.Transport) -> None:
        self.connections.append(conn)

    def forget(self, conn: Any) -> None:
        self.forgotten.append(conn)

    def connection_closed(self) -> None:
        self.closed += 1

    def make_handler(self, header_deadline_at: float) -> asyncio.Protocol:
        handler = RecordingProtocol(header_deadline_at)
        self.handlers.append(handler)
        return handler


Handler = Callable[[FrontConnection, RequestHead], PlainOutcome]


class Rig:
    """One FrontConnection on a fake transport; ``heads`` are the plain
    requests its handler was given, in order."""

    def __init__(self, limits: ServerConfig, respond: Handler | None) -> None:
        self.acceptor = FakeAcceptor()
        self.transport = FakeTransport()
        self.heads: list[RequestHead] = []
        self.rejected: list[str] = []
        self.respond = respond
        self.conn = FrontConnection(self.acceptor, self._handle, limits, self.rejected.append)
        self.connected_at = asyncio.get_running_loop().time()
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def _handle(self, conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        self.heads.append(head)
        if self.respond is not None:
            return self.respond(conn, head)
        conn.write(OK)
        return True

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.conn.data_received(piece)

    @property
    def targets(self) -> list[str]:
        return [head.target for head in self.heads]

    @property
    def handler(self) -> RecordingProtocol:
        (handler,) = self.acceptor.handlers
        assert self.transport.protocol is handler
        assert handler.transport is cast(object, self.transport)
        return handler

    def close(self) -> None:
        if not self.transport.closing:
            self.transport.close()
        self.conn.connection_lost(None)


def _rig(respond: Handler | None = None, **limits: Any) -> Rig:
    return Rig(ServerConfig(**limits), respond)


def _get(target: str = "/", *fields: bytes, version: bytes = b"1.1") -> bytes:
    lines = [b"GET " + target.encode() + b" HTTP/" + version, b"Host: gw.example", *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- plain requests --


async def test_a_plain_get_is_parsed_into_a_request_head() -> None:
    rig = _rig()
    rig.feed(_get("/a/b?c=1", b"X-API-Key: key-1", b"Accept: */*", b"accept: text/plain"))
    (head,) = rig.heads
    assert head.method == "GET"
    assert head.target == "/a/b?c=1"
    assert head.headers["host"] == "gw.example"
    assert head.headers["X-Api-Key"] == "key-1"
    assert head.headers.getall("Accept") == ["*/*", "text/plain"]
    assert head.peer == PEER[0]
    assert head.keep_alive is True
    assert head.http10 is False
    assert head.content_length is None
    assert rig.transport.written == OK
    assert not rig.transport.closing  # kept alive for the next request
    assert rig.acceptor.connections == [rig.conn]
    assert rig.acceptor.handlers == []
    rig.close()


async def test_a_peer_without_an_address_is_a_dash() -> None:
    acceptor = FakeAcceptor()
    heads: list[RequestHead] = []

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        heads.append(head)
        return True

    conn = FrontConnection(acceptor, respond, ServerConfig(), print)
    conn.connection_made(FakeTransport(peer=None))  # type: ignore[arg-type]
    conn.data_received(_get("/"))
    assert [head.peer for head in heads] == ["-"]
    conn.connection_lost(None)


async def test_options_is_plain_too() -> None:
    rig = _rig()
    rig.feed(b"OPTIONS /x HTTP/1.1\r\nHost: gw.example\r\n\r\n")
    assert [(head.method, head.target) for head in rig.heads] == [("OPTIONS", "/x")]
    rig.close()


async def test_header_values_are_decoded_as_aiohttp_decodes_them() -> None:
    rig = _rig()
    rig.feed(_get("/caf%C3%A9", "X-Name: café".encode(), b"X-Raw: \xff"))
    (head,) = rig.heads
    assert head.target == "/caf%C3%A9"
    assert head.headers["X-Name"] == "café"
    assert head.headers["X-Raw"].encode("utf-8", "surrogateescape") == b"\xff"
    rig.close()


async def test_an_http10_request_without_host_is_served_and_closed() -> None:
    rig = _rig()
    rig.feed(b"GET /old HTTP/1.0\r\nAccept: */*\r\n\r\n")
    (head,) = rig.heads
    assert head.http10 is True
    assert head.keep_alive is False
    assert rig.transport.closing  # HTTP/1.0 without keep-alive: closed once answered
    assert not rig.transport.aborted


async def test_an_http10_keep_alive_request_stays_open() -> None:
    rig = _rig()
    rig.feed(_get("/", b"Connection: keep-alive", version=b"1.0"))
    (head,) = rig.heads
    assert head.http10 is True
    assert head.keep_alive is True
    assert not rig.transport.closing
    rig.close()


async def test_connection_close_closes_after_the_answer() -> None:
    rig = _rig()
    rig.feed(_get("/", b"Connection: close") + _get("/never"))
    assert rig.targets == ["/"]
    assert rig.heads[0].keep_alive is False
    assert rig.transport.closing


async def test_a_handler_saying_false_closes_the_connection() -> None:
    rig = _rig(lambda conn, head: False)
    rig.feed(_get("/a") + _get("/b"))
    assert rig.targets == ["/a"]
    assert rig.transport.closing


async def test_a_head_split_over_many_reads_is_parsed_once() -> None:
    rig = _rig()
    data = _get("/split", b"X-Long: " + b"v" * 200)
    for i in range(len(data) - 1):
        rig.feed(data[i : i + 1])
        assert rig.heads == []
    rig.feed(data[-1:])
    assert rig.targets == ["/split"]
    assert rig.heads[0].headers["X-Long"] == "v" * 200
    assert rig.acceptor.handlers == []
    rig.close()


@pytest.mark.parametrize("cut", [1, 2, 3])
async def test_a_head_terminator_split_between_reads(cut: int) -> None:
    rig = _rig()
    data = _get("/t")
    rig.feed(data[:-cut])
    assert rig.heads == []
    rig.feed(data[-cut:])
    assert rig.targets == ["/t"]
    rig.close()


async def test_pipelined_plain_requests_are_served_in_order() -> None:
    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        conn.write(head.target.encode() + b";")
        return True

    rig = _rig(respond)
    rig.feed(_get("/1") + _get("/2") + _get("/3")[:10])
    assert rig.targets == ["/1", "/2"]
    rig.feed(_get("/3")[10:] + _get("/4"))
    assert rig.targets == ["/1", "/2", "/3", "/4"]
    assert rig.transport.written == b"/1;/2;/3;/4;"
    rig.close()


async def test_a_pending_request_holds_back_the_next_one() -> None:
    pending: list[FrontConnection] = []

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        if head.target == "/slow":
            pending.append(conn)
            return PENDING
        conn.write(head.target.encode() + b";")
        return True

    rig = _rig(respond)
    rig.feed(_get("/slow") + _get("/next"))
    assert rig.targets == ["/slow"]
    rig.feed(_get("/later"))
    assert rig.targets == ["/slow"]
    (conn,) = pending
    conn.write(b"/slow;")
    conn.finish(True)
    assert rig.targets == ["/slow", "/next", "/later"]
    assert rig.transport.written == b"/slow;/next;/later;"
    rig.close()


async def test_a_coroutine_answer_runs_in_a_task_before_the_next_request() -> None:
    served = asyncio.Event()

    async def answer_later(conn: FrontConnection, head: RequestHead) -> bool:
        await asyncio.sleep(0)
        conn.write(head.target.encode() + b";")
        return True

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        if head.target == "/task":
            return answer_later(conn, head)
        conn.write(head.target.encode() + b";")
        served.set()
        return True

    rig = _rig(respond)
    rig.feed(_get("/task") + _get("/after"))
    assert rig.targets == ["/task"]
    await asyncio.wait_for(served.wait(), 5)
    assert rig.targets == ["/task", "/after"]
    assert rig.transport.written == b"/task;/after;"
    assert not rig.transport.closing
    rig.close()


async def test_a_failing_handler_aborts_the_connection() -> None:
    class Tracked:
        cancelled = 0

        def cancel(self) -> None:
            self.cancelled += 1

    tracked = Tracked()

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        conn.track(tracked)
        raise RuntimeError("a bug")

    rig = _rig(respond)
    rig.feed(_get("/boom") + _get("/never"))
    assert rig.targets == ["/boom"]
    assert rig.transport.aborted
    assert tracked.cancelled == 1


async def test_pipelined_bytes_past_the_bound_pause_reading_while_busy() -> None:
    pending: list[FrontConnection] = []

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        if head.target == "/slow":
            pending.append(conn)
            return PENDING
        return True

    rig = _rig(respond)
    rig.feed(_get("/slow"))
    one = _get("/p")
    count = PIPELINE_BUFFER_BYTES // len(one) + 1
    for _ in range(count):
        rig.feed(one)
    assert not rig.transport.reading
    assert rig.targets == ["/slow"]
    pending[0].finish(True)
    assert rig.transport.reading
    assert rig.targets == ["/slow"] + ["/p"] * count
    rig.close()


async def test_requests_wait_while_the_client_does_not_read() -> None:
    rig = _rig()
    rig.conn.pause_writing()
    assert not rig.transport.reading
    rig.feed(_get("/a"))
    assert rig.heads == []
    rig.conn.resume_writing()
    assert rig.transport.reading
    assert rig.targets == ["/a"]
    rig.close()


# -- hand-over to aiohttp --


def _post(target: str = "/upload", body: bytes = b"hello") -> bytes:
    return (
        b"POST " + target.encode() + b" HTTP/1.1\r\nHost: gw.example\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


HANDED_OVER = {
    "post": _post(),
    "head": b"HEAD / HTTP/1.1\r\nHost: gw.example\r\n\r\n",
    "delete": b"DELETE /x HTTP/1.1\r\nHost: gw.example\r\n\r\n",
    "get_with_body": _get("/", b"Content-Length: 3") + b"abc",
    "chunked_get": _get("/", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "absolute_form": b"GET http://gw.example/x HTTP/1.1\r\nHost: gw.example\r\n\r\n",
    "options_star": b"OPTIONS * HTTP/1.1\r\nHost: gw.example\r\n\r\n",
    "fragment": _get("/a#frag"),
    "bare_lf": b"GET / HTTP/1.1\nHost: gw.example\n\n",
    "bare_lf_mixed": b"GET / HTTP/1.1\r\nHost: gw.example\nX: y\r\n\r\n",
    "bare_cr": b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: gw.example\r\n",
    "second_host": _get("/", b"Host: other.example"),
    "missing_host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "expect": _get("/", b"Expect: 100-continue"),
    "upgrade": _get("/ws", b"Connection: Upgrade", b"Upgrade: websocket"),
    "leading_crlf": b"\r\n" + _get("/"),
    "invalid": b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    "long_url": _get("/" + "u" * 9000),
    "long_field": _get("/", b"X-Big: " + b"f" * 9000),
    "too_many_fields": _get("/", *(b"X-%d: v" % i for i in range(100))),
    "endless_head": b"GET / HTTP/1.1\r\nHost: gw.example\r\n" + b"X-A: b\r\n" * 6000,
}


@pytest.mark.parametrize("data", HANDED_OVER.values(), ids=HANDED_OVER.keys())
async def test_a_request_that_is_not_plain_is_handed_to_aiohttp(data: bytes) -> None:
    rig = _rig()
    rig.feed(data)
    assert rig.heads == []
    assert rig.handler.data == data
    assert rig.acceptor.forgotten == [rig.conn]
    assert rig.transport.written == b""
    assert not rig.transport.closing


async def test_a_split_head_is_handed_over_whole() -> None:
    rig = _rig()
    data = _post(body=b"x" * 100)
    rig.feed(data[:20], data[20:40])
    assert rig.acceptor.handlers == []
    rig.feed(data[40:])
    assert rig.heads == []
    assert rig.handler.data == data


async def test_a_bare_lf_split_between_reads_is_handed_over() -> None:
    rig = _rig()
    rig.feed(b"GET / HTTP/1.1\r\nHost: gw.example\n")
    assert rig.acceptor.handlers == []
    rig.feed(b"\n")
    assert rig.handler.data == b"GET / HTTP/1.1\r\nHost: gw.example\n\n"


async def test_smaller_limits_hand_over_sooner() -> None:
    rig = _rig(max_field_size=64)
    rig.feed(_get("/", b"X-Big: " + b"f" * 64))
    assert rig.heads == []
    assert rig.handler.data.startswith(b"GET / HTTP/1.1")


async def test_the_bytes_after_served_requests_are_handed_over() -> None:
    rig = _rig()
    loop = asyncio.get_running_loop()
    post = _post(body=b"payload")
    rig.feed(_get("/1") + _get("/2") + post[:30])
    assert rig.targets == ["/1", "/2"]
    assert rig.acceptor.handlers == []
    before = loop.time()
    rig.feed(post[30:] + _get("/3"))
    assert rig.targets == ["/1", "/2"]
    assert rig.handler.data == post + _get("/3")
    assert rig.transport.written == OK * 2
    # after served requests, the head handed over gets a fresh header deadline
    assert rig.handler.header_deadline_at >= before + 60.0


async def test_the_first_head_keeps_what_is_left_of_its_deadline() -> None:
    rig = _rig(header_timeout_seconds=30.0)
    after = asyncio.get_running_loop().time()
    rig.feed(_post())
    deadline = rig.handler.header_deadline_at
    assert rig.connected_at + 30.0 <= deadline <= after + 30.0


async def test_a_hand_over_while_reading_is_paused_resumes_it() -> None:
    pending: list[FrontConnection] = []

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        pending.append(conn)
        return PENDING

    rig = _rig(respond)
    rig.feed(_get("/slow"), _post(body=b"b" * (PIPELINE_BUFFER_BYTES + 1)))
    assert not rig.transport.reading
    pending[0].finish(True)
    assert rig.transport.reading
    assert rig.handler.data == _post(body=b"b" * (PIPELINE_BUFFER_BYTES + 1))


async def test_a_request_sent_while_the_client_does_not_read_is_handed_over_later() -> None:
    rig = _rig()
    rig.feed(_get("/1"))
    rig.conn.pause_writing()
    rig.feed(_post())
    assert rig.acceptor.handlers == []  # nothing is parsed while the client does not read
    rig.conn.resume_writing()
    assert rig.targets == ["/1"]
    assert rig.handler.data == _post()
    assert rig.handler.write_paused is False


# -- timers --


async def test_the_first_head_deadline_closes_an_idle_connection() -> None:
    rig = _rig(header_timeout_seconds=0.05)
    await asyncio.wait_for(rig.transport.closed.wait(), 5)
    assert rig.rejected == ["header_timeout"]
    assert rig.heads == []
    assert not rig.transport.aborted


async def test_the_first_head_deadline_closes_a_trickled_head() -> None:
    rig = _rig(header_timeout_seconds=0.05)
    rig.feed(b"GET / HTTP/1.1\r\nHost: gw")
    await asyncio.wait_for(rig.transport.closed.wait(), 5)
    assert rig.rejected == ["header_timeout"]
    assert rig.heads == []
    assert rig.acceptor.handlers == []


async def test_an_idle_keep_alive_connection_closes_without_a_rejection() -> None:
    rig = _rig(header_timeout_seconds=60.0, keepalive_timeout_seconds=0.05)
    rig.feed(_get("/"))
    await asyncio.wait_for(rig.transport.closed.wait(), 5)
    assert rig.targets == ["/"]
    assert rig.rejected == []


async def test_a_deadline_checked_early_is_re_armed() -> None:
    rig = _rig(header_timeout_seconds=60.0)
    timer = rig.conn._timer
    assert timer is not None
    timer.cancel()
    rig.conn._deadline_passed()  # fired too early: not closed, armed again
    assert not rig.transport.closing
    assert rig.rejected == []
    assert rig.conn._timer is not None
    assert rig.conn._timer.when() == pytest.approx(rig.connected_at + 60.0, abs=1.0)
    rig.close()


async def test_a_busy_connection_is_not_closed_by_its_deadline() -> None:
    rig = _rig(lambda conn, head: PENDING, header_timeout_seconds=0.05)
    rig.feed(_get("/slow"))
    timer = rig.conn._timer
    assert timer is not None
    timer.cancel()
    rig.conn._deadline = 0.0  # overdue
    rig.conn._deadline_passed()
    assert not rig.transport.closing
    assert rig.rejected == []
    rig.close()


# -- writing, losing the client, draining --


async def test_write_raises_once_the_transport_is_closing() -> None:
    rig = _rig()
    rig.conn.write(b"abc")
    assert rig.transport.written == b"abc"
    rig.transport.close()
    with pytest.raises(ConnectionResetError):
        rig.conn.write(b"def")
    assert rig.transport.written == b"abc"


async def test_drain_waits_for_the_client_and_fails_when_it_leaves() -> None:
    rig = _rig()
    await rig.conn.drain()  # not paused: returns at once
    rig.conn.pause_writing()
    waiting = asyncio.ensure_future(rig.conn.drain())
    await asyncio.sleep(0)
    assert not waiting.done()
    rig.conn.resume_writing()
    await asyncio.wait_for(waiting, 5)

    rig.conn.pause_writing()
    waiting = asyncio.ensure_future(rig.conn.drain())
    await asyncio.sleep(0)
    rig.close()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(waiting, 5)


async def test_a_lost_idle_connection_is_forgotten_at_once() -> None:
    rig = _rig()
    rig.feed(_get("/"))
    rig.close()
    assert rig.acceptor.forgotten == [rig.conn]


async def test_a_lost_busy_connection_is_forgotten_when_its_request_ends() -> None:
    rig = _rig(lambda conn, head: PENDING)
    rig.feed(_get("/slow"))
    rig.close()
    assert rig.acceptor.forgotten == []  # a drain still waits for the request
    rig.conn.finish(True)
    assert rig.acceptor.forgotten == [rig.conn]


async def test_close_waits_for_the_request_being_served() -> None:
    rig = _rig(lambda conn, head: PENDING)
    rig.feed(_get("/slow") + _get("/next"))
    rig.conn.close()
    assert not rig.transport.closing
    rig.conn.finish(True)
    assert rig.transport.closing
    assert rig.targets == ["/slow"]


async def test_close_closes_an_idle_connection_now() -> None:
    rig = _rig()
    rig.conn.close()
    assert rig.transport.closing
    assert not rig.transport.aborted


async def test_shutdown_out_of_time_cancels_the_request_and_aborts() -> None:
    class Tracked:
        cancelled = 0

        def cancel(self) -> None:
            self.cancelled += 1

    tracked = Tracked()

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        conn.track(tracked)
        return PENDING

    rig = _rig(respond)
    rig.feed(_get("/slow"))
    await rig.conn.shutdown(0)
    assert tracked.cancelled == 1
    assert rig.transport.aborted


async def test_shutdown_waits_for_a_request_answered_in_time() -> None:
    pending: list[FrontConnection] = []

    def respond(conn: FrontConnection, head: RequestHead) -> PlainOutcome:
        pending.append(conn)
        return PENDING

    rig = _rig(respond)
    rig.feed(_get("/slow"))
    loop = asyncio.get_running_loop()
    loop.call_soon(pending[0].finish, True)
    await rig.conn.shutdown(5)
    assert rig.transport.closing
    assert not rig.transport.aborted


async def test_a_task_cancelled_by_shutdown_ends_the_request() -> None:
    started = asyncio.Event()

    async def forever(conn: FrontConnection) -> bool:
        started.set()
        await asyncio.Event().wait()
        return True

    def respond(conn: FrontConnection, head: RequestHead) -> Coroutine[Any, Any, bool]:
        return forever(conn)

    rig = _rig(respond)
    rig.feed(_get("/slow"))
    await asyncio.wait_for(started.wait(), 5)
    await rig.conn.shutdown(0)
    assert rig.transport.aborted
    await asyncio.sleep(0)
    assert rig.conn._task is None
