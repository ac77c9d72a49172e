"""⑤ Response heads serialised by hand, and whole responses in one write.

Profiling the denied path put most of its time in aiohttp's StreamResponse
machinery (header multidict, Date, serialisation, writer) for a 50-byte
answer. So heads are built here, by one serialiser (``response_head``):
the upstream's as relayed, straight from the header bytes llhttp gave us,
and our own answers (``whole_response``: 502s, 504s and the like; the 429 has
its own template in responses.py). A complete small response goes to the
transport in one write, on either path (relay.Downstream).
"""

from __future__ import annotations

import string
import time
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from typing import ClassVar, Final

from gateway.headers import HOP_BY_HOP, decimal

__all__ = [
    "NO_BODY_STATUSES",
    "connection_field",
    "date_header",
    "field_lines",
    "response_head",
    "unrelayable_head",
    "whole_response",
]

NO_BODY_STATUSES: Final = frozenset({204, 304})


class _Date:
    """The Date value, formatted once per second."""

    second: ClassVar[int] = -1
    value: ClassVar[bytes] = b""


def date_header() -> bytes:
    """The Date field's value now, as bytes."""
    second = int(time.time())
    if second != _Date.second:
        _Date.second = second
        _Date.value = formatdate(second, usegmt=True).encode("ascii")
    return _Date.value


def connection_field(keep_alive: bool, http10: bool) -> bytes:
    """The Connection line a response needs, b"" when none: HTTP/1.1 stays
    open by default, HTTP/1.0 closes by default."""
    if not keep_alive:
        return b"Connection: close\r\n"
    if http10:
        return b"Connection: keep-alive\r\n"
    return b""


def whole_response(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
) -> bytes:
    """One of our own answers, ``headers`` and ``body``, as the bytes to
    write, with Content-Length (none for 1xx/204/304)."""
    no_body = status in NO_BODY_STATUSES or 100 <= status < 200
    head = response_head(
        status, reason.encode("latin-1"), [], field_lines(headers),
        replaced=frozenset(), content_length=None if no_body else len(body),
        chunked=False, keep_alive=keep_alive, http10=http10,
    )  # fmt: skip
    if no_body or head_only or not body:
        return head
    return head + body


# Upstream response fields never copied to the client: hop-by-hop ones and
# framing (set by the relay), as lower-case bytes.
_NOT_RELAYED: Final = frozenset(name.encode() for name in (*HOP_BY_HOP, "content-length"))


# Field names as upstreams spell them, lower-cased: the same few names come
# back on every response, and compiled, a dict lookup costs a fraction of a
# call to bytes.lower(). Bounded: names past the bound are lowered each time.
_LOWER: Final[dict[bytes, bytes]] = {}
_LOWER_MAX: Final = 1024


