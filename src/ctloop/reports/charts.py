"""Charts for the HTML reports: matplotlib figures rendered to static SVG inside the page, so a
report opens anywhere, offline, with real axis ticks, units and legends.

Each function returns `Markup` (trusted markup for the page template): a figure with its caption
(escaped here) and the SVG matplotlib wrote (it escapes the text it places itself).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from markupsafe import Markup

SIZE = (6.4, 3.0)  # inches at 100 dpi: 640 x 300 px
COLORS = {"candidate": "#2b6cb0", "champion": "#c05621", "base": "#718096", "challenger": "#2b6cb0"}
PALETTE = ["#718096", "#c05621", "#2b6cb0", "#2f855a", "#6b46c1"]


def _no_data(title: str) -> Markup:
    return Markup(f"<p>{html.escape(title)}: no data</p>")


@contextmanager
def _figure(title: str) -> Iterator[tuple[Any, Any, list[Markup]]]:
    """A figure and its axes; on exit the SVG joins `out` (a one-item list) with the caption. A bare
    `Figure`, not pyplot: no global state, no backend switched in the host process (a notebook, the
    server's worker threads), nothing to close."""
    import matplotlib
    from matplotlib.figure import Figure

    out: list[Markup] = []
    style: dict[Any, Any] = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
             "text.parse_math": False}  # fmt: skip
    with matplotlib.rc_context(style):  # "$" in a label is a dollar sign, not math
        figure = Figure(figsize=SIZE, dpi=100)
        axes = figure.subplots()
        yield figure, axes, out
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML header and doctype do not belong inside a page
    out.append(Markup(f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}</figure>"))


def line_chart(
    title: str,
    points: list[tuple[float, float]],
    y_label: str,
    x_label: str = "step",
    limit: float | None = None,
    limit_label: str = "limit",
) -> Markup:
    """A line over `points`; with `limit`, a dashed horizontal line there."""
    points = [(x, y) for x, y in points if math.isfinite(y)]
    if not points:
        return _no_data(title)
    with _figure(title) as (_, axes, out):
        axes.plot([p[0] for p in points], [p[1] for p in points], color=COLORS["candidate"], linewidth=1.6)
        if limit is not None:
            axes.axhline(limit, color="#c53030", linestyle="--", linewidth=1, label=limit_label)
            axes.legend(frameon=False)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
    return out[0]


def grouped_bars(title: str, groups: dict[str, dict[str, float]], y_label: str) -> Markup:
    """One group of bars per key of `groups` (e.g. an eval set), one bar per model, each labelled."""
    values = [v for by_model in groups.values() for v in by_model.values() if math.isfinite(v)]
    if not values:
        return _no_data(title)
    models = list(dict.fromkeys(m for by_model in groups.values() for m in by_model))
    width = 0.8 / len(models)
    with _figure(title) as (_, axes, out):
        for b, model in enumerate(models):
            xs = [g + (b - (len(models) - 1) / 2) * width for g in range(len(groups))]
            heights = [by_model.get(model, math.nan) for by_model in groups.values()]
            color = COLORS.get(model, PALETTE[b % len(PALETTE)])
            bars = axes.bar(xs, heights, width * 0.95, label=model, color=color)
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        axes.set_xticks(range(len(groups)), list(groups))
        axes.set_ylabel(y_label)
        axes.margins(y=0.15)
        axes.legend(frameon=False, ncols=min(len(models), 4), loc="upper left", bbox_to_anchor=(0, 1.15))
    return out[0]


def scatter(
    title: str,
    groups: dict[str, list[tuple[float, float]]],
    x_label: str = "PC 1",
    y_label: str = "PC 2",
    diagonal: bool = False,
) -> Markup:
    """Points of several groups (e.g. reference vs current) on shared axes; with `diagonal`, the
    y = x line (equal values on both axes)."""
    groups = {name: [p for p in pts if None not in p] for name, pts in groups.items()}  # a row without a latency
    points = [p for pts in groups.values() for p in pts]
    if not points:
        return _no_data(title)
    with _figure(title) as (_, axes, out):
        for color, (name, pts) in zip(PALETTE, groups.items(), strict=False):
            axes.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, color=color, label=name)
        if diagonal:
            low = min(min(p[0] for p in points), min(p[1] for p in points))
            high = max(max(p[0] for p in points), max(p[1] for p in points))
            axes.plot([low, high], [low, high], color="#1a202c", linewidth=1, linestyle="--", label="y = x")
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        axes.legend(frameon=False, markerscale=2)
    return out[0]


def histogram(
    title: str,
    values: list[float],
    marker: float,
    marker_label: str,
    bins: int = 30,
    x_label: str = "statistic",
    y_label: str = "count",
) -> Markup:
    """A histogram of `values` (e.g. a permutation null) with a vertical line at `marker`."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return _no_data(title)
    with _figure(title) as (_, axes, out):
        axes.hist(values, bins=bins, color="#a0aec0")
        axes.axvline(marker, color="#c53030", linewidth=1.6, label=marker_label)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.legend(frameon=False)
    return out[0]
