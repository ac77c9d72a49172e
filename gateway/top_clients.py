"""Top denied clients over the last few minutes, in fixed memory.

A Space-Saving sketch (Metwally, Agrawal, El Abbadi, "Efficient Computation
of Frequent and Top-k Elements in Data Streams", ICDT 2005) holds k counters
whatever the number of distinct clients: a client already held has its
counter raised; a new one takes over the smallest counter, inheriting its
count as the new client's possible over-estimation. So every estimate is
>= the true count, over by at most its reported error, and every client whose
true count exceeds total/k is held.

``WindowedSpaceSaving`` keeps one sketch per sub-window (5 x 60 s by default)
and answers over the live ones, so old denials drop off without per-client
timestamps. ``TopClients`` keeps one windowed sketch overall and one per
route, with a hard bound on routes. Time is always an argument (``now``, in
seconds, from one clock shared by every process whose sketches are merged,
e.g. ``time.monotonic()``): nothing here reads a clock or does I/O, and
nothing imports from the gateway, so this module sits outside the layers.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = ["SpaceSaving", "TopClients", "WindowedSpaceSaving"]

# TopClients.note: denials kept in a list before the sketches count them.
NOTE_BATCH_SIZE: Final = 512
NOTE_BATCH_SECONDS: Final = 1.0

# (client, estimated count, maximum over-estimation)
Entry = tuple[str, int, int]


class SpaceSaving:
    """Space-Saving over one stream with at most ``k`` counters.

    Layout: a dict client -> count, a dict client -> error, and a min-heap of
    (count, client) with exactly one entry per held client. The heap entry
    may lag behind the dict (raising a held client's count touches only the
    dict, O(1): the common case, one client denied again and again). When a
    new client needs the smallest counter, a lagging heap top is pushed down
    with its real count and the top looked at again; each fix-up is paid for
    by the increments that made it lag, so an update is O(log k) amortised,
    and memory is exactly k entries in each structure. The stream-summary
    list of the paper gives O(1) for unit increments but not for weighted
    ones or merges, and is much more code; k is small (tens to a few
    hundred), so log k is a handful of comparisons.
    """

    __slots__ = ("_counts", "_errors", "_heap", "_json", "k", "total")

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.total = 0
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        # to_json's text and the total it was made at: every change raises
        # the total (add) or drops the cache (merge).
        self._json: tuple[int, str] | None = None

    def __len__(self) -> int:
        """The number of counters held: never more than ``k``."""
        return len(self._counts)

    def __contains__(self, client: object) -> bool:
        """Whether ``client`` holds a counter."""
        return client in self._counts

    @property
    def floor(self) -> int:
        """An upper bound on the true count of any client not held.

        Zero until the sketch is full: no client has been dropped before that
        (``add`` evicts only when full, ``merge`` leaves a sketch short of k
        only if neither side was full).
        """
        if len(self._counts) < self.k:
            return 0
        return self._min_count()

    def add(self, client: str, count: int = 1) -> None:
        """Count ``count`` more occurrences of ``client``."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.total += count
        counts = self._counts
        held = counts.get(client)
        if held is not None:
            counts[client] = held + count
            return
        if len(counts) < self.k:
            counts[client] = count
            self._errors[client] = 0
            heapq.heappush(self._heap, (count, client))
            return
        smallest = self._min_count()
        victim = self._heap[0][1]
        del counts[victim]
        del self._errors[victim]
        # The newcomer may have been the victim many times over: its true
        # count is anywhere in [count, smallest + count].
        counts[client] = smallest + count
        self._errors[client] = smallest
        heapq.heapreplace(self._heap, (smallest + count, client))

    def _min_count(self) -> int:
        """The smallest count held, with the heap's top made exact."""
        heap, counts = self._heap, self._counts
        while True:
            stale, client = heap[0]
            actual = counts[client]
            if actual == stale:
                # Every other entry is <= its client's count and >= this one.
                return actual
            heapq.heapreplace(heap, (actual, client))

    def estimate(self, client: str) -> tuple[int, int]:
        """(estimated count, maximum over-estimation) for one client.

        A client not held gets (floor, floor): it may have been counted up to
        ``floor`` times and dropped.
        """
        held = self._counts.get(client)
        if held is None:
            floor = self.floor
            return floor, floor
        return held, self._errors[client]

    def entries(self) -> list[Entry]:
        """Every held client, largest count first (ties by client, for a stable answer)."""
        errors = self._errors
        return sorted(
            ((c, n, errors[c]) for c, n in self._counts.items()), key=lambda e: (-e[1], e[0])
        )

    def top(self, n: int) -> list[Entry]:
        """The ``n`` largest estimated counts as (client, count, error)."""
        if n <= 0:
            return []
        return self.entries()[:n]

    @classmethod
    def merged(cls, sketches: Iterable[SpaceSaving], k: int) -> SpaceSaving:
        """One sketch of the concatenated streams of ``sketches``, with ``k`` counters.

        The parallel Space-Saving merge (Cafaro, Pulimeno, Tempesta, "A
        parallel space saving algorithm for frequent items and the Hurwitz
        zeta distribution", Information Sciences 329, 2016; Agarwal et al.,
        "Mergeable Summaries", PODS 2012, for the general frame): sum the
        counts and errors over the union of clients and keep the k largest.
        A client missing from a sketch is counted there as that sketch's
        floor, both in count and error: counting it as 0 would under-estimate
        a client that sketch had dropped. The kept counts still sum to at most
        the total, so the floor stays <= total/k and the heavy hitters stay.
        """
        parts = list(sketches)
        for part in parts:
            if part.k != k:
                raise ValueError(f"cannot merge a sketch of k={part.k} into k={k}")
        out = cls(k)
        out.total = sum(p.total for p in parts)
        floors = [p.floor for p in parts]
        all_floors = sum(floors)
        # One pass over what each part holds: a client gets what each part
        # holding it says, less that part's floor; then every part's floor
        # once, which counts the floor of each part that does not hold it.
        counts: dict[str, int] = {}
        errors: dict[str, int] = {}
        for part, floor in zip(parts, floors, strict=True):
            part_errors = part._errors
            for client, held in part._counts.items():
                counts[client] = counts.get(client, 0) + held - floor
                errors[client] = errors.get(client, 0) + part_errors[client] - floor
        merged: list[Entry] = [
            (client, count + all_floors, errors[client] + all_floors)
            for client, count in counts.items()
        ]
        if len(merged) > k:
            merged = heapq.nlargest(k, merged, key=lambda e: (e[1], e[0]))
        out._load(merged)
        return out

    def merge(self, other: SpaceSaving) -> None:
        """Fold ``other`` (same k) into this sketch, in place."""
        both = SpaceSaving.merged((self, other), self.k)
        self._json = None
        self.total = both.total
        self._counts, self._errors, self._heap = both._counts, both._errors, both._heap

    def _load(self, entries: Iterable[Entry]) -> None:
        for client, count, error in entries:
            self._counts[client] = count
            self._errors[client] = error
        self._heap = [(n, c) for c, n in self._counts.items()]
        heapq.heapify(self._heap)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for a worker to hand its sketch to the supervisor."""
        return {
            "k": self.k,
            "total": self.total,
            "items": [[c, n, e] for c, n, e in self.entries()],
        }

    def to_json(self) -> str:
        """``to_dict`` as compact JSON, made again only after a change: a
        worker rewrites its sketches every second, and only the current
        sub-window's have changed."""
        cached = self._json
        if cached is not None and cached[0] == self.total:
            return cached[1]
        errors = self._errors
        # Unsorted: from_dict does not need the order, and this runs on the
        # worker's event loop.
        items = json.dumps(
            [[c, n, errors[c]] for c, n in self._counts.items()], separators=(",", ":")
        )
        text = f'{{"k":{self.k},"total":{self.total},"items":{items}}}'
        self._json = (self.total, text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpaceSaving:
        """The sketch ``to_dict`` described; ValueError when the data could not be one."""
        out = cls(_int(data.get("k"), "k", minimum=1))
        out.total = _int(data.get("total"), "total")
        items = data.get("items")
        if not isinstance(items, list) or len(items) > out.k:
            raise ValueError(f"items must be a list of at most k={out.k} entries")
        entries: list[Entry] = []
        for item in items:
            if not (isinstance(item, list | tuple) and len(item) == 3):
                raise ValueError(f"an item must be [client, count, error], got {item!r}")
            client, count, error = item
            if not isinstance(client, str):
                raise ValueError(f"a client must be a string, got {client!r}")
            count = _int(count, "count", minimum=1)
            error = _int(error, "error")
            if error > count:
                raise ValueError(f"error {error} exceeds count {count}")
            entries.append((client, count, error))
        if len({e[0] for e in entries}) != len(entries):
            raise ValueError("a client appears twice")
        if sum(e[1] for e in entries) > out.total:
            raise ValueError("the counts add up to more than the total")
        out._load(entries)
        return out


class WindowedSpaceSaving:
    """Space-Saving over a sliding window of ``sub_windows`` x ``sub_window_seconds``.

    One sketch per sub-window, in a ring indexed by epoch = floor(now /
    width). An answer at ``now`` covers the current sub-window and the
    previous ``sub_windows - 1``: between (n - 1) and n widths of history,
    4 to 5 minutes by default. An update for a sub-window that has already
    left the ring is dropped (the caller's clock is expected to be monotonic).
    Memory: at most ``sub_windows * k`` counters, and two merged answers of
    ``k`` kept for the next poll.
    """

    __slots__ = (
        "_closed", "_epochs", "_sketches", "_whole", "k", "sub_window_seconds", "sub_windows",
    )  # fmt: skip

    def __init__(self, k: int, sub_window_seconds: float = 60.0, sub_windows: int = 5) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not sub_window_seconds > 0:
            raise ValueError(f"sub_window_seconds must be > 0, got {sub_window_seconds}")
        if sub_windows < 1:
            raise ValueError(f"sub_windows must be at least 1, got {sub_windows}")
        self.k = k
        self.sub_window_seconds = float(sub_window_seconds)
        self.sub_windows = sub_windows
        # None: a slot never used; otherwise the epoch its sketch counts.
        self._epochs: list[int | None] = [None] * sub_windows
        self._sketches: list[SpaceSaving | None] = [None] * sub_windows
        # The merge of the live sub-windows before the current one, and what
        # it was made of ((epoch, total) of each): those no longer change, so
        # a poll merges one cached sketch with the current sub-window's.
        self._closed: tuple[tuple[tuple[int, int], ...], SpaceSaving] | None = None
        # The last answer and what it was made of: a route nobody was denied
        # on since the last poll costs no merge.
        self._whole: tuple[tuple[tuple[int, int], ...], SpaceSaving] | None = None

    def _epoch(self, now: float) -> int:
        return int(now // self.sub_window_seconds)

    def record(self, client: str, now: float, count: int = 1) -> None:
        """Count ``count`` occurrences of ``client`` at time ``now``."""
        epoch = self._epoch(now)
        slot = epoch % self.sub_windows
        held = self._epochs[slot]
        sketch = self._sketches[slot]
        if held != epoch or sketch is None:
            if held is not None and held > epoch:
                return  # that sub-window has rotated out already
            sketch = self._sketches[slot] = SpaceSaving(self.k)
            self._epochs[slot] = epoch
        sketch.add(client, count)

    def _live(self, now: float) -> list[SpaceSaving]:
        epoch = self._epoch(now)
        oldest = epoch - self.sub_windows
        return [
            s
            for e, s in zip(self._epochs, self._sketches, strict=True)
            if s is not None and e is not None and oldest < e <= epoch
        ]

    def window(self, now: float) -> SpaceSaving:
        """One sketch of the window ending at ``now`` (the live sub-windows
        merged). Read only: it may be a sub-window's own sketch."""
        epoch = self._epoch(now)
        oldest = epoch - self.sub_windows
        closed: list[tuple[int, SpaceSaving]] = []
        current: SpaceSaving | None = None
        for e, s in zip(self._epochs, self._sketches, strict=True):
            if s is None or e is None or not oldest < e <= epoch:
                continue
            if e == epoch:
                current = s
            else:
                closed.append((e, s))
        if not closed:
            return current if current is not None else SpaceSaving(self.k)
        made_of = tuple(sorted((e, s.total) for e, s in closed))
        cached = self._closed
        if cached is None or cached[0] != made_of:
            sketches = [s for _e, s in closed]
            merged = sketches[0] if len(sketches) == 1 else SpaceSaving.merged(sketches, self.k)
            cached = self._closed = (made_of, merged)
        if current is None:
            return cached[1]
        whole_of = (*made_of, (epoch, current.total))
        whole = self._whole
        if whole is None or whole[0] != whole_of:
            whole = self._whole = (whole_of, SpaceSaving.merged((cached[1], current), self.k))
        return whole[1]

    def top(self, n: int, now: float) -> list[Entry]:
        """The ``n`` clients with the largest estimated counts in the window ending at ``now``.

        Each as (client, estimated count, maximum over-estimation). Costs a
        merge of at most ``sub_windows`` sketches: for a poll, not per request.
        """
        return self.window(now).top(n)

    def total(self, now: float) -> int:
        """How many occurrences the window ending at ``now`` counted."""
        return sum(s.total for s in self._live(now))

    def is_empty(self, now: float) -> bool:
        """Whether nothing was counted in the window ending at ``now``."""
        return not self._live(now)

    def entries(self) -> int:
        """The number of counters held over all sub-windows: at most sub_windows * k."""
        return sum(len(s) for s in self._sketches if s is not None)

    def slots(self) -> list[tuple[int, SpaceSaving]]:
        """(epoch, sketch) of every sub-window held, live or not."""
        return [
            (e, s) for e, s in zip(self._epochs, self._sketches, strict=True)
            if e is not None and s is not None
        ]  # fmt: skip

    def _check_compatible(self, other: WindowedSpaceSaving) -> None:
        mine = (self.k, self.sub_window_seconds, self.sub_windows)
        theirs = (other.k, other.sub_window_seconds, other.sub_windows)
        if mine != theirs:
            raise ValueError(f"cannot merge (k, width, sub_windows) {theirs} into {mine}")

    def merge(self, other: WindowedSpaceSaving) -> None:
        """Fold ``other`` (same shape, same clock) in: sub-windows of equal epoch merge.

        Sub-windows older than the window ending in the newest epoch either
        side holds are dropped, as if one process had seen both streams.
        """
        self._check_compatible(other)
        by_epoch: dict[int, list[SpaceSaving]] = {}
        for side in (self, other):
            for e, s in zip(side._epochs, side._sketches, strict=True):
                if e is not None and s is not None:
                    by_epoch.setdefault(e, []).append(s)
        self._epochs = [None] * self.sub_windows
        self._sketches = [None] * self.sub_windows
        self._closed = self._whole = None
        # Only the newest epoch's window: an older epoch would share a ring
        # slot with a newer one, and is outside every later answer anyway.
        newest = max(by_epoch, default=0)
        for epoch in (e for e in by_epoch if e > newest - self.sub_windows):
            parts = by_epoch[epoch]
            slot = epoch % self.sub_windows
            self._epochs[slot] = epoch
            self._sketches[slot] = SpaceSaving.merged(parts, self.k)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for a worker to hand its sketches to the supervisor."""
        return {
            "k": self.k,
            "sub_window_seconds": self.sub_window_seconds,
            "sub_windows": self.sub_windows,
            "slots": [
                {"epoch": e, "sketch": s.to_dict()}
                for e, s in zip(self._epochs, self._sketches, strict=True)
                if e is not None and s is not None
            ],
        }

    def to_json(self) -> str:
        """``to_dict`` as compact JSON, from each sub-window's cached text."""
        slots = ",".join(
            f'{{"epoch":{e},"sketch":{s.to_json()}}}'
            for e, s in zip(self._epochs, self._sketches, strict=True)
            if e is not None and s is not None
        )
        return (
            f'{{"k":{self.k},"sub_window_seconds":{json.dumps(self.sub_window_seconds)},'
            f'"sub_windows":{self.sub_windows},"slots":[{slots}]}}'
        )

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], known: Mapping[tuple[int, int], SpaceSaving] | None = None
    ) -> WindowedSpaceSaving:
        """The windowed sketch ``to_dict`` described; ValueError when malformed.

        ``known``: sub-windows parsed from the same source before, by (epoch,
        total); one found there is taken as it is, not parsed again (a
        sub-window's total rises with every count, so equal means unchanged).
        """
        width = data.get("sub_window_seconds")
        if isinstance(width, bool) or not isinstance(width, int | float):
            raise ValueError(f"sub_window_seconds must be a number, got {width!r}")
        out = cls(
            _int(data.get("k"), "k", minimum=1),
            width,
            _int(data.get("sub_windows"), "sub_windows", minimum=1),
        )
        slots = data.get("slots")
        if not isinstance(slots, list):
            raise ValueError("slots must be a list")
        for entry in slots:
            if not isinstance(entry, Mapping):
                raise ValueError(f"a slot must be an object, got {entry!r}")
            epoch = _int(entry.get("epoch"), "epoch", minimum=None)
            sketch_data = entry.get("sketch")
            if not isinstance(sketch_data, Mapping):
                raise ValueError("a slot's sketch must be an object")
            seen = None if known is None else known.get((epoch, sketch_data.get("total", -1)))
            sketch = seen if seen is not None else SpaceSaving.from_dict(sketch_data)
            if sketch.k != out.k:
                raise ValueError(f"a slot's k={sketch.k} differs from k={out.k}")
            slot = epoch % out.sub_windows
            if out._epochs[slot] is not None:
                raise ValueError(f"two slots fall on ring position {slot}")
            out._epochs[slot] = epoch
            out._sketches[slot] = sketch
        return out


