"""The oracle for gateway/metrics.py: the module as it was before issue 15
(commit 49bd0cf), when every request-path metric was a prometheus_client
child updated per request. Kept unchanged (names, help texts, buckets,
creation order), so tests can drive it and today's module with the same
calls and compare the expositions sample by sample. Not used by the gateway.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

__all__ = ["DECISIONS", "MULTIPROCESS", "Metrics", "RouteMetrics"]

# prometheus_client picks its value store at import from this variable; the
# supervisor sets it before any worker starts (gateway/workers.py).
MULTIPROCESS: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

DECISIONS: Final = (
    "allowed", "denied", "shadow_denied", "unlimited", "exempt", "blocked", "delayed",
)  # fmt: skip
# The label values added since (issues 12 and 13) are data, not the
# implementation under test: taken from the module the oracle is compared with.
from gateway.metrics import REJECT_REASONS, UPSTREAM_ERROR_KINDS  # noqa: E402

# The gateway's own overhead is sub-millisecond; upstream time reaches seconds.
LATENCY_BUCKETS_SECONDS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class RouteMetrics:
    """The children of one route label, bound once."""

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
        self._responses: dict[int, Counter] = {}

    def response(self, status: int) -> Counter:
        child = self._responses.get(status)
        if child is None:
            child = self._metrics.responses.labels(self.label, str(status))
            self._responses[status] = child
        return child


class Metrics:
    """Every metric of the contract on one registry, and what feeds the gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the exposition and do not exist in
        # multiprocess mode: one shape for both.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Rate-limit decisions, by route and outcome.",
            ["route", "decision"],
            registry=r,
        )
        self.responses = Counter(
            "gateway_responses_total",
            "Responses sent to clients, by route and status.",
            ["route", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response finished, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time from upstream request sent to upstream response headers, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a delayed request waited for its reserved tokens, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.tokens_refunded = Counter(
            "gateway_tokens_refunded_total",
            "Requests whose tokens were given back (count_statuses), by route.",
            ["route"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Upstream failures, by route and kind.",
            ["route", "kind"],
            registry=r,
        )
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
        # Added since, as gateway/metrics.py declares them (prometheus_client
        # objects in both): issue 13's connection cap, issue 12's servers.
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
        self.rejected = Counter(
            "gateway_rejected_requests_total",
            "Requests or connections refused for misbehaviour, by reason.",
            ["reason"],
            registry=r,
        )
        self._rejected = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
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
        for gauge, read in self._tracked:
            gauge.set(read())

    def count_rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def count_eviction(self, reason: str) -> None:
        self.evicted[reason].inc()
