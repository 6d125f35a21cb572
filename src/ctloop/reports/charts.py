"""Charts as inline SVG for the HTML reports: no plotting library, so a report opens anywhere, offline.

Each function returns `Markup` (trusted markup for the page template); every text it places in
the SVG (titles, labels, names) is escaped here.
"""

from __future__ import annotations

import html

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 560, 240, 44
COLORS = {"candidate": "#2b6cb0", "champion": "#c05621", "base": "#718096"}


def line_chart(title: str, points: list[tuple[float, float]], y_label: str) -> Markup:
    if not points:
        return Markup(f"<p>{html.escape(title)}: no data</p>")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
    return Markup(
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
        f"{_axes(f'{x0:g}', f'{x1:g}', f'{y0:.3g}', f'{y1:.3g}', 'step', y_label)}"
        f'<path d="{path}" fill="none" stroke="{COLORS["candidate"]}" stroke-width="2"/></svg></figure>'
    )


def grouped_bars(title: str, groups: dict[str, dict[str, float]], y_label: str) -> Markup:
    """One group of bars per key of `groups` (e.g. an eval set), one bar per model."""
    values = [v for by_model in groups.values() for v in by_model.values()]
    if not values:
        return Markup(f"<p>{html.escape(title)}: no data</p>")
    top = max(values) * 1.1 or 1.0
    group_width = (WIDTH - 2 * PAD) / len(groups)
    bars = []
    for g, (group, by_model) in enumerate(groups.items()):
        bar_width = group_width * 0.8 / max(1, len(by_model))
        for b, (model, value) in enumerate(by_model.items()):
            x = PAD + g * group_width + group_width * 0.1 + b * bar_width
            h = value / top * (HEIGHT - 2 * PAD)
            color = COLORS.get(model, "#4a5568")
            bars.append(
                f'<rect x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{bar_width - 2:.1f}" height="{h:.1f}"'
                f' fill="{color}"><title>{html.escape(model)}: {value:.4f}</title></rect>'
                f'<text x="{x + bar_width / 2:.1f}" y="{HEIGHT - PAD - h - 4:.1f}" font-size="10" '
                f'text-anchor="middle">{value:.3f}</text>'
            )
        bars.append(
            f'<text x="{PAD + (g + 0.5) * group_width:.1f}" y="{HEIGHT - PAD + 16}" font-size="11" '
            f'text-anchor="middle">{html.escape(group)}</text>'
        )
    legend = " ".join(
        f'<span style="color:{COLORS.get(m, "#4a5568")}">&#9632; {html.escape(m)}</span>'
        for m in dict.fromkeys(m for by_model in groups.values() for m in by_model)
    )
    return Markup(
        f"<figure><figcaption>{html.escape(title)} {legend}</figcaption>"
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
        f"{_axes('', '', '0', f'{top:.3g}', '', y_label)}{''.join(bars)}</svg></figure>"
    )


def _axes(x_min: str, x_max: str, y_min: str, y_max: str, x_label: str, y_label: str) -> str:
    bottom, right = HEIGHT - PAD, WIDTH - PAD
    return (
        f'<line x1="{PAD}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{bottom}" stroke="#333"/>'
        f'<text x="{PAD}" y="{bottom + 28}" font-size="10">{x_min}</text>'
        f'<text x="{right}" y="{bottom + 28}" font-size="10" text-anchor="end">{x_max}</text>'
        f'<text x="{WIDTH / 2}" y="{bottom + 28}" font-size="11" text-anchor="middle">{x_label}</text>'
        f'<text x="{PAD - 4}" y="{bottom}" font-size="10" text-anchor="end">{y_min}</text>'
        f'<text x="{PAD - 4}" y="{PAD + 4}" font-size="10" text-anchor="end">{y_max}</text>'
        f'<text x="12" y="{HEIGHT / 2}" font-size="11" transform="rotate(-90 12 {HEIGHT / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
    )


def scatter(
    title: str, groups: dict[str, list[tuple[float, float]]], x_label: str = "PC 1", y_label: str = "PC 2"
) -> Markup:
    """Points of several groups (e.g. reference vs current) on shared axes."""
    points = [p for pts in groups.values() for p in pts]
    if not points:
        return Markup(f"<p>{html.escape(title)}: no data</p>")
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
    return Markup(
        f"<figure><figcaption>{html.escape(title)} {' '.join(legend)}</figcaption>"
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
        f"{_axes(f'{x0:.2g}', f'{x1:.2g}', f'{y0:.2g}', f'{y1:.2g}', x_label, y_label)}{''.join(dots)}</svg></figure>"
    )


def histogram(title: str, values: list[float], marker: float, marker_label: str, bins: int = 30) -> Markup:
    """A histogram of `values` (e.g. a permutation null) with a vertical line at `marker`."""
    if not values:
        return Markup(f"<p>{html.escape(title)}: no data</p>")
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
        for i, c in enumerate(counts)
    )
    mx = PAD + (marker - lo) / (hi - lo) * (WIDTH - 2 * PAD)
    line = (
        f'<line x1="{mx:.1f}" y1="{PAD}" x2="{mx:.1f}" y2="{HEIGHT - PAD}" stroke="#c53030" stroke-width="2"/>'
        f'<text x="{mx:.1f}" y="{PAD - 6}" font-size="11" text-anchor="middle" fill="#c53030">'
        f"{html.escape(marker_label)}</text>"
    )
    return Markup(
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">'
        f"{_axes(f'{lo:.3g}', f'{hi:.3g}', '0', str(top), 'statistic', 'permutations')}{bars}{line}</svg></figure>"
    )
