"""The drift check's HTML report."""

from __future__ import annotations

import math
from pathlib import Path

from ctloop.reports.charts import grouped_bars, histogram, scatter
from ctloop.reports.page import Bullets, Table, Text, write_page


def write_drift_report(path: Path, report, reference, current, current_texts: list[str]) -> Path:
    """The drift check as a page: decision, both samples in 2-D, the null with the observed
    statistic, per-component p-values, and the current rows least like the reference."""
    import numpy as np

    from ctloop.drift.detectors import pooled_pca

    rng = np.random.default_rng(0)
    ref_rows = rng.choice(len(reference), size=min(400, len(reference)), replace=False)
    cur_rows = rng.choice(len(current), size=min(400, len(current)), replace=False)
    projected, _ = pooled_pca(np.concatenate([reference[ref_rows], current[cur_rows]]), 2)
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    split = len(ref_rows)
    sections = [
        (
            "Decision",
            [
                Text(
                    f"{report.outcome} (alpha {report.alpha:.3g}, reference {report.n_reference} rows, "
                    f"current {report.n_current} rows)",
                    "fail" if report.drift else "pass",
                    bold=True,
                ),
                Bullets(tuple(report.reasons)),
            ],
        ),
        (
            "Both samples",
            [
                scatter(
                    "pooled PCA projection (label-free)",
                    {
                        "reference": [tuple(p) for p in projected[:split].tolist()],
                        "current": [tuple(p) for p in projected[split:].tolist()],
                    },
                )
            ],
        ),
    ]
    for detector in report.detectors:
        if "null" in detector.details:
            sections.append(
                (
                    f"{detector.name}: null distribution",
                    [
                        histogram(
                            f"{detector.name} permutation null; observed statistic in red (p = {detector.p_value:.4g})",
                            detector.details["null"],
                            detector.statistic,
                            "observed",
                            x_label=f"{detector.name} statistic",
                            y_label="permutations",
                        )
                    ],
                )
            )
    component_p = report.explanation.get("component_p_values", [])
    if component_p:
        groups = {f"PC{j + 1}": {"-log10 p": -math.log10(max(p, 1e-300))} for j, p in enumerate(component_p)}
        sections.append(
            (
                "Which directions moved",
                [
                    grouped_bars(
                        "per-component KS on the pooled PCA, -log10 p (higher = moved more)", groups, "-log10 p"
                    )
                ],
            )
        )
    outliers = report.explanation.get("outliers", [])
    if outliers:
        rows = tuple(
            (f"similarity {o['nearest_reference_similarity']:.3f}", current_texts[o["index"]][:200])
            for o in outliers
            if o["index"] < len(current_texts)
        )
        sections.append(("Current rows least like the reference", [Table(rows)]))
    return write_page(path, "ctloop drift check", sections)
