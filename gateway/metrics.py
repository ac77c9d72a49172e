"""⑥ Every Prometheus object, named as in CONTRACT.md, on an injected registry.

What a request counts (its decision, response, durations, refunds, upstream
errors, rejections) is kept in plain Python numbers: a ``CountedValue``
holds an int, a ``CountedHistogram`` a list of per-bucket counts and a sum.
``inc``/``observe`` on them is one addition (and a short loop), where
prometheus_client's children take a lock and walk their objects on each
call: the change took a proxied request from 258k to 233k instructions and
a denied one from 160k to 146k (docs/performance.md). A collector
(prometheus_client's public ``Collector`` API) turns them into metric
families at scrape time, so a scrape reads exactly what was counted, under
the same names, labels, types, help texts and buckets, in the same order,
as the prometheus_client objects these replaced. The rest (the gauges, and
counters touched a few times a minute) stay prometheus_client objects.

Label children are bound once per route (``RouteMetrics``), not looked up
per request. No metric is labelled by client.

Multiprocess mode (``workers`` > 1, PROMETHEUS_MULTIPROC_DIR set): the
supervisor sums the workers' mmap'd files, which only prometheus_client's
own children write. Each counted series then has such a child too, created
when the series is (so the files list the same series as before), and
``refresh`` copies what was counted since the last copy into them: once a
second from the refill clock, and once more when the server stops, so a
clean stop loses nothing. The supervisor's /metrics therefore lags a
worker's counts by up to a second (a killed worker's last second is lost).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "DECISIONS",
    "MULTIPROCESS",
    "UPSTREAM_ERROR_KINDS",
    "CountedHistogram",
    "CountedValue",
    "Metrics",
    "PlainCounter",
    "PlainHistogram",
    "RouteMetrics",
]

# prometheus_client picks its value store at import from this variable; the
# supervisor sets it before any worker starts (gateway/workers.py).
MULTIPROCESS: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

DECISIONS: Final = (
    "allowed", "denied", "shadow_denied", "unlimited", "exempt", "blocked", "delayed",
)  # fmt: skip
REJECT_REASONS: Final = (
    "header_timeout", "body_timeout", "headers_too_large", "bad_request",
    "body_too_large", "concurrency", "bad_target", "bad_host", "underscore_header",
    "transfer_coding", "send_timeout", "chunk_extension", "plain_http", "tls_handshake",
)  # fmt: skip
UPSTREAM_ERROR_KINDS: Final = ("connect", "timeout", "reset", "invalid", "busy")
# The gateway's own overhead is sub-millisecond; upstream time reaches seconds.
LATENCY_BUCKETS_SECONDS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


# -- what a request counts: plain numbers --


class CountedValue:
    """One counter series: a plain int, added to on the event loop's thread."""

    __slots__ = ("flushed", "value")

    def __init__(self) -> None:
        self.value = 0
        self.flushed = 0  # what multiprocess mode's file holds already

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class CountedHistogram:
    """One histogram series: the count of each bucket (not cumulative; the
    last one is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "flushed", "flushed_sum", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.flushed = [0] * (len(bounds) + 1)
        self.flushed_sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value: prometheus_client's
        # ``value <= bound`` rule, and its loop. Compiled, a loop over a
        # dozen floats is cheaper than calling bisect (a generic call).
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.sum += value


class PlainCounter:
    """A counter family of ``CountedValue`` series, in creation order."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], CountedValue] = {}
        # Multiprocess mode: the children that write the mmap'd files.
        self._files: Counter | None = None
        self._file_series: dict[tuple[str, ...], Counter] = {}
        if MULTIPROCESS:
            self._files = Counter(name, documentation, self.labelnames, registry=None)

    def labels(self, *values: str) -> CountedValue:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = CountedValue()
            if self._files is not None:
                self._file_series[values] = self._files.labels(*values)
        return series

    def family(self, *, samples: bool = True) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if samples:
            for values, series in list(self.series.items()):
                family.add_metric(values, float(series.value))
        return family

    def flush(self) -> None:
        for values, child in self._file_series.items():
            series = self.series[values]
            added = series.value - series.flushed
            if added:
                child.inc(added)
                series.flushed += added


