"""The top-clients sketch: Space-Saving's guarantees, window rotation, merging, fixed memory.

Every property is checked against an exact count of the same stream, by
``_check``; ``test_the_check_catches_a_wrong_answer`` shows that it fails on
a wrong one. Time is an argument everywhere: no test sleeps.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.top_clients import (
    NOTE_BATCH_SIZE,
    Entry,
    SpaceSaving,
    TopClients,
    WindowedSpaceSaving,
)

# A skewed alphabet: a few clients come often, many rarely, so sketches of a
# small k both hold heavy hitters and evict.
_clients = st.one_of(
    st.sampled_from(["a", "b", "c"]),
    st.integers(min_value=0, max_value=40).map(lambda i: f"c{i}"),
)
_streams = st.lists(st.tuples(_clients, st.integers(min_value=1, max_value=5)), max_size=300)
_ks = st.integers(min_value=1, max_value=12)


def _truth(stream: list[tuple[str, int]]) -> Counter[str]:
    truth: Counter[str] = Counter()
    for client, count in stream:
        truth[client] += count
    return truth


def _check(entries: list[Entry], truth: Counter[str], k: int, total: int) -> None:
    """Space-Saving's promises for one answer (``entries``: everything held)."""
    assert len(entries) <= k
    assert total == sum(truth.values())
    reported = {client: (count, error) for client, count, error in entries}
    assert len(reported) == len(entries)
    for client, (count, error) in reported.items():
        assert count >= truth[client], f"{client} under-estimated"
        assert count - error <= truth[client], f"{client} over by more than its error"
        assert 0 <= error <= count
    for client, true_count in truth.items():
        if true_count * k > total:
            assert client in reported, f"heavy hitter {client} ({true_count}/{total}) missing"


def _sketch(stream: list[tuple[str, int]], k: int) -> SpaceSaving:
    sketch = SpaceSaving(k)
    for client, count in stream:
        sketch.add(client, count)
    return sketch


def test_the_check_catches_a_wrong_answer() -> None:
    truth = Counter({"a": 10, "b": 1})
    _check([("a", 10, 0), ("b", 1, 0)], truth, 2, 11)
    with pytest.raises(AssertionError, match="under-estimated"):
        _check([("a", 9, 0)], truth, 2, 11)
    with pytest.raises(AssertionError, match="over by more"):
        _check([("a", 12, 1)], truth, 2, 11)
    with pytest.raises(AssertionError, match="heavy hitter"):
        _check([("b", 1, 0)], truth, 2, 11)


def test_exact_until_full_then_the_newcomer_inherits_the_smallest_count() -> None:
    sketch = SpaceSaving(2)
    sketch.add("a", 3)
    sketch.add("b")
    assert sketch.top(5) == [("a", 3, 0), ("b", 1, 0)]
    assert sketch.floor == 1
    sketch.add("c", 2)  # evicts b (1): c may have been b's 1 all along
    assert sketch.top(5) == [("a", 3, 0), ("c", 3, 1)]
    assert sketch.estimate("b") == (3, 3)  # b is no longer held: up to the floor
    assert sketch.estimate("a") == (3, 0)
    assert sketch.total == 6
    assert sketch.top(1) == [("a", 3, 0)]
    assert sketch.top(0) == []


def test_a_lagging_heap_entry_is_not_taken_for_the_smallest() -> None:
    # a is raised in the dict only; the next newcomer must evict b, not a.
    sketch = SpaceSaving(2)
    sketch.add("a")
    sketch.add("b", 2)
    sketch.add("a", 5)
    sketch.add("c")
    assert dict((c, n) for c, n, _ in sketch.top(2)) == {"a": 6, "c": 3}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="k must be"):
        SpaceSaving(0)
    with pytest.raises(ValueError, match="count must be"):
        SpaceSaving(2).add("a", 0)
    with pytest.raises(ValueError, match="cannot merge"):
        SpaceSaving(2).merge(SpaceSaving(3))
    with pytest.raises(ValueError, match="sub_window_seconds"):
        WindowedSpaceSaving(2, 0.0)


