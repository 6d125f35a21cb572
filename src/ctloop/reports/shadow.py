"""The shadow comparison's HTML report."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from ctloop.reports.charts import grouped_bars, histogram, scatter
from ctloop.reports.page import Answers, Bullets, Table, Text, write_page

EXAMPLES = 5  # of each kind
_STYLE = {"PROMOTE": "pass", "REJECT": "fail"}


def _in_words(report) -> str:
    """The decision as a product owner would want it said."""
    pairs = report.counts.get("completed", 0)
    champion, challenger = f"v{report.champion_version}", f"v{report.challenger_version}"
    if report.decision == "PROMOTE":
        return (
            f"the challenger ({challenger}) can replace the champion ({champion}). Over {pairs} requests both "
            "answered, it failed no more often and answered about as fast and as long, each within its limit."
        )
    if report.decision == "REJECT":
        return (
            f"the challenger ({challenger}) should not replace the champion ({champion}): it is worse on at least "
            "one check."
        )
    return (
        "not decided yet. The evidence so far settles some limits but not all; keep the shadow running (each "
        "check below says how much more it needs)."
    )


def _answer_pairs(done: list[dict[str, Any]], report) -> list:
    """The pairs whose answers differ most (lowest token F1 between them), and a seeded random sample."""
    from ctloop.evaluation.textmetrics import token_f1

    def cells(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return (
            ("prompt", row["prompt"] or ""),
            (f"champion v{report.champion_version}", row["champion_output"] or ""),
            (f"challenger v{report.challenger_version}", row["challenger_output"] or ""),
        )

    scored = sorted(done, key=lambda r: token_f1(r["challenger_output"] or "", r["champion_output"] or ""))
    differ = tuple(
        (
            f"request {r['request_id']}: token F1 between the answers {token_f1(r['challenger_output'] or '', r['champion_output'] or ''):.2f}",
            cells(r),
        )
        for r in scored[:EXAMPLES]
    )
    rest = scored[EXAMPLES:]  # the sample repeats none of the disagreements
    sample = random.Random(0).sample(rest, min(EXAMPLES, len(rest)))
    return [
        "Where the two versions answered most differently (a different answer is not a worse one), then a "
        "random sample of the pairs (seeded, so the report reads the same on every run).",
        Text("largest disagreements", bold=True),
        Answers(differ),
        Text("random sample", bold=True),
        Answers(tuple((f"request {r['request_id']}", cells(r)) for r in sample)),
    ]


def write_shadow_report(report, rows: list[dict[str, Any]], path: Path) -> Path:
    """Latency and length plots plus the decision, as one self-contained HTML file."""
    done = [r for r in rows if r["status"] == "completed"]
    sections: list = [
        (
            "decision",
            [
                Text(f"{report.decision}: {_in_words(report)}", _STYLE.get(report.decision, ""), bold=True),
                Bullets(tuple(report.reasons), folded="why: each check, its estimate and its bound"),
            ],
        ),
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
                        "champion latency (ms)",
                        "challenger latency (ms)",
                        diagonal=True,
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
                [
                    histogram(
                        "length change per request",
                        ratios,
                        0.0,
                        "no change",
                        x_label="log2(challenger tokens + 1) - log2(champion tokens + 1)",
                        y_label="requests",
                    )
                ],
            )
        )
    if report.agreement:
        sections.append(("agreement", [Table(tuple((k, f"{v:.3f}") for k, v in report.agreement.items()))]))
    if done:
        sections.append(("answers side by side", _answer_pairs(done, report)))
    return write_page(path, f"shadow v{report.champion_version} vs v{report.challenger_version}", sections)
