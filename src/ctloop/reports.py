"""HTML reports with inline SVG plots: one self-contained file per cycle, also logged to MLflow.

No plotting library: the charts are a few lines of SVG, so a report opens anywhere, offline.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

WIDTH, HEIGHT, PAD = 560, 240, 44
COLORS = {"candidate": "#2b6cb0", "champion": "#c05621", "base": "#718096"}


def line_chart(title: str, points: list[tuple[float, float]], y_label: str) -> str:
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
            f'{_axes(f"{x0:g}", f"{x1:g}", f"{y0:.3g}", f"{y1:.3g}", "step", y_label)}'
            f'<path d="{path}" fill="none" stroke="{COLORS["candidate"]}" stroke-width="2"/></svg></figure>')


def grouped_bars(title: str, groups: dict[str, dict[str, float]], y_label: str) -> str:
    """One group of bars per key of `groups` (e.g. an eval set), one bar per model."""
    values = [v for by_model in groups.values() for v in by_model.values()]
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    top = max(values) * 1.1 or 1.0
    group_width = (WIDTH - 2 * PAD) / len(groups)
    bars = []
    for g, (group, by_model) in enumerate(groups.items()):
        bar_width = group_width * 0.8 / max(1, len(by_model))
        for b, (model, value) in enumerate(by_model.items()):
            x = PAD + g * group_width + group_width * 0.1 + b * bar_width
            h = value / top * (HEIGHT - 2 * PAD)
            color = COLORS.get(model, "#4a5568")
            bars.append(f'<rect x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{bar_width - 2:.1f}" height="{h:.1f}"'
                        f' fill="{color}"><title>{html.escape(model)}: {value:.4f}</title></rect>'
                        f'<text x="{x + bar_width / 2:.1f}" y="{HEIGHT - PAD - h - 4:.1f}" font-size="10" '
                        f'text-anchor="middle">{value:.3f}</text>')
        bars.append(f'<text x="{PAD + (g + 0.5) * group_width:.1f}" y="{HEIGHT - PAD + 16}" font-size="11" '
                    f'text-anchor="middle">{html.escape(group)}</text>')
    legend = " ".join(f'<span style="color:{COLORS.get(m, "#4a5568")}">&#9632; {html.escape(m)}</span>'
                      for m in dict.fromkeys(m for by_model in groups.values() for m in by_model))
    return (f'<figure><figcaption>{html.escape(title)} {legend}</figcaption>'
            f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
            f'{_axes("", "", "0", f"{top:.3g}", "", y_label)}{"".join(bars)}</svg></figure>')


def _axes(x_min: str, x_max: str, y_min: str, y_max: str, x_label: str, y_label: str) -> str:
    bottom, right = HEIGHT - PAD, WIDTH - PAD
    return (f'<line x1="{PAD}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>'
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{bottom}" stroke="#333"/>'
            f'<text x="{PAD}" y="{bottom + 28}" font-size="10">{x_min}</text>'
            f'<text x="{right}" y="{bottom + 28}" font-size="10" text-anchor="end">{x_max}</text>'
            f'<text x="{WIDTH / 2}" y="{bottom + 28}" font-size="11" text-anchor="middle">{x_label}</text>'
            f'<text x="{PAD - 4}" y="{bottom}" font-size="10" text-anchor="end">{y_min}</text>'
            f'<text x="{PAD - 4}" y="{PAD + 4}" font-size="10" text-anchor="end">{y_max}</text>'
            f'<text x="12" y="{HEIGHT / 2}" font-size="11" transform="rotate(-90 12 {HEIGHT / 2})" '
            f'text-anchor="middle">{html.escape(y_label)}</text>')


def table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def write_html(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a self-contained page: a title and (heading, html body) sections."""
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#1a202c}"
             "th{text-align:left;padding-right:1em;vertical-align:top}td{font-family:monospace}"
             "figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}"
             ".pass{color:#276749}.fail{color:#c53030}")
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>",
                    encoding="utf-8")
    return path