@settings(deadline=None, max_examples=300)
@given(_streams, _ks)
def test_space_saving_keeps_its_promises(stream: list[tuple[str, int]], k: int) -> None:
    sketch = _sketch(stream, k)
    _check(sketch.entries(), _truth(stream), k, sketch.total)
    # The counters add up to the total: why the floor is <= total/k.
    assert sum(n for _, n, _ in sketch.entries()) == sketch.total
    assert len(sketch._heap) == len(sketch) <= k


@settings(deadline=None, max_examples=200)
@given(st.lists(_streams, min_size=1, max_size=4), _ks)
def test_merged_sketches_keep_the_promises_of_the_whole_stream(
    parts: list[list[tuple[str, int]]], k: int
) -> None:
    sketches = [_sketch(part, k) for part in parts]
    whole = [event for part in parts for event in part]
    merged = SpaceSaving.merged(sketches, k)
    _check(merged.entries(), _truth(whole), k, merged.total)
    # And pairwise in place, as a supervisor folding in one worker at a time.
    folded = SpaceSaving(k)
    for sketch in sketches:
        folded.merge(sketch)
    _check(folded.entries(), _truth(whole), k, folded.total)
    # A merged sketch keeps counting correctly afterwards.
    folded.add("late", 1)
    _check(folded.entries(), _truth([*whole, ("late", 1)]), k, folded.total)


def test_merge_counts_a_dropped_client_at_the_other_sides_floor() -> None:
    # x was counted twice by `left` and then dropped there; summing 0 for it
    # would report 5 while the truth is 7.
    left = SpaceSaving(1)
    left.add("x", 2)
    left.add("y", 3)  # evicts x: left holds y=5 (error 2), floor 5
    right = SpaceSaving(1)
    right.add("x", 5)
    merged = SpaceSaving.merged([left, right], 1)
    [(client, count, error)] = merged.entries()
    truth = Counter({"x": 7, "y": 3})
    _check(merged.entries(), truth, 1, merged.total)
    assert (client, count) in {("x", 10), ("y", 10)}
    assert error >= 3


@settings(deadline=None, max_examples=100)
@given(_streams, _ks)
def test_a_sketch_survives_json(stream: list[tuple[str, int]], k: int) -> None:
    sketch = _sketch(stream, k)
    again = SpaceSaving.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert again.entries() == sketch.entries()
    assert again.total == sketch.total
    assert again.floor == sketch.floor
    # The heap was rebuilt: the next eviction picks the same victim.
    sketch.add("zz-new")
    again.add("zz-new")
    assert again.entries() == sketch.entries()


@pytest.mark.parametrize(
    "data",
    [
        {"k": 0, "total": 0, "items": []},
        {"k": 1, "total": 2, "items": [["a", 1, 0], ["b", 1, 0]]},
        {"k": 2, "total": 1, "items": [["a", 1, 2]]},
        {"k": 2, "total": 1, "items": [["a", 2, 0]]},
        {"k": 2, "total": 2, "items": [["a", 1, 0], ["a", 1, 0]]},
        {"k": 2, "total": 1, "items": [[1, 1, 0]]},
        {"k": True, "total": 1, "items": []},
    ],
)
def test_malformed_sketch_data_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        SpaceSaving.from_dict(data)


