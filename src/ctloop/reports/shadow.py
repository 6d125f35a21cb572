"""The shadow comparison's HTML report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctloop.reports.charts import grouped_bars, histogram, scatter
from ctloop.reports.page import Bullets, Table, Text, write_page


def write_shadow_report(report, rows: list[dict[str, Any]], path: Path) -> Path:
    """Latency and length plots plus the decision, as one self-contained HTML file."""
    done = [r for r in rows if r["status"] == "completed"]
    sections: list = [
        ("decision", [Text(report.decision, bold=True), Bullets(tuple(report.reasons))]),
        ("counts", [Table(tuple((k, str(v)) for k, v in report.counts.items()))]),
        (
            "effects (always-valid bounds, each side at shadow.confidence)",
            [
                Table(
                    tuple(
                        (name, f"{v['estimate']:.4g} [{v['lower']:.4g}, {v['upper']:.4g}]")
                        for name, v in report.effects.items()
                    )
                )
            ],
        ),
    ]
    if done:
        sections.append(
            (
                "latency (ms), each request: champion (x) vs challenger (y)",
                [
                    scatter(
                        "latency per request",
                        {"requests": [(r["champion_latency_ms"], r["challenger_latency_ms"]) for r in done]},
                        "champion ms",
                        "challenger ms",
                    )
                ],
            )
        )
        sections.append(
            (
                "latency percentiles (ms)",
                [
                    grouped_bars(
                        "latency",
                        {
                            q: {side: values[q] for side, values in report.latency_ms.items()}
                            for q in ("p50", "p95", "p99")
                        },
                        "ms",
                    )
                ],
            )
        )
        ratios = [math.log2((r["challenger_tokens"] + 1) / (r["champion_tokens"] + 1)) for r in done]
        sections.append(
            (
                "output length, log2(challenger / champion tokens)",
                [histogram("length change", ratios, 0.0, "no change")],
            )
        )
    if report.agreement:
        sections.append(("agreement", [Table(tuple((k, f"{v:.3f}") for k, v in report.agreement.items()))]))
    return write_page(path, f"shadow v{report.champion_version} vs v{report.challenger_version}", sections)
