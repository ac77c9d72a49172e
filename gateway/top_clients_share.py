"""Under ``workers: N``, the workers' top-denied sketches reach the supervisor
as files, so /admin/clients is one answer for the instance.

Each worker writes its ``TopClients`` as JSON to ``top-denied-<index>.json``
in the workers' shared directory (the one prometheus_client's multiprocess
mode uses), once a second and only when it changed; a temporary file renamed
over the old one, so a reader never sees half a file. The supervisor merges
the files of every worker index when asked, and reuses the merge until a file
changes; when one has, only its changed sub-windows (the current minute's) are
parsed and merged again. A restarted worker starts from its predecessor's file, so a crash
does not forget the last minutes' denials. The sketches of every process use
``time.monotonic()``, one clock for the whole machine, so their sub-windows
line up.

Bounded: a file holds at most (max_routes + 1) x sub_windows x k counters
(``TopClients.from_dict`` refuses more), one per worker index, and a file
over ``MAX_FILE_BYTES`` is not read (logged).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Final

from gateway.top_clients import TopClients

__all__ = ["MAX_FILE_BYTES", "SharedTopDenied", "TopDeniedWriter", "top_denied_path"]

log = logging.getLogger("gateway.workers")

# 257 sketches x 5 sub-windows x 64 counters with 256-character client ids
# (the longest header id kept) is about 23 MB; anything past this is not ours.
MAX_FILE_BYTES: Final = 32 * 1024 * 1024


def top_denied_path(directory: str, index: int) -> str:
    """Worker ``index``'s file in ``directory``."""
    return os.path.join(directory, f"top-denied-{index}.json")


def _read(path: str, known: TopClients | None = None) -> TopClients:
    """The sketches in ``path``; OSError or ValueError when it holds none.
    ``known``: what the file held last time (its unchanged sub-windows are
    taken from there, not parsed again)."""
    with open(path, "rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    parsed = json.loads(data)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return TopClients.from_dict(parsed, known)


class TopDeniedWriter:
    """A worker's side: ``write`` (a once-a-second callback of the refill
    clock) puts ``top`` in its file when it changed since the last write."""

    def __init__(self, top: TopClients, path: str) -> None:
        self.top = top
        self.path = path
        self._written = -1
        self._failing = False

    def resume(self) -> None:
        """Fold the file a previous worker of this index left into ``top``."""
        if not os.path.exists(self.path):
            return
        try:
            self.top.merge(_read(self.path))
        except (OSError, ValueError) as exc:
            log.warning("top denied clients: %s not resumed: %s", self.path, exc)

    def write(self, _seconds: int = 0) -> None:
        top = self.top
        if top.version == self._written:
            return
        version = top.version
        text = top.to_json()
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, self.path)
        except OSError as exc:
            if not self._failing:  # once per run of failures, not every second
                log.warning("top denied clients: cannot write %s: %s", self.path, exc)
                self._failing = True
            return
        self._failing = False
        self._written = version


class SharedTopDenied:
    """The supervisor's side: every worker's sketches, merged."""

    def __init__(self, directory: str, workers: int) -> None:
        self.paths = [top_denied_path(directory, i) for i in range(workers)]
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int] | None, ...] | None = None
        self._merged = TopClients()
        self._parsed: dict[str, TopClients] = {}

    def _file_stamp(self, path: str) -> tuple[int, int] | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def read(self) -> TopClients:
        """The merge of every worker's last file (safe from any thread)."""
        with self._lock:
            stamp = tuple(self._file_stamp(p) for p in self.paths)
            if stamp == self._stamp:
                return self._merged
            parts = []
            for path, file_stamp in zip(self.paths, stamp, strict=True):
                if file_stamp is None:
                    continue  # that worker has denied nobody yet
                try:
                    part = _read(path, self._parsed.get(path))
                except (OSError, ValueError) as exc:
                    log.warning("top denied clients: %s left out: %s", path, exc)
                    self._parsed.pop(path, None)
                    continue
                self._parsed[path] = part
                parts.append(part)
            try:
                merged = TopClients.merged(parts, self._merged)
            except ValueError as exc:  # workers of another shape: not ours
                log.warning("top denied clients: workers' files not merged: %s", exc)
                merged = TopClients()
            self._stamp, self._merged = stamp, merged
            return merged