class PlainHistogram:
    """A histogram family of ``CountedHistogram`` series, in creation order."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: tuple[float, ...],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = buckets
        # The ``le`` values prometheus_client's Histogram shows.
        self._bucket_names: list[str] = [
            floatToGoString(b)  # type: ignore[no-untyped-call]
            for b in buckets
        ] + ["+Inf"]
        self.series: dict[tuple[str, ...], CountedHistogram] = {}
        self._files: Histogram | None = None
        self._file_series: dict[tuple[str, ...], Histogram] = {}
        if MULTIPROCESS:
            self._files = Histogram(
                name, documentation, self.labelnames, registry=None, buckets=buckets
            )

    def labels(self, *values: str) -> CountedHistogram:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = CountedHistogram(self.buckets)
            if self._files is not None:
                self._file_series[values] = self._files.labels(*values)
        return series

    def family(self, *, samples: bool = True) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if samples:
            names = self._bucket_names
            for values, series in list(self.series.items()):
                total = 0
                cumulative = []
                for name, count in zip(names, series.counts, strict=True):
                    total += count
                    cumulative.append((name, float(total)))
                family.add_metric(values, cumulative, series.sum)
        return family

    def flush(self) -> None:
        for values, child in self._file_series.items():
            series = self.series[values]
            if series.sum == series.flushed_sum and series.counts == series.flushed:
                continue
            # prometheus_client has no public call that adds n observations
            # to a bucket; its child keeps one value per bucket and one for
            # the sum (``_buckets``/``_sum``, the same in every release that
            # has multiprocess mode). Counts are added (exact in a float up
            # to 2**53); the sum is written whole, so the file holds the
            # very float summed here, not a sum of differences.
            buckets = child._buckets
            for index, count in enumerate(series.counts):
                added = count - series.flushed[index]
                if added:
                    buckets[index].inc(added)
                    series.flushed[index] = count
            child._sum.set(series.sum)
            series.flushed_sum = series.sum


PlainFamily = PlainCounter | PlainHistogram


class _Counted(Collector):
    """What a scrape of ``families`` reads: their series as they are now."""

    def __init__(self, families: Sequence[PlainFamily]) -> None:
        self.families = families

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for family in self.families:
            yield family.family()

    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        # Names only: lets the registry refuse a second metric of one name.
        for family in self.families:
            yield family.family(samples=False)


class RouteMetrics:
    """The series of one route label, bound once."""

    __slots__ = ("_metrics", "_responses", "decisions", "duration", "label", "queue_wait",
                 "refunded", "upstream_duration", "upstream_errors")  # fmt: skip

    def __init__(self, metrics: Metrics, label: str) -> None:
        self._metrics = metrics
        self.label = label
        self.decisions = {d: metrics.requests.labels(label, d) for d in DECISIONS}
        self.duration = metrics.request_duration.labels(label)
        self.upstream_duration = metrics.upstream_duration.labels(label)
        self.queue_wait = metrics.queue_wait.labels(label)
        self.refunded = metrics.tokens_refunded.labels(label)
        self.upstream_errors = {
            k: metrics.upstream_errors.labels(label, k) for k in UPSTREAM_ERROR_KINDS
        }
        self._responses: dict[int, CountedValue] = {}

    def response(self, status: int) -> CountedValue:
        series = self._responses.get(status)
        if series is None:
            series = self._metrics.responses.labels(self.label, str(status))
            self._responses[status] = series
        return series


class Metrics:
    """Every metric of the contract on one registry, and what feeds the gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the exposition and do not exist in
        # multiprocess mode: one shape for both.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = PlainCounter(
            "gateway_requests_total",
            "Rate-limit decisions, by route and outcome.",
            ["route", "decision"],
        )
        self.responses = PlainCounter(
            "gateway_responses_total",
            "Responses sent to clients, by route and status.",
            ["route", "code"],
        )
        self.request_duration = PlainHistogram(
            "gateway_request_duration_seconds",
            "Time from request received to response finished, by route.",
            ["route"],
            LATENCY_BUCKETS_SECONDS,
        )
        self.upstream_duration = PlainHistogram(
            "gateway_upstream_duration_seconds",
            "Time from upstream request sent to upstream response headers, by route.",
            ["route"],
            LATENCY_BUCKETS_SECONDS,
        )
        self.queue_wait = PlainHistogram(
            "gateway_queue_wait_seconds",
            "Time a delayed request waited for its reserved tokens, by route.",
            ["route"],
            LATENCY_BUCKETS_SECONDS,
        )
        self.tokens_refunded = PlainCounter(
            "gateway_tokens_refunded_total",
            "Requests whose tokens were given back (count_statuses), by route.",
            ["route"],
        )
        self.upstream_errors = PlainCounter(
            "gateway_upstream_errors_total",
            "Upstream failures, by route and kind.",
            ["route", "kind"],
        )
        # Registered here, in the place of the objects they replaced: the
        # exposition keeps its order.
        per_route: list[PlainFamily] = [
            self.requests, self.responses, self.request_duration, self.upstream_duration,
            self.queue_wait, self.tokens_refunded, self.upstream_errors,
        ]  # fmt: skip
        r.register(_Counted(per_route))
        # multiprocess_mode only matters with workers (PROMETHEUS_MULTIPROC_DIR):
        # one /metrics then sums the live workers' values.
        self.clients_tracked = Gauge(
            "gateway_clients_tracked",
            "Buckets held in memory.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.clients_evicted = Counter(
            "gateway_clients_evicted_total",
            "Buckets forgotten: idle = full (nothing lost), pressure = at max_tracked.",
            ["reason"],
            registry=r,
        )
        self.evicted = {
            reason: self.clients_evicted.labels(reason) for reason in ("idle", "pressure")
        }
        self.access_log_queue_depth = Gauge(
            "gateway_access_log_queue_depth",
            "Access-log records waiting to be written.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.access_log_dropped = Counter(
            "gateway_access_log_dropped_total",
            "Access-log records dropped because the queue was full.",
            registry=r,
        )
        self.storage_errors = Counter(
            "gateway_storage_errors_total",
            "Bucket storage failures, by backend.",
            ["backend"],
            registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads, by result.",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.inflight = Gauge(
            "gateway_inflight_requests",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Not in the contract's table (additions): the listener's connection
        # cap, server.max_connections.
        self.open_connections = Gauge(
            "gateway_open_connections",
            "Client connections open on the proxy listener.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_capped = Counter(
            "gateway_connections_capped_total",
            "Times the proxy listener stopped accepting at server.max_connections.",
            registry=r,
        )
        # Set at scrape time from each server's health (Metrics.track); under
        # workers, 1 while any live worker has the server in rotation.
        self.upstream_server_up = Gauge(
            "gateway_upstream_server_up",
            "1 while an upstream server is in rotation, 0 while marked down.",
            ["upstream", "server"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.workers_restarted = Counter(
            "gateway_workers_restarted_total",
            "Worker processes restarted after dying.",
            registry=r,
        )
        # Not in the contract's table (an addition): requests refused before
        # they reached the limiter, by what was wrong with them.
        self.rejected = PlainCounter(
            "gateway_rejected_requests_total",
            "Requests or connections refused for misbehaviour, by reason.",
            ["reason"],
        )
        r.register(_Counted([self.rejected]))
        self._rejected = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        self._counted = [*per_route, self.rejected]
        self._routes: dict[str, RouteMetrics] = {}
        self._tracked: list[tuple[Gauge, Callable[[], float]]] = []

    def route(self, label: str) -> RouteMetrics:
        """The bound children for ``label``; created on first use and kept
        (route labels come from the config, so they are few)."""
        metrics = self._routes.get(label)
        if metrics is None:
            metrics = RouteMetrics(self, label)
            self._routes[label] = metrics
        return metrics

    def track(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Keep ``gauge`` equal to ``read()`` at no per-request cost: read at
        scrape time, or (multiprocess mode, where set_function cannot reach
        the parent's scrape) copied once a second by ``refresh``."""
        if MULTIPROCESS:
            self._tracked.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh(self, _seconds: int = 0) -> None:
        """Multiprocess mode: copy the tracked gauges and what was counted
        into the files the supervisor sums. Called once a second and when
        the server stops; nothing to do otherwise."""
        for gauge, read in self._tracked:
            gauge.set(read())
        if MULTIPROCESS:
            for family in self._counted:
                family.flush()

    def count_rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def count_eviction(self, reason: str) -> None:
        self.evicted[reason].inc()
