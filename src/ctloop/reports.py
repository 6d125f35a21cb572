"""HTML reports with inline SVG plots: one self-contained file per cycle, also logged to MLflow.

No plotting library: the charts are a few lines of SVG, so a report opens anywhere, offline.
"""

from __future__ import annotations

import html
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
