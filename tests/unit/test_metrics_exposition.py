"""gateway/metrics.py against its oracle (tests/reference_metrics.py, the
prometheus_client children it replaced): the same calls, in the API the
request core uses, must give the same exposition, byte for byte, in both text
formats; and in multiprocess mode the same files, as the supervisor sums
them, once the plain counts are copied in (``refresh``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as plain
from tests import reference_metrics as reference

REPO = Path(__file__).resolve().parents[2]
ROUTES = ("default", "/api", '/we"ird\\route')
STATUSES = (200, 204, 404, 429, 499, 502, 504)
BOUNDS = plain.LATENCY_BUCKETS_SECONDS
# Every bucket's edge and the floats either side of it, zero, and the +Inf bucket.
EDGES = sorted(
    {0.0, 31.0, 1e6}
    | set(BOUNDS)
    | {math.nextafter(b, 0.0) for b in BOUNDS}
    | {math.nextafter(b, math.inf) for b in BOUNDS}
)
seconds = st.sampled_from(EDGES) | st.floats(0.0, 40.0, allow_nan=False)

Op = tuple[Any, ...]
operations = st.one_of(
    st.tuples(st.just("route"), st.sampled_from(ROUTES)),
    st.tuples(st.just("decision"), st.sampled_from(ROUTES), st.sampled_from(plain.DECISIONS)),
    st.tuples(st.just("response"), st.sampled_from(ROUTES), st.sampled_from(STATUSES)),
    st.tuples(
        st.just("observe"),
        st.sampled_from(ROUTES),
        st.sampled_from(("duration", "upstream_duration", "queue_wait")),
        seconds,
    ),
    st.tuples(st.just("refunded"), st.sampled_from(ROUTES)),
    st.tuples(
        st.just("upstream_error"),
        st.sampled_from(ROUTES),
        st.sampled_from(plain.UPSTREAM_ERROR_KINDS),
    ),
    st.tuples(st.just("rejected"), st.sampled_from(plain.REJECT_REASONS)),
    st.tuples(st.just("evicted"), st.sampled_from(("idle", "pressure"))),
    st.tuples(st.just("refresh")),
)


def apply(metrics: Any, ops: list[Op]) -> None:
    """``ops`` through the calls gateway/core.py makes (either module)."""
    for op in ops:
        kind = op[0]
        if kind == "route":
            metrics.route(op[1])
        elif kind == "decision":
            metrics.route(op[1]).decisions[op[2]].inc()
        elif kind == "response":
            metrics.route(op[1]).response(op[2]).inc()
        elif kind == "observe":
            getattr(metrics.route(op[1]), op[2]).observe(op[3])
        elif kind == "refunded":
            metrics.route(op[1]).refunded.inc()
        elif kind == "upstream_error":
            metrics.route(op[1]).upstream_errors[op[2]].inc()
        elif kind == "rejected":
            metrics.count_rejected(op[1])
        elif kind == "evicted":
            metrics.count_eviction(op[1])
        else:
            metrics.refresh()


def expositions(registry: CollectorRegistry) -> tuple[str, str]:
    return generate_latest(registry).decode(), generate_openmetrics(registry).decode()


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, max_size=60))
def test_the_same_calls_give_the_same_exposition(ops: list[Op]) -> None:
    old, new = reference.Metrics(CollectorRegistry()), plain.Metrics(CollectorRegistry())
    apply(old, ops)
    apply(new, ops)
    assert expositions(new.registry) == expositions(old.registry)


def test_a_realistic_mix_gives_the_same_exposition_and_reads_back() -> None:
    """Enough traffic that every family and bucket holds something; what a
    scrape reads back (get_sample_value) is exactly what was counted."""
    ops: list[Op] = []
    for i in range(3000):
        route = ROUTES[i % 2]
        ops.append(("decision", route, "denied" if i % 7 == 0 else "allowed"))
        ops.append(("response", route, 429 if i % 7 == 0 else 200))
        ops.append(("observe", route, "duration", (i % 97) * 0.0003))
        ops.append(("observe", route, "upstream_duration", EDGES[i % len(EDGES)]))
        if i % 50 == 0:
            ops += [("upstream_error", route, "timeout"), ("rejected", "bad_host")]
    old, new = reference.Metrics(CollectorRegistry()), plain.Metrics(CollectorRegistry())
    apply(old, ops)
    apply(new, ops)
    text, openmetrics = expositions(new.registry)
    assert (text, openmetrics) == expositions(old.registry)
    read = new.registry.get_sample_value
    assert read("gateway_requests_total", {"route": "/api", "decision": "allowed"}) == 1286
    assert read("gateway_request_duration_seconds_count", {"route": "default"}) == 1500
    assert read("gateway_rejected_requests_total", {"reason": "bad_host"}) == 60
    assert 'gateway_request_duration_seconds_bucket{le="0.0005",route="default"}' in text


# -- multiprocess mode: what the supervisor sums --------------------------------------

# Run in a fresh interpreter: prometheus_client picks its value store at import.
DRIVER = """
import json, sys
from prometheus_client import CollectorRegistry
if sys.argv[1] == "reference":
    from tests import reference_metrics as module
