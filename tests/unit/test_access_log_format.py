"""The access log's lines: ``LineFormatter`` against the formatter it
replaced (kept below as the oracle, as it was at 49bd0cf), byte for byte;
every line parses back to its record; and the consumer writes chunks of
whole lines, surviving a record it cannot format."""

from __future__ import annotations

import io
import json
import math
import queue
import re
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from gateway.access_log import (
    _SENTINEL,
    CHUNK_RECORDS,
    FIELDS,
    AccessRecord,
    LineFormatter,
    _Consumer,
    format_record,
)

# -- the oracle: gateway/access_log.py's format_record before issue 15 ------------------

_NEEDS_ESCAPE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_PLAIN_LINE = (
    '{"ts":"%s","request_id":"%s","client":"%s","method":"%s","path":"%s","route":"%s",'
    '"decision":"%s","status":%d,"tokens_left":%s,"upstream_ms":%s,"duration_ms":%.3f,'
    '"bytes_in":%d,"bytes_out":%d,"upstream_addr":%s}'
)


def _string(value: str) -> str:
    if _NEEDS_ESCAPE.search(value) is None:
        return f'"{value}"'
    return json.dumps(value)


def reference_line(record: AccessRecord) -> bytes:
    ts, request_id, client, method, path, route, decision, status = record[:8]
    tokens_left, upstream_ms, duration_ms, bytes_in, bytes_out, upstream_addr = record[8:]
    second = int(ts)
    stamp = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        + f".{int(ts * 1000) % 1000:03d}Z"
    )
    tokens = "null" if tokens_left is None else str(tokens_left)
    upstream = "null" if upstream_ms is None else f"{upstream_ms:.3f}"
    addr = upstream_addr or ""
    if _NEEDS_ESCAPE.search(f"{request_id}{client}{method}{path}{route}{addr}") is None:
        line = _PLAIN_LINE % (
            stamp, request_id, client, method, path, route, decision, status, tokens,
            upstream, duration_ms, bytes_in, bytes_out,
            "null" if upstream_addr is None else f'"{upstream_addr}"',
        )  # fmt: skip
    else:
        line = (
            f'{{"ts":"{stamp}","request_id":{_string(request_id)},"client":{_string(client)},'
            f'"method":{_string(method)},"path":{_string(path)},"route":{_string(route)},'
            f'"decision":"{decision}","status":{status},"tokens_left":{tokens},'
            f'"upstream_ms":{upstream},"duration_ms":{duration_ms:.3f},'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
            f'"upstream_addr":{"null" if upstream_addr is None else _string(upstream_addr)}}}'
        )
    return (line + "\n").encode("utf-8", "backslashreplace")


# -- records ------------------------------------------------------------------------------

timestamps = st.floats(1.6e9, 1.9e9) | st.integers(1_600_000_000, 1_900_000_000).map(
    lambda second: math.nextafter(float(second), 0.0)  # a hair below a whole second
)
plain_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).filter(
    lambda text: '"' not in text and "\\" not in text
)
# Anything a client may send, decoded as the parsers do (surrogateescape
# included), and the characters JSON must escape.
any_text = st.text(max_size=20) | st.sampled_from(
    ['a"b', "a\\b", "tab\there", "\x00", "\x7f", "caf\u00e9", "\udc80/x", "\U0001f600", ""]
)
texts = plain_text | any_text
milliseconds = st.none() | st.floats(0, 1e6, allow_nan=False) | st.sampled_from([0.0005, 2.0])
counts = st.integers(0, 2000) | st.integers(0, 10**12)
records = st.tuples(
    timestamps, texts, texts, texts, texts, texts,
    st.sampled_from(["allowed", "denied", "shadow_denied", "exempt", "blocked", "delayed"]),
    st.sampled_from([200, 204, 404, 429, 499, 502]),
    st.none() | counts, milliseconds, st.floats(0, 1e6, allow_nan=False), counts, counts,
    st.none() | texts,
)  # fmt: skip