def scatter(title: str, groups: dict[str, list[tuple[float, float]]], x_label: str = "PC 1",
            y_label: str = "PC 2") -> str:
    """Points of several groups (e.g. reference vs current) on shared axes."""
    points = [p for pts in groups.values() for p in pts]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    palette = ["#718096", "#c05621", "#2b6cb0"]
    dots, legend = [], []
    for color, (name, pts) in zip(palette, groups.items()):
        legend.append(f'<span style="color:{color}">&#9679; {html.escape(name)}</span>')
        for x, y in pts:
            cx = PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)
            cy = HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)
            dots.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2" fill="{color}" fill-opacity="0.5"/>')
    return (f'<figure><figcaption>{html.escape(title)} {" ".join(legend)}</figcaption>'
            f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
            f'{_axes(f"{x0:.2g}", f"{x1:.2g}", f"{y0:.2g}", f"{y1:.2g}", x_label, y_label)}{"".join(dots)}</svg></figure>')


def histogram(title: str, values: list[float], marker: float, marker_label: str, bins: int = 30) -> str:
    """A histogram of `values` (e.g. a permutation null) with a vertical line at `marker`."""
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(min(values), marker), max(max(values), marker)
    hi = hi if hi > lo else lo + 1
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    top = max(counts)
    width = (WIDTH - 2 * PAD) / bins
    bars = "".join(
        f'<rect x="{PAD + i * width:.1f}" y="{HEIGHT - PAD - c / top * (HEIGHT - 2 * PAD):.1f}" '
        f'width="{width - 1:.1f}" height="{c / top * (HEIGHT - 2 * PAD):.1f}" fill="#a0aec0"/>'
        for i, c in enumerate(counts))
    mx = PAD + (marker - lo) / (hi - lo) * (WIDTH - 2 * PAD)
    line = (f'<line x1="{mx:.1f}" y1="{PAD}" x2="{mx:.1f}" y2="{HEIGHT - PAD}" stroke="#c53030" stroke-width="2"/>'
            f'<text x="{mx:.1f}" y="{PAD - 6}" font-size="11" text-anchor="middle" fill="#c53030">'
            f'{html.escape(marker_label)}</text>')
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
            f'{_axes(f"{lo:.3g}", f"{hi:.3g}", "0", str(top), "statistic", "permutations")}{bars}{line}</svg></figure>')


def write_drift_report(path: Path, report, reference, current, current_texts: list[str]) -> Path:
    """The drift check as a page: decision, both samples in 2-D, the null with the observed
    statistic, per-component p-values, and the current rows least like the reference."""
    import numpy as np

    from ctloop.drift import pooled_pca

    rng = np.random.default_rng(0)
    ref_rows = rng.choice(len(reference), size=min(400, len(reference)), replace=False)
    cur_rows = rng.choice(len(current), size=min(400, len(current)), replace=False)
    projected, _ = pooled_pca(np.concatenate([reference[ref_rows], current[cur_rows]]), 2)
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    split = len(ref_rows)
    sections = [("Decision", f"<p class='{'fail' if report.drift else 'pass'}'><b>{report.outcome}</b> "
                             f"(alpha {report.alpha}, reference {report.n_reference} rows, current "
                             f"{report.n_current} rows)</p><ul>"
                             + "".join(f"<li>{html.escape(r)}</li>" for r in report.reasons) + "</ul>"),
                ("Both samples", scatter("pooled PCA projection (label-free)", {
                    "reference": [tuple(p) for p in projected[:split].tolist()],
                    "current": [tuple(p) for p in projected[split:].tolist()]}))]
    for detector in report.detectors:
        if "null" in detector.details:
            sections.append((f"{detector.name}: null distribution", histogram(
                f"{detector.name} permutation null; observed statistic in red (p = {detector.p_value:.4g})",
                detector.details["null"], detector.statistic, "observed")))

    component_p = report.explanation.get("component_p_values", [])
    if component_p:
        groups = {f"PC{j + 1}": {"-log10 p": -math.log10(max(p, 1e-300))} for j, p in enumerate(component_p)}
        sections.append(("Which directions moved", grouped_bars(
            "per-component KS on the pooled PCA, -log10 p (higher = moved more)", groups, "-log10 p")))
    outliers = report.explanation.get("outliers", [])
    if outliers:
        rows = [(f"similarity {o['nearest_reference_similarity']:.3f}", current_texts[o["index"]][:200])
                for o in outliers if o["index"] < len(current_texts)]
        sections.append(("Current rows least like the reference", table(rows)))
    return write_html(path, "ctloop drift check", sections)
