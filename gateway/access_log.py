"""⑥ The access log: a bounded producer/consumer queue, written off the request path.

The request path puts its record, a tuple of the values it has at hand, on a
``queue.SimpleQueue`` bounded by a size check (``put``: no formatting, no
lock). One consumer thread takes records off the queue, formats them as JSON
lines and writes them. A full queue drops the record and counts it
(``gateway_access_log_dropped_total``): a slow or stuck sink can lose log
lines but can never slow a request. ``stop`` puts a sentinel behind every
record already queued, so a clean stop writes them all.

This is the stdlib ``QueueListener`` pattern (queue, consumer thread,
sentinel) with one change that measured +35 % throughput: QueueListener
blocks in ``get()`` for every record, so every request wakes the consumer
thread and the two trade the GIL once per request. This consumer blocks only
for the first record of a batch, takes the rest with ``get_nowait``, and
then rests ``BATCH_INTERVAL_SECONDS`` so records gather: one wake-up per
batch. Each write is of whole lines, so workers appending to one file
(O_APPEND) never interleave inside a line.

Formatting costs the process the same CPU on either thread (the GIL
serialises them), but a consumer that formats a whole batch holds the GIL
for all of it (about 1.5 ms for 20 ms of records at 60k req/s) and stalls
the event loop: the denied path's p99 was 3.6 ms with the log on against
1.5 ms with it off, which is why records were once formatted on the request
path. Here the consumer formats ``CHUNK_RECORDS`` at a time, writes each
chunk, and sleeps ``CHUNK_PAUSE_SECONDS`` between chunks: a write releases
the GIL, but this thread would take it back before a waiting event loop
woke. Measured with a busy main thread while 20,000 queued records were
formatted: its longest wait 0.6-0.8 ms (one chunk on a slow day), against
7-9 ms with the whole batch formatted at once. ``LineFormatter`` makes a
line for about 60 % of the instructions the request path's ``%``-format,
float formatting and escape regex took (14.6k against 25.1k in callgrind):
a clean chunk's strings are checked once, in C, and not escaped field by
field; the timestamp's text is made once per millisecond; small integers'
text is looked up.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from json.encoder import encode_basestring_ascii
from typing import IO, Any, Final

from prometheus_client import Counter

__all__ = ["FIELDS", "AccessLog", "AccessRecord", "LineFormatter", "format_record"]

log = logging.getLogger("gateway.access_log")

FIELDS: Final = (
    "ts", "request_id", "client", "method", "path", "route", "decision", "status",
    "tokens_left", "upstream_ms", "duration_ms", "bytes_in", "bytes_out", "upstream_addr",
)  # fmt: skip
BATCH_INTERVAL_SECONDS: Final = 0.02

# One answered request, in FIELDS order; ts is time.time(), *_ms floats or None;
# upstream_addr None when no upstream server was tried.
AccessRecord = tuple[
    float, str, str, str, str, str, str, int, "int | None", "float | None", float, int, int,
    "str | None",
]  # fmt: skip

# What json.dumps escapes in ASCII text: control characters, '"', '\\',
# and DEL.
_UNSAFE: Final = bytes(range(0x20)) + b'"\\\x7f'
_MILLIS: Final = tuple(f".{milli:03d}Z" for milli in range(1000))
# Statuses, byte counts, tokens: most are small, and str() of an int costs
# several times a dict lookup.
_SMALL_INTS: Final = {number: str(number) for number in range(1024)}
# Records formatted per hold of the GIL (64 are about a million
# instructions, 0.1 ms on the machine of docs/performance.md), and the pause
# after each that lets a waiting event loop take it.
CHUNK_RECORDS: Final = 64
CHUNK_PAUSE_SECONDS: Final = 0.0001
_SENTINEL: Final = object()


def _inner(value: str) -> str:
    """``value`` escaped for a JSON string, without the quotes: what
    json.dumps gives (``\\uXXXX`` beyond ASCII, so the line stays ASCII)."""
    return encode_basestring_ascii(value)[1:-1]


class LineFormatter:
    """Access records as JSON lines, fields in FIELDS order, for one thread
    (the consumer). ``ts`` is UTC with milliseconds; its text is made once
    per millisecond, its date and time once per second."""

    def __init__(self) -> None:
        self._millis = -1
        self._second_millis = -1000  # the current second, in milliseconds
        self._prefix = ""
        self._stamp = ""

    def lines(self, records: list[AccessRecord]) -> bytes:
        """Every record as one line, each ending in a newline, ASCII.

        The string fields go in as they are when all of the chunk's are
        printable ASCII without '"' or '\\' (one pass in C over them
        joined, no regex); otherwise the chunk is made again with every string escaped
        as json.dumps escapes it."""
        text, strings = self._format(records, escape=False)
        if strings.isascii():
            data = strings.encode("ascii")
            if len(data.translate(None, _UNSAFE)) == len(data):
                return text.encode("ascii")
        return self._format(records, escape=True)[0].encode("ascii")

    def _format(self, records: list[AccessRecord], *, escape: bool) -> tuple[str, str]:
        """The lines, and the string fields of every record joined."""
        millis_seen, second_millis = self._millis, self._second_millis
        prefix, stamp = self._prefix, self._stamp
        # No bound-method aliases (``append = out.append``): compiled, the
        # alias is a generic call, the method itself a primitive.
        small = _SMALL_INTS
        out: list[str] = []
        strings: list[str] = []
        for record in records:
            (ts, request_id, client, method, path, route, decision, status,
             tokens_left, upstream_ms, duration_ms, bytes_in, bytes_out,
             upstream_addr) = record  # fmt: skip
            millis = int(ts * 1000)
            if millis != millis_seen:
                millis_seen = millis
                milli = millis - second_millis
                if not 0 <= milli < 1000:
                    second = millis // 1000
                    second_millis = second * 1000
                    milli = millis - second_millis
                    prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                stamp = prefix + _MILLIS[milli]
            if upstream_addr is None:
                addr = "null"
            elif escape:
                addr = f'"{_inner(upstream_addr)}"'
            else:
                addr = f'"{upstream_addr}"'
                strings.append(upstream_addr)
            if escape:
                request_id, client, method = _inner(request_id), _inner(client), _inner(method)
                path, route = _inner(path), _inner(route)
            else:
                strings.append(f"{request_id}{client}{method}{path}{route}")
            # Every piece a str before the f-string, and format() for the
            # floats: compiled (mypyc), an f-string of str alone is one
            # concatenation, while an int or a format spec in it makes the
            # whole a str.format() call.
            tokens = (
                "null" if tokens_left is None else small.get(tokens_left) or str(tokens_left)
            )
            upstream = "null" if upstream_ms is None else format(upstream_ms, ".3f")
            duration = format(duration_ms, ".3f")
            code = small.get(status) or str(status)
            size_in = small.get(bytes_in) or str(bytes_in)
            size_out = small.get(bytes_out) or str(bytes_out)
            out.append(
                f'{{"ts":"{stamp}","request_id":"{request_id}","client":"{client}",'
                f'"method":"{method}","path":"{path}","route":"{route}",'
                f'"decision":"{decision}","status":{code},'
                f'"tokens_left":{tokens},"upstream_ms":{upstream},'
                f'"duration_ms":{duration},"bytes_in":{size_in},'
                f'"bytes_out":{size_out},"upstream_addr":{addr}}}\n'
            )
        self._millis, self._second_millis = millis_seen, second_millis
        self._prefix, self._stamp = prefix, stamp
        return "".join(out), "".join(strings)


def format_record(record: AccessRecord) -> str:
    """One record as one JSON object (no newline)."""
    return LineFormatter().lines([record])[:-1].decode("ascii")


class _Consumer:
    """The consumer thread: formats records and writes them in batches."""

    def __init__(
        self, records: queue.SimpleQueue[Any], sink: IO[bytes], dropped: Counter
    ) -> None:
        self._records = records
        self._sink = sink
        self._dropped = dropped
        self._formatter = LineFormatter()
        self._broken = False
        self._unformattable = False
        self.thread = threading.Thread(target=self._run, name="access-log", daemon=True)

    def _run(self) -> None:
        records = self._records
        while True:
            batch = [records.get()]
            while True:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            stopping = _SENTINEL in batch
            if stopping:
                # A record put while stop() queued the sentinel: not
                # written, so counted (``stop`` counts any that come later).
                late = batch.index(_SENTINEL)
                if len(batch) - late > 1:
                    self._dropped.inc(len(batch) - late - 1)
                del batch[late:]
            for start in range(0, len(batch), CHUNK_RECORDS):
                if start:
                    # Let go of the GIL long enough for a waiting event loop
                    # to take it: a write alone releases it, but this thread
                    # takes it straight back before the loop has woken.
                    time.sleep(CHUNK_PAUSE_SECONDS)
                self._write(batch[start : start + CHUNK_RECORDS])
            if stopping:
                return
            time.sleep(BATCH_INTERVAL_SECONDS)

    def _write(self, records: list[AccessRecord]) -> None:
        try:
            data = self._formatter.lines(records)
        except Exception:
            data = self._one_by_one(records)
        try:
            # Unbuffered: one write() of whole lines, which also lets the
            # event loop take the GIL between chunks.
            self._sink.write(data)
            self._sink.flush()
        except (OSError, ValueError) as exc:
            if not self._broken:  # one line about a broken sink, not one per batch
                log.error("access log: cannot write: %s", exc)
                self._broken = True

    def _one_by_one(self, records: list[Any]) -> bytes:
        """A record the formatter cannot take is a bug: it is logged (once)
        and counted as dropped, and neither the thread nor the chunk's
        other records end with it. (``Any``: compiled, a loop over typed
        records checks each one's type before the ``try``.)"""
        lines = []
        for record in records:
            try:
                lines.append(self._formatter.lines([record]))
            except Exception:
                if not self._unformattable:
                    log.exception("access log: cannot format %r", record)
                    self._unformattable = True
                self._dropped.inc()
        return b"".join(lines)


class AccessLog:
    """``path``: ``-`` (stdout), a file (appended), or ``off``."""

    def __init__(self, path: str, queue_size: int, dropped: Counter) -> None:
        self.enabled = path != "off"
        # SimpleQueue (C, lock-free for the producer) with the bound checked
        # here: put_nowait on a bounded queue.Queue is Python code taking a
        # lock and notifying a condition, ~0.6 us per request against ~0.1.
        # Only the consumer takes records off, so qsize() can only be an
        # overestimate: the bound holds.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue_size = queue_size
        self._dropped = dropped
        self._path = path
        self._sink: IO[bytes] | None = None
        self._consumer: _Consumer | None = None
        self._stopping = False

    def depth(self) -> int:
        return self._queue.qsize()

    def put(self, record: AccessRecord) -> None:
        """Called on the request path: never blocks, never formats."""
        if not self.enabled:
            return
        records = self._queue
        # Behind the sentinel nothing would be written: counted instead.
        if records.qsize() >= self._queue_size or self._stopping:
            self._dropped.inc()
            return
        records.put(record)

    @property
    def alive(self) -> bool:
        if not self.enabled:
            return True
        consumer = self._consumer
        return consumer is not None and consumer.thread.is_alive()

    def start(self) -> None:
        if not self.enabled:
            return
        if self._path == "-":
            self._sink = sys.stdout.buffer
        else:
            # Unbuffered O_APPEND: each batch is one write() of whole lines.
            self._sink = open(self._path, "ab", buffering=0)  # noqa: SIM115
        self._consumer = _Consumer(self._queue, self._sink, self._dropped)
        self._consumer.thread.start()

    def stop(self, timeout_seconds: float) -> bool:
        """Write every queued record, then stop. Blocking: call from a thread.
        False when the sink did not drain within ``timeout_seconds``."""
        consumer = self._consumer
        if consumer is None:
            return True
        deadline = time.monotonic() + timeout_seconds
        self._stopping = True
        # The sentinel queues behind every record, even past the bound (a
        # sink stuck past the timeout is reported below).
        self._queue.put(_SENTINEL)
        consumer.thread.join(max(0.0, deadline - time.monotonic()))
        if consumer.thread.is_alive():
            log.error(
                "access log: %d records not written after %.1fs; giving up",
                self._queue.qsize(),
                timeout_seconds,
            )
            return False
        left = 0  # lines put behind the sentinel: never written
        while True:
            try:
                left += self._queue.get_nowait() is not _SENTINEL
            except queue.Empty:
                break
        if left:
            self._dropped.inc(left)
        if self._sink is not None and self._sink is not sys.stdout.buffer:
            self._sink.close()
        self._consumer = None
        return True