def test_counts_older_than_the_window_drop_off() -> None:
    window = WindowedSpaceSaving(k=4, sub_window_seconds=60.0, sub_windows=5)
    window.record("old", now=10.0, count=3)
    window.record("new", now=250.0)
    # At 299 s the window still reaches back into the sub-window [0, 60).
    assert window.top(10, now=299.0) == [("old", 3, 0), ("new", 1, 0)]
    assert window.total(299.0) == 4
    # At 300 s the [0, 60) sub-window has left: old is gone, new stays.
    assert window.top(10, now=300.0) == [("new", 1, 0)]
    assert window.total(300.0) == 1
    assert window.top(10, now=600.0) == []
    assert window.is_empty(600.0)
    # The slot of [0, 60) is reused for [300, 360): old's counts do not come back.
    window.record("newest", now=301.0)
    assert window.top(10, now=301.0) == [("new", 1, 0), ("newest", 1, 0)]
    # An update for a sub-window that has rotated out is dropped.
    window.record("late", now=5.0)
    assert [c for c, _, _ in window.top(10, now=301.0)] == ["new", "newest"]


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=900), _clients, st.integers(1, 3)),
        max_size=200,
    ),
    _ks,
    st.floats(min_value=0, max_value=1000),
)
def test_windowed_promises_hold_over_the_live_window(
    events: list[tuple[float, str, int]], k: int, query_offset: float
) -> None:
    # The caller's clock is monotonic: events in time order.
    events.sort(key=lambda e: e[0])
    window = WindowedSpaceSaving(k, sub_window_seconds=60.0, sub_windows=5)
    for now, client, count in events:
        window.record(client, now, count)
    now = (events[-1][0] if events else 0.0) + query_offset
    epoch = int(now // 60.0)
    live = [(c, n) for t, c, n in events if epoch - 5 < int(t // 60.0) <= epoch]
    truth = _truth(live)
    entries = window.top(k, now)
    _check(entries, truth, k, window.total(now))
    # Nothing counted only outside the window is reported.
    assert {c for c, _, _ in entries} <= set(truth)
    assert window.entries() <= 5 * k


@settings(deadline=None, max_examples=100)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 600), _clients, st.integers(1, 3)),
            max_size=100,
        ),
        min_size=1,
        max_size=3,
    ),
    _ks,
)
def test_windowed_sketches_of_several_workers_merge(
    workers: list[list[tuple[int, str, int]]], k: int
) -> None:
    sketches = []
    for events in workers:
        events.sort(key=lambda e: e[0])
        sketch = WindowedSpaceSaving(k)
        for second, client, count in events:
            sketch.record(client, float(second), count)
        # Through JSON, as a worker hands it to the supervisor.
        sketches.append(WindowedSpaceSaving.from_dict(json.loads(json.dumps(sketch.to_dict()))))
    merged = WindowedSpaceSaving(k)
    for sketch in sketches:
        merged.merge(sketch)
    # At 600 s (sub-window 10) the window is sub-windows 6..10 of every worker.
    live = [(c, n) for events in workers for t, c, n in events if 5 < t // 60 <= 10]
    entries = merged.top(k, 600.0)
    _check(entries, _truth(live), k, merged.total(600.0))
    assert merged.entries() <= 5 * k


def test_a_million_one_off_clients_do_not_grow_memory() -> None:
    k = 32
    window = WindowedSpaceSaving(k, sub_window_seconds=60.0, sub_windows=5)
    record = window.record
    # 200,000 per sub-window, across all five: every slot fills and evicts.
    for i in range(1_000_000):
        record(f"c{i}", i * 0.0003)
    record("heavy", 299.0, 500_000)
    assert window.entries() == 5 * k
    for part in window._sketches:
        assert part is not None
        assert len(part) == len(part._heap) == len(part._errors) == k
    # The one heavy client is still found among a million others.
    assert window.top(1, 299.0)[0][0] == "heavy"
    assert window.total(299.0) == 1_500_000


def test_top_clients_keeps_routes_apart_and_bounded() -> None:
    top = TopClients(k=4, max_routes=2)
    top.record("a", 0.0, "r1", 5)
    top.record("b", 0.0, "r2", 3)
    top.record("c", 0.0, "r3", 7)  # no room: overall only
    top.record("d", 0.0)
    assert top.routes == ["r1", "r2"]
    assert top.routes_overflow == 7
    assert top.top(1, 0.0, route="r1") == [("a", 5, 0)]
    assert top.top(1, 0.0, route="r2") == [("b", 3, 0)]
    assert top.top(5, 0.0, route="r3") == []
    assert top.top(5, 0.0) == [("c", 7, 0), ("a", 5, 0), ("b", 3, 0), ("d", 1, 0)]
    # Once r1's window is empty, its place can go to a new route.
    top.record("e", 400.0, "r2")
    top.record("f", 400.0, "r3")
    assert top.routes == ["r2", "r3"]
    assert top.top(5, 400.0, route="r3") == [("f", 1, 0)]


def test_top_clients_of_two_workers_merge_through_json() -> None:
    one = TopClients(k=4, max_routes=2)
    two = TopClients(k=4, max_routes=2)
    one.record("a", 10.0, "r1", 4)
    two.record("a", 20.0, "r1", 2)
    two.record("b", 20.0, "r2", 3)
    two.record("c", 20.0, "r3", 1)  # overflow on two
    merged = TopClients.from_dict(json.loads(json.dumps(one.to_dict())))
    merged.merge(TopClients.from_dict(json.loads(json.dumps(two.to_dict()))))
    assert merged.top(5, 30.0) == [("a", 6, 0), ("b", 3, 0), ("c", 1, 0)]
    assert merged.top(5, 30.0, route="r1") == [("a", 6, 0)]
    assert merged.top(5, 30.0, route="r2") == [("b", 3, 0)]
    assert merged.routes_overflow == 1
    third = TopClients(k=4, max_routes=2)
    third.record("z", 20.0, "r9", 2)
    merged.merge(third)  # no room for r9 on the merged side
    assert merged.routes == ["r1", "r2"]
    assert merged.routes_overflow == 3
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(TopClients(k=5, max_routes=2))


def _sorted_items(data: object) -> object:
    """``data`` with every sketch's items in one order (to_json leaves them unsorted)."""
    if isinstance(data, dict):
        return {k: sorted(v) if k == "items" else _sorted_items(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_sorted_items(v) for v in data]
    return data


_records = st.lists(
    st.tuples(
        _clients,
        st.floats(min_value=0.0, max_value=900.0),
        st.sampled_from(["/a", "/b", "default", 'q"uote']),
    ),
    max_size=120,
)


@settings(deadline=None, max_examples=60)
@given(_records, _records)
def test_to_json_is_to_dict_and_its_cache_follows_every_change(
    first: list[tuple[str, float, str]], then: list[tuple[str, float, str]]
) -> None:
    top = TopClients(k=3, max_routes=3, sub_window_seconds=60.0, sub_windows=5)
    for records in (first, then):
        # A monotonic clock, as the gateway's.
        for client, now, route in sorted(records, key=lambda r: r[1]):
            top.record(client, now, route)
        text = top.to_json()
        assert _sorted_items(json.loads(text)) == _sorted_items(top.to_dict())
        again = TopClients.from_dict(json.loads(text))
        assert _sorted_items(again.to_dict()) == _sorted_items(top.to_dict())


def test_version_counts_changes_and_route_window_reads_one_route() -> None:
    top = TopClients(k=2, max_routes=4)
    assert top.version == 0
    top.record("a", 10.0, "/r")
    top.record("a", 11.0, "/r")
    top.record("b", 70.0, "/s")
    assert top.version == 3
    other = TopClients(k=2, max_routes=4)
    top.merge(other)
    assert top.version == 4
    window = top.route_window("/r", 100.0)
    assert window is not None
    assert "a" in window
    assert "b" not in window
    assert (window.total, window.estimate("a")) == (2, (2, 0))
    assert top.route_window("/nowhere", 100.0) is None
    # Five minutes later /r's window is empty, but the route keeps its sketch.
    late = top.route_window("/r", 400.0)
    assert late is not None
    assert late.total == 0


def test_a_merge_drops_the_cached_json() -> None:
    one, two = SpaceSaving(2), SpaceSaving(2)
    one.add("a", 3)
    before = one.to_json()
    two.add("b")
    one.merge(two)
    assert one.to_json() != before
    assert _sorted_items(json.loads(one.to_json())) == _sorted_items(one.to_dict())


@settings(deadline=None, max_examples=100)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=900), _clients, st.integers(1, 3)),
        max_size=80,
    ),
    _ks,
)
def test_the_window_asked_again_and_again_keeps_the_promises(
    events: list[tuple[float, str, int]], k: int
) -> None:
    """``window`` reuses its merge of the closed sub-windows between polls;
    asked after every record, as a dashboard polls, every answer still holds."""
    events.sort(key=lambda e: e[0])
    window = WindowedSpaceSaving(k, sub_window_seconds=60.0, sub_windows=5)
    for i, (now, client, count) in enumerate(events):
        window.record(client, now, count)
        epoch = int(now // 60.0)
        live = [(c, n) for t, c, n in events[: i + 1] if epoch - 5 < int(t // 60.0) <= epoch]
        answer = window.window(now)
        _check(answer.entries(), _truth(live), k, window.total(now))
        assert answer.total == window.total(now)
        # The same answer as a copy that has cached nothing yet.
        fresh = WindowedSpaceSaving.from_dict(window.to_dict())
        assert answer.entries() == fresh.window(now).entries()


def test_merged_parts_keep_routes_within_the_bound() -> None:
    one, two = TopClients(k=4, max_routes=2), TopClients(k=4, max_routes=2)
    one.record("a", 10.0, "r1", 4)
    two.record("a", 20.0, "r1", 2)
    two.record("b", 20.0, "r2", 3)
    one.record("c", 20.0, "r3", 1)
    merged = TopClients.merged([one, two])
    assert merged.top(5, 30.0) == [("a", 6, 0), ("b", 3, 0), ("c", 1, 0)]
    assert merged.routes == ["r1", "r2"]
    assert merged.top(5, 30.0, route="r1") == [("a", 6, 0)]
    assert merged.routes_overflow == 1  # r3, past max_routes
    assert TopClients.merged([]).top(5, 30.0) == []
    with pytest.raises(ValueError, match="cannot merge"):
        TopClients.merged([one, TopClients(k=5)])


# -- note(): the request path's batched record --


def test_noted_denials_are_counted_by_every_reader() -> None:
    top = TopClients(k=8)
    for _ in range(3):
        top.note("a", "/api", 10.0)
    top.note("b", "/login", 10.2)
    assert top.top(5, 10.5) == [("a", 3, 0), ("b", 1, 0)]
    assert top.top(5, 10.5, route="/api") == [("a", 3, 0)]
    assert top.routes == ["/api", "/login"]


def test_a_batch_is_counted_at_its_first_denials_time_and_within_a_second() -> None:
    top = TopClients(k=8, sub_window_seconds=60.0, sub_windows=5)
    top.note("old", "/api", 59.5)
    top.note("new", "/api", 60.6)  # past NOTE_BATCH_SECONDS: the first batch is counted at 59.5
    # At 300.5 the window (sub-windows 1-5 of 60 s) no longer holds 59.5, but holds 60.6.
    assert [client for client, _, _ in top.top(5, 300.5)] == ["new"]


def test_a_flood_keeps_the_pending_list_bounded_and_counts_every_denial() -> None:
    top = TopClients(k=8)
    for i in range(5000):
        top.note("flood", "/api", 100.0 + i * 1e-6)
        assert len(top._pending) <= NOTE_BATCH_SIZE
    assert top.top(1, 101.0) == [("flood", 5000, 0)]


def test_note_changes_the_version_a_writer_watches() -> None:
    top = TopClients(k=8)
    before = top.version
    top.note("a", "/api", 1.0)
    assert top.version != before
    assert '"a"' in top.to_json()