class TopClients:
    """One windowed sketch overall and one per route, at most ``max_routes`` routes.

    Route labels come from the config, so the bound is a guard, not a policy:
    a record for a new route past it counts overall only (and in
    ``routes_overflow``), unless a route with an empty window can make room.
    Memory: at most (max_routes + 1) * (sub_windows + 2) * k counters (with the
    merged answers kept for the next poll).
    """

    __slots__ = (
        "_made_of",
        "_overall",
        "_pending",
        "_pending_since",
        "_routes",
        "k",
        "max_routes",
        "routes_overflow",
        "sub_window_seconds",
        "sub_windows",
        "version",
    )

    def __init__(
        self,
        k: int = 64,
        max_routes: int = 256,
        sub_window_seconds: float = 60.0,
        sub_windows: int = 5,
    ) -> None:
        if max_routes < 0:
            raise ValueError(f"max_routes must be >= 0, got {max_routes}")
        self.k = k
        self.max_routes = max_routes
        self.sub_window_seconds = sub_window_seconds
        self.sub_windows = sub_windows
        self._overall = WindowedSpaceSaving(k, sub_window_seconds, sub_windows)
        self._routes: dict[str, WindowedSpaceSaving] = {}
        # Denials noted but not yet counted (note): counted together, at the
        # first one's time, within NOTE_BATCH_SECONDS and NOTE_BATCH_SIZE.
        self._pending: list[tuple[str, str]] = []
        self._pending_since = 0.0
        # Counts left out of the per-route sketches for want of room, ever.
        self.routes_overflow = 0
        # Raised by every record and merge: a writer skips an unchanged state.
        self.version = 0
        # merged(): the parts each merged sub-window was made of, by (route, epoch).
        self._made_of: dict[
            tuple[str | None, int], tuple[tuple[SpaceSaving, ...], SpaceSaving]
        ] = {}

    @property
    def overall(self) -> WindowedSpaceSaving:
        """The windowed sketch of every route together."""
        self.flush()
        return self._overall

    @property
    def routes(self) -> list[str]:
        """The route labels with a sketch, sorted."""
        self.flush()
        return sorted(self._routes)

    def note(self, client: str, route: str, now: float) -> None:
        """``record(client, now, route)`` for the request path: a list append
        now, the sketches' work once per batch (one Counter over the batch,
        so a flood from one client is one update). A batch is counted at its
        first denial's time: at most NOTE_BATCH_SECONDS early. Every reader
        counts what is pending first."""
        pending = self._pending
        if not pending:
            self._pending_since = now
        elif len(pending) >= NOTE_BATCH_SIZE or now - self._pending_since >= NOTE_BATCH_SECONDS:
            self.flush()
            self._pending_since = now
        pending.append((client, route))
        self.version += 1

    def flush(self) -> None:
        """Count the denials ``note`` kept pending."""
        pending = self._pending
        if not pending:
            return
        batch = Counter(pending)
        pending.clear()
        at = self._pending_since
        for (client, route), count in batch.items():
            self.record(client, at, route, count)

    def _route(self, route: str, now: float) -> WindowedSpaceSaving | None:
        sketch = self._routes.get(route)
        if sketch is not None:
            return sketch
        if len(self._routes) >= self.max_routes:
            # Rare (a new label past the bound), so a scan is affordable here.
            idle = next((r for r, s in self._routes.items() if s.is_empty(now)), None)
            if idle is None:
                return None
            del self._routes[idle]
        sketch = WindowedSpaceSaving(self.k, self.sub_window_seconds, self.sub_windows)
        self._routes[route] = sketch
        return sketch

    def record(self, client: str, now: float, route: str | None = None, count: int = 1) -> None:
        """Count ``count`` denials of ``client`` at ``now``, overall and under ``route``."""
        self.version += 1
        self._overall.record(client, now, count)
        if route is None:
            return
        sketch = self._route(route, now)
        if sketch is None:
            self.routes_overflow += count
        else:
            sketch.record(client, now, count)

    def top(self, n: int, now: float, route: str | None = None) -> list[Entry]:
        """The top ``n`` (client, count, error) overall, or on ``route`` ([] if untracked)."""
        self.flush()
        if route is None:
            return self._overall.top(n, now)
        sketch = self._routes.get(route)
        return [] if sketch is None else sketch.top(n, now)

    def route_window(self, route: str, now: float) -> SpaceSaving | None:
        """``route``'s sketch of the window ending at ``now`` (None: no sketch,
        an empty one when nothing was denied there in the window). Read only:
        it may be a live sub-window's own sketch."""
        self.flush()
        sketch = self._routes.get(route)
        return None if sketch is None else sketch.window(now)

    def entries(self) -> int:
        """The number of counters held, over every sketch."""
        self.flush()
        return self._overall.entries() + sum(s.entries() for s in self._routes.values())

    def merge(self, other: TopClients) -> None:
        """Fold another process's ``TopClients`` (same shape, same clock) into this one.

        Routes new to this side are taken while there is room; the counts of
        the rest go to ``routes_overflow`` (their share of overall is kept).
        """
        self.flush()
        other.flush()
        self.version += 1
        self._overall.merge(other.overall)
        self.routes_overflow += other.routes_overflow
        for route in sorted(other._routes):
            theirs = other._routes[route]
            mine = self._routes.get(route)
            if mine is not None:
                mine.merge(theirs)
            elif len(self._routes) < self.max_routes:
                copy = WindowedSpaceSaving(self.k, self.sub_window_seconds, self.sub_windows)
                copy.merge(theirs)
                self._routes[route] = copy
            else:
                self.routes_overflow += sum(s.total for s in theirs._sketches if s is not None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for a worker to hand its sketches to the supervisor."""
        self.flush()
        return {
            "k": self.k,
            "max_routes": self.max_routes,
            "sub_window_seconds": self.sub_window_seconds,
            "sub_windows": self.sub_windows,
            "routes_overflow": self.routes_overflow,
            "overall": self._overall.to_dict(),
            "routes": {r: s.to_dict() for r, s in self._routes.items()},
        }

    def to_json(self) -> str:
        """``to_dict`` as compact JSON; each sub-window's text is made again
        only after it changed, so a worker's once-a-second write costs the
        current sub-window's sketches, not all of them."""
        self.flush()
        routes = ",".join(f"{json.dumps(r)}:{s.to_json()}" for r, s in self._routes.items())
        return (
            f'{{"k":{self.k},"max_routes":{self.max_routes},'
            f'"sub_window_seconds":{json.dumps(self.sub_window_seconds)},'
            f'"sub_windows":{self.sub_windows},"routes_overflow":{self.routes_overflow},'
            f'"overall":{self._overall.to_json()},"routes":{{{routes}}}}}'
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], known: TopClients | None = None) -> TopClients:
        """The ``TopClients`` that ``to_dict`` described; ValueError when malformed.

        ``known``: what the same source described last time; its sub-windows
        that did not change since are taken as they are, not parsed again.
        """
        overall_data = data.get("overall")
        routes = data.get("routes")
        if not isinstance(overall_data, Mapping) or not isinstance(routes, Mapping):
            raise ValueError("overall and routes must be objects")

        def seen(sketch: WindowedSpaceSaving | None) -> dict[tuple[int, int], SpaceSaving]:
            return {} if sketch is None else {(e, s.total): s for e, s in sketch.slots()}

        overall = WindowedSpaceSaving.from_dict(
            overall_data, seen(None if known is None else known.overall)
        )
        out = cls(
            overall.k,
            _int(data.get("max_routes"), "max_routes"),
            overall.sub_window_seconds,
            overall.sub_windows,
        )
        out._overall = overall
        out.routes_overflow = _int(data.get("routes_overflow"), "routes_overflow")
        if len(routes) > out.max_routes:
            raise ValueError(f"{len(routes)} routes exceed max_routes={out.max_routes}")
        for route, sketch_data in routes.items():
            if not isinstance(route, str) or not isinstance(sketch_data, Mapping):
                raise ValueError(f"route {route!r} must map a label to an object")
            sketch = WindowedSpaceSaving.from_dict(
                sketch_data, seen(None if known is None else known._routes.get(route))
            )
            overall._check_compatible(sketch)
            out._routes[route] = sketch
        return out

    @classmethod
    def merged(
        cls, parts: Sequence[TopClients], previous: TopClients | None = None
    ) -> TopClients:
        """One ``TopClients`` of several processes' (same shape, same clock).

        ``previous``: the answer of the last call with the same sources. A
        merged sub-window whose parts are the same objects as then is taken
        from it, and each window keeps its merge of the closed sub-windows:
        with the sources parsed by ``from_dict(data, known)``, only the
        current sub-window's work is done again. Routes past ``max_routes``
        (by label order) count in ``routes_overflow``.
        """
        out = cls()
        if parts:
            first = parts[0]
            out = cls(first.k, first.max_routes, first.sub_window_seconds, first.sub_windows)
        for part in parts:
            out.overall._check_compatible(part.overall)
        out.routes_overflow = sum(p.routes_overflow for p in parts)
        newest = max((e for p in parts for e, _s in p.overall.slots()), default=0)
        labels = sorted({r for p in parts for r in p._routes})
        kept, dropped = labels[: out.max_routes], labels[out.max_routes :]
        for extra in dropped:
            out.routes_overflow += sum(
                s.total
                for p in parts
                if extra in p._routes
                for _e, s in p._routes[extra].slots()
            )
        old_made_of = {} if previous is None else previous._made_of
        label: str | None
        for label in (None, *kept):
            windows = [
                p.overall if label is None else p._routes[label]
                for p in parts
                if label is None or label in p._routes
            ]
            by_epoch: dict[int, list[SpaceSaving]] = {}
            for window in windows:
                for epoch, sketch in window.slots():
                    if epoch > newest - out.sub_windows:
                        by_epoch.setdefault(epoch, []).append(sketch)
            target = out.overall if label is None else WindowedSpaceSaving(
                out.k, out.sub_window_seconds, out.sub_windows
            )  # fmt: skip
            for epoch, sketches in by_epoch.items():
                made_of = tuple(sketches)
                before = old_made_of.get((label, epoch))
                if (
                    before is not None
                    and len(before[0]) == len(made_of)
                    and all(a is b for a, b in zip(before[0], made_of, strict=True))
                ):
                    merged = before[1]
                elif len(made_of) == 1:
                    merged = made_of[0]
                else:
                    merged = SpaceSaving.merged(made_of, out.k)
                out._made_of[(label, epoch)] = (made_of, merged)
                slot = epoch % out.sub_windows
                target._epochs[slot] = epoch
                target._sketches[slot] = merged
            if previous is not None:
                # Their keys say what they were made of: reused only if still so.
                old = previous.overall if label is None else previous._routes.get(label)
                if old is not None:
                    target._closed, target._whole = old._closed, old._whole
            if label is not None:
                out._routes[label] = target
        return out


def _int(value: object, what: str, minimum: int | None = 0) -> int:
    """``value`` as an int of at least ``minimum``; bool is not an int here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return value