def response_head(
    status: int,
    reason: bytes,
    upstream: Sequence[tuple[bytes, bytes]],
    ours: bytes,
    *,
    replaced: frozenset[bytes],
    content_length: int | None,
    chunked: bool,
    keep_alive: bool,
    http10: bool,
) -> bytes:
    """A response head as the client gets it, the one response-field filter
    of both paths: the ``upstream`` fields as received (none for our own
    answers) minus hop-by-hop fields (headers.HOP_BY_HOP), framing
    (Content-Length is set here only when it is safe: copying it beside a
    chunked body is the CL+TE desync), any field named in Connection, and
    the upstream's copies of ``ours``; then ``ours`` (header lines, each
    ending in CRLF: ``field_lines``; ``replaced``: their lower-case names),
    Date when the upstream sent none, the framing asked for, and
    Connection."""
    lines = [b"HTTP/1.1 " + decimal(status) + b" " + reason]
    has_date = False
    connection: list[bytes] = []
    for name, value in upstream:
        lower = _LOWER.get(name)
        if lower is None:
            lower = name.lower()
            if len(_LOWER) < _LOWER_MAX:
                _LOWER[name] = lower
        if lower in _NOT_RELAYED or lower in replaced:
            if lower == b"connection":
                connection.append(value)
            continue
        if lower == b"date":
            has_date = True
        lines.append(name + b": " + value)
    if connection and not (len(connection) == 1 and connection[0].lower() in _NOT_RELAYED):
        # (the usual "Connection: keep-alive" alone names nothing more)
        named = {t.strip().lower() for v in connection for t in v.split(b",")} - _NOT_RELAYED
        if named:  # rare: a field named in Connection is hop-by-hop too
            kept = [
                (name, value)
                for name, value in upstream
                if (lower := name.lower()) not in _NOT_RELAYED
                and lower not in replaced
                and lower not in named
            ]
            lines = [lines[0]] + [name + b": " + value for name, value in kept]
            has_date = any(name.lower() == b"date" for name, _ in kept)
    tail = ours if has_date else ours + b"Date: " + date_header() + b"\r\n"
    if content_length is not None:
        tail += b"Content-Length: " + decimal(content_length) + b"\r\n"
    elif chunked:
        tail += b"Transfer-Encoding: chunked\r\n"
    tail += connection_field(keep_alive, http10)
    return b"\r\n".join(lines) + b"\r\n" + tail + b"\r\n"


def field_lines(fields: Iterable[tuple[str, str]]) -> bytes:
    """Our fields as header lines for ``response_head``. X-Request-ID may be
    the client's, decoded as UTF-8 with surrogateescape: encoded back the
    same way, it is its own bytes."""
    return "".join(f"{name}: {value}\r\n" for name, value in fields).encode(
        "utf-8", "surrogateescape"
    )


# Bytes allowed in a field name (a token, RFC 9110 section 5.6.2) and in a
# value (visible bytes, SP and HTAB, and obs-text 0x80-0xFF, let through as
# every proxy does: section 5.5), as translation tables that keep every
# allowed byte and change every other one: a head is valid when translating
# leaves it equal. One translate and one memcmp in C per head, no table built
# per call (``translate(None, delete)`` builds one), no Python loop over
# bytes, and no method call but the translate (compiled, each costs about a
# thousand instructions; comparing costs a few dozen).
_TOKEN_BYTES: Final = (string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~").encode()
_NAME_CHECK: Final = bytes(
    c if c in _TOKEN_BYTES or c == 0x0A else c ^ 1 for c in range(256)
)  # fmt: skip
_VALUE_CHECK: Final = bytes(c if c == 9 or 0x20 <= c != 0x7F else c ^ 1 for c in range(256))


def unrelayable_head(fields: Sequence[tuple[bytes, bytes]], max_size: int) -> str | None:
    """Why an upstream's response fields cannot be relayed, or None. One
    check for both paths' parsers (llhttp lenient as aiohttp's client makes
    it: obs-fold is joined with SP and a lone LF ends a line, RFC 9112
    sections 5.2 and 2.2), run once per response: the head past
    ``max_size`` bytes, a name that is not a token, a control byte in a
    value, or a transfer coding other than chunked (removing one is
    allowed only by decoding it, RFC 9112 section 6.1)."""
    names: list[bytes] = []
    values: list[bytes] = []
    codings: list[bytes] = []
    for name, value in fields:
        if not name:
            return "upstream sent a field name that is not a token"
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            codings.append(value)
        names.append(name)
        values.append(value)
    joined = b"\n".join(names)
    text = b"\t".join(values)
    if len(joined) + len(text) + 3 * len(names) > max_size:
        return f"upstream sent a response head over {max_size} bytes"
    if joined.translate(_NAME_CHECK) != joined:
        return "upstream sent a field name that is not a token"
    if text.translate(_VALUE_CHECK) != text:
        return "upstream sent a control character in a field value"
    for value in codings:
        for coding in value.split(b","):
            if coding.strip(b" \t").lower() != b"chunked":
                return "upstream sent a transfer coding other than chunked"
    return None