else:
    from gateway import metrics as module
from tests.unit.test_metrics_exposition import apply
assert module.MULTIPROCESS
metrics = module.Metrics(CollectorRegistry())
apply(metrics, [tuple(op) for op in json.load(sys.stdin)])
"""


def summed_files(kind: str, ops: list[Op], directory: Path) -> str:
    """What a supervisor's /metrics shows after one worker ran ``ops`` with
    ``kind``'s module and exited."""
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", DRIVER, kind],
        input=json.dumps(ops), text=True, env=env, cwd=REPO, check=True, timeout=60,
    )  # fmt: skip
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry).decode()


Family = tuple[str, str, str, list[tuple[str, list[tuple[str, str]], float]]]


def canonical(text: str) -> list[Family]:
    """Every family with its samples, sorted: the order of a multiprocess
    exposition follows the files' names (the pids), so it differs between
    any two runs, old or new."""
    return sorted(
        (
            family.name,
            family.type,
            family.documentation,
            sorted((s.name, sorted(s.labels.items()), s.value) for s in family.samples),
        )
        for family in text_string_to_metric_families(text)
    )


def test_multiprocess_files_sum_to_the_same_exposition(tmp_path: Path) -> None:
    """Counts copied in at several refreshes (as the clock does once a
    second) and a last one (as a stopping server does) add up in the files
    exactly as per-request updates of prometheus_client's children did."""
    ops: list[Op] = [("route", "/api")]
    for i in range(400):
        route = ROUTES[i % 3]
        ops.append(("decision", route, plain.DECISIONS[i % 7]))
        ops.append(("response", route, STATUSES[i % 7]))
        ops.append(("observe", route, "duration", EDGES[i % len(EDGES)]))
        ops.append(("observe", route, "queue_wait", i * 0.001))
        if i % 9 == 0:
            ops += [("refunded", route), ("upstream_error", route, "reset")]
            ops += [("rejected", "concurrency"), ("evicted", "idle")]
        if i % 100 == 99:
            ops.append(("refresh",))
    ops.append(("decision", "late", "allowed"))  # a series first seen after a refresh
    ops.append(("refresh",))
    old = summed_files("reference", ops, tmp_path / "reference")
    new = summed_files("plain", ops, tmp_path / "plain")
    assert canonical(new) == canonical(old)
    assert 'gateway_requests_total{decision="allowed",route="late"} 1.0' in new
    assert 'gateway_request_duration_seconds_count{route="/api"} 133.0' in new


def test_multiprocess_files_hold_only_what_was_copied_in(tmp_path: Path) -> None:
    """Counts reach the files at ``refresh``, not per request; a series is
    listed (at 0) from its creation, as before."""
    ops: list[Op] = [("decision", "default", "allowed")]
    exposition = summed_files("plain", ops, tmp_path / "no-refresh")
    assert 'gateway_requests_total{decision="allowed",route="default"} 0.0' in exposition
    assert 'gateway_requests_total{decision="denied",route="default"} 0.0' in exposition
