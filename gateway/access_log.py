"""⑥ The access log: a bounded producer/consumer queue, written off the request path.

The request path only builds a small tuple and ``put_nowait``s it (well under a
microsecond). A ``QueueListener`` thread takes records off the queue, formats
each as one JSON line and writes them through a buffered file, flushing
whenever the queue runs empty, so a burst costs one write, not one per line.
A full queue drops the record and counts it
(``gateway_access_log_dropped_total``): a slow or stuck sink can lose log
lines but can never slow a request. ``stop`` enqueues the listener's sentinel
behind every record already queued, so a clean stop writes them all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
import time
from logging.handlers import QueueListener
from typing import IO, Any, Final

from prometheus_client import Counter

__all__ = ["FIELDS", "AccessLog", "AccessRecord"]

log = logging.getLogger("gateway.access_log")

FIELDS: Final = (
    "ts", "request_id", "client", "method", "path", "route", "decision", "status",
    "tokens_left", "upstream_ms", "duration_ms", "bytes_in", "bytes_out",
)  # fmt: skip

# One answered request, in FIELDS order; ts is time.time(), *_ms floats or None.
AccessRecord = tuple[
    float,
    str,
    str,
    str,
    str,
    str,
    str,
    int,
    "int | None",
    "float | None",
    float,
    int,
    int,
]


def format_record(record: AccessRecord) -> bytes:
    ts, *rest = record
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    fields: dict[str, Any] = {"ts": f"{stamp}.{int(ts * 1000) % 1000:03d}Z"}
    fields.update(zip(FIELDS[1:], rest, strict=True))
    for key in ("upstream_ms", "duration_ms"):
        if fields[key] is not None:
            fields[key] = round(fields[key], 3)
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


class _Writer(QueueListener):
    """The consumer: stdlib QueueListener, handling our tuples instead of
    LogRecords (no handlers; ``handle`` formats and writes)."""

    def __init__(self, q: queue.Queue[Any], sink: IO[bytes]) -> None:
        super().__init__(q)
        self._records = q
        self._sink = sink
        self._broken = False

    def prepare(self, record: Any) -> Any:
        return record

    def handle(self, record: Any) -> None:
        try:
            self._sink.write(format_record(record))
            if self._records.empty():
                self._sink.flush()
        except (OSError, ValueError) as exc:
            if not self._broken:  # one line about a broken sink, not one per record
                log.error("access log: cannot write: %s", exc)
                self._broken = True

    def enqueue_sentinel(self) -> None:
        # Blocking put: the sentinel must queue behind every record, even when
        # the queue is full (the stdlib put_nowait would raise queue.Full).
        self._records.put(self._sentinel)  # type: ignore[attr-defined]

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._sink.flush()


class AccessLog:
    """``path``: ``-`` (stdout), a file (appended), or ``off``."""

    def __init__(self, path: str, queue_size: int, dropped: Counter) -> None:
        self.enabled = path != "off"
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._dropped = dropped
        self._path = path
        self._sink: IO[bytes] | None = None
        self._writer: _Writer | None = None
        self._stopped = threading.Event()

    def depth(self) -> int:
        return self._queue.qsize()

    def put(self, record: AccessRecord) -> None:
        """Called on the request path: never blocks."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._dropped.inc()

    @property
    def alive(self) -> bool:
        if not self.enabled:
            return True
        writer = self._writer
        return writer is not None and writer._thread is not None and writer._thread.is_alive()

    def start(self) -> None:
        if not self.enabled:
            return
        if self._path == "-":
            self._sink = sys.stdout.buffer
        else:
            self._sink = open(self._path, "ab", buffering=64 * 1024)  # noqa: SIM115
        self._writer = _Writer(self._queue, self._sink)
        self._writer.start()

    def stop(self, timeout_seconds: float) -> bool:
        """Write every queued record, then stop. Blocking: call from a thread.
        False when the sink did not drain within ``timeout_seconds``."""
        writer = self._writer
        if writer is None or writer._thread is None:
            return True
        thread = writer._thread
        done = threading.Thread(target=writer.enqueue_sentinel, daemon=True)
        done.start()
        thread.join(timeout_seconds)
        if thread.is_alive():
            log.error(
                "access log: %d records not written after %.1fs; giving up",
                self._queue.qsize(),
                timeout_seconds,
            )
            return False
        writer.flush()
        if self._sink is not None and self._sink is not sys.stdout.buffer:
            self._sink.close()
        self._writer = None
        return True