def usual(ts: float, path: str = "/api/items?id=7") -> AccessRecord:
    return (
        ts, "3f2a9c0d1e2b3c4d0000000000000abc", "127.0.0.1", "GET", path, "/api",
        "allowed", 200, 19, 0.412345, 1.2345678, 0, 24, "127.0.0.1:8000",
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(records, max_size=8), max_size=4))
def test_lines_are_the_old_formatters_byte_for_byte(chunks: list[list[Any]]) -> None:
    """Chunks through one formatter (its time-of-day memo carried over),
    clean ones and ones where some string needs escaping."""
    formatter = LineFormatter()
    for chunk in chunks:
        assert formatter.lines(chunk) == b"".join(reference_line(r) for r in chunk)


@settings(max_examples=200, deadline=None)
@given(records)
def test_a_line_is_one_json_object_that_gives_the_record_back(record: Any) -> None:
    line = format_record(record)
    assert "\n" not in line
    assert line.isascii()
    parsed = json.loads(line)
    assert list(parsed) == list(FIELDS)
    assert [parsed[k] for k in FIELDS[1:8]] == list(record[1:8])
    assert parsed["tokens_left"] == record[8]
    assert parsed["bytes_in"] == record[11]
    assert parsed["bytes_out"] == record[12]
    assert parsed["upstream_addr"] == record[13]
    for key, value in (("upstream_ms", record[9]), ("duration_ms", record[10])):
        assert (
            (parsed[key] is None)
            if value is None
            else math.isclose(parsed[key], value, abs_tol=0.0005)
        )


def test_the_usual_line() -> None:
    ts = 1_767_225_600.125  # 2026-01-01T00:00:00.125Z
    assert format_record(usual(ts)) == (
        '{"ts":"2026-01-01T00:00:00.125Z","request_id":"3f2a9c0d1e2b3c4d0000000000000abc",'
        '"client":"127.0.0.1","method":"GET","path":"/api/items?id=7","route":"/api",'
        '"decision":"allowed","status":200,"tokens_left":19,"upstream_ms":0.412,'
        '"duration_ms":1.235,"bytes_in":0,"bytes_out":24,"upstream_addr":"127.0.0.1:8000"}'
    )


def test_one_string_to_escape_escapes_its_chunk_as_json_does() -> None:
    formatter = LineFormatter()
    chunk = [usual(1_767_225_600.0), usual(1_767_225_600.5, '/q"\\\t\u00e9\udc80')]
    first, second = formatter.lines(chunk).decode("ascii").splitlines()
    assert '"path":"/api/items?id=7"' in first
    assert '"path":"/q\\"\\\\\\t\\u00e9\\udc80"' in second
    assert json.loads(second)["path"] == '/q"\\\t\u00e9\udc80'


# -- the consumer ------------------------------------------------------------------------


class RecordingSink(io.RawIOBase):
    """A sink that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(data)


def run_consumer(items: list[Any]) -> tuple[RecordingSink, float]:
    """``items`` queued, then the sentinel, before the consumer starts: one batch."""
    registry = CollectorRegistry()
    dropped = Counter("dropped", "Dropped.", registry=registry)
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for item in [*items, _SENTINEL]:
        records.put(item)
    sink = RecordingSink()
    consumer = _Consumer(records, sink, dropped)
    consumer.thread.start()
    consumer.thread.join(10)
    assert not consumer.thread.is_alive()
    return sink, registry.get_sample_value("dropped_total") or 0.0


def test_a_batch_is_written_in_chunks_of_whole_lines() -> None:
    """Each chunk is one write, so the GIL is let go between chunks."""
    count = 2 * CHUNK_RECORDS + 5
    sink, dropped = run_consumer([usual(1_767_225_600 + i / 1000) for i in range(count)])
    assert [w.count(b"\n") for w in sink.writes] == [CHUNK_RECORDS, CHUNK_RECORDS, 5]
    assert all(w.endswith(b"\n") for w in sink.writes)
    lines = b"".join(sink.writes).splitlines()
    assert [json.loads(line)["ts"][-5:] for line in lines[:3]] == [".000Z", ".001Z", ".002Z"]
    assert dropped == 0


def test_a_record_it_cannot_format_is_dropped_and_counted_alone(caplog: Any) -> None:
    sink, dropped = run_consumer([usual(1_767_225_600.0), ("not", "a record"), usual(1.0)])
    assert dropped == 1
    assert len(b"".join(sink.writes).splitlines()) == 2
    assert caplog.text.count("cannot format") == 1
