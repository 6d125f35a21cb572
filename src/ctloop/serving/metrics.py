"""`/metrics`: the server's and the router's counters in the Prometheus text format (prometheus_client),
read from their current values at scrape time."""

from __future__ import annotations

import bisect
from typing import Any

# Seconds: from 5 ms (an instant upstream behind the router) to a minute (a long answer on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Counts of observed values per bucket (upper bounds, inclusive) and their sum: a Prometheus histogram."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations at or below it), +Inf last, as Prometheus lists them."""
        out, total = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


def prometheus_text(serving: Any) -> bytes:
    """The Prometheus text exposition (prometheus_client) of the server's and the router's counters,
    read from their current values at scrape time."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    rows: list[tuple[str, str, float, dict[str, str]]] = []
    for (path, code), count in sorted(serving.requests.items()):
        rows.append(("ctloop_http_requests_total", "counter", count, {"path": path, "code": str(code)}))
    for path, histogram in sorted(serving.latency.items()):  # the histogram's sum, under its older name
        rows.append(("ctloop_http_request_seconds_total", "counter", histogram.sum, {"path": path}))
    roles = serving.roles
    rows.append(("ctloop_champion_version", "gauge", roles.champion or 0, {}))
    rows.append(("ctloop_challenger_version", "gauge", roles.challenger or 0, {}))
    rows.append(("ctloop_role_sync_errors_total", "counter", serving.role_sync.sync_errors, {}))
    for outcome in ("completed", "client_disconnected", "failed"):
        rows.append(("ctloop_streams_total", "counter", serving.streams[outcome], {"outcome": outcome}))
    if serving.router is not None:
        rows += serving.router.metrics()
    if serving.production is not None:
        rows += serving.production.metrics()
    batcher = getattr(serving.backend, "batcher", None)
    if batcher is not None:
        rows += batcher.metrics()

    histograms = [
        ("ctloop_http_request_duration_seconds", "time to the response (a stream: to its headers)", path, h)
        for path, h in sorted(serving.latency.items())
    ]
    histograms.append(
        (
            "ctloop_time_to_first_token_seconds",
            "streamed answers: from the answer's start to its first text",
            "",
            serving.first_token,
        )
    )

    class Snapshot:
        def collect(self):
            for name, documentation, path, histogram in histograms:
                family = HistogramMetricFamily(name, documentation, labels=["path"] if path else [])
                family.add_metric([path] if path else [], histogram.cumulative(), histogram.sum)
                yield family
            families: dict[str, Any] = {}
            for name, kind, value, labels in rows:
                if name not in families:
                    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    families[name] = family(name, name.replace("_", " "), labels=list(labels))
                families[name].add_metric(list(labels.values()), value)
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)
