"""`/metrics`: the server's and the router's counters in the Prometheus text format (prometheus_client),
read from their current values at scrape time."""

from __future__ import annotations

from typing import Any


def prometheus_text(serving: Any) -> bytes:
    """The Prometheus text exposition (prometheus_client) of the server's and the router's counters,
    read from their current values at scrape time."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    rows: list[tuple[str, str, float, dict[str, str]]] = []
    for (path, code), count in sorted(serving.requests.items()):
        rows.append(("ctloop_http_requests_total", "counter", count, {"path": path, "code": str(code)}))
    for path, seconds in sorted(serving.latency_sum.items()):
        rows.append(("ctloop_http_request_seconds_total", "counter", seconds, {"path": path}))
    roles = serving.roles
    rows.append(("ctloop_champion_version", "gauge", roles.champion or 0, {}))
    rows.append(("ctloop_challenger_version", "gauge", roles.challenger or 0, {}))
    rows.append(("ctloop_role_sync_errors_total", "counter", serving.sync_errors, {}))
    for outcome in ("completed", "client_disconnected", "failed"):
        rows.append(("ctloop_streams_total", "counter", serving.streams[outcome], {"outcome": outcome}))
    if serving.router is not None:
        rows += serving.router.metrics()
    if serving.production is not None:
        rows += serving.production.metrics()
    batcher = getattr(serving.backend, "batcher", None)
    if batcher is not None:
        rows += batcher.metrics()

    class Snapshot:
        def collect(self):
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
