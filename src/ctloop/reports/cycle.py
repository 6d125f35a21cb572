"""A cycle's HTML report: gate reasons, evaluation (also per slice), training curve, lineage."""

from __future__ import annotations

from pathlib import Path

from ctloop.fileio import read_json
from ctloop.reports.charts import grouped_bars, line_chart
from ctloop.reports.page import Bullets, Table, Text, write_page
from ctloop.training.trainer import TrainResult


def write_cycle_report(
    cycle_dir: Path, cycle_id: str, trained: TrainResult, evaluation, gate: dict, lineage: dict
) -> Path:
    """The cycle's HTML report (`report.html` in the cycle folder)."""
    validation = read_json(cycle_dir / "validation.json")
    gate_parts: list = [
        Text(f"{gate['outcome']} vs {gate['reference']}", "pass" if gate["passed"] else "fail", bold=True),
        Bullets(tuple(gate["reasons"])),
    ]
    rules = gate.get("rules", [])
    if rules:
        gate_parts.append(
            Table(
                tuple(
                    (r["name"], r["outcome"], _number(r["estimate"]), _number(r["bound"]), str(r["n"])) for r in rules
                ),
                header=("rule", "outcome", "estimate", "one-sided bound", "examples"),
            )
        )
    slice_charts = [
        grouped_bars(
            f"{name} by slice", {v: {m: x for m, x in by.items() if m != "n"} for v, by in per_slice.items()}, "loss"
        )
        for name, per_slice in read_json(cycle_dir / "eval.json").get("slice_means", {}).items()
    ]
    return write_page(
        cycle_dir / "report.html",
        f"ctloop cycle {cycle_id}",
        [
            ("Gate", gate_parts),
            (
                "Evaluation",
                [
                    grouped_bars("mean token loss per example (lower is better)", evaluation.means, "loss"),
                    *slice_charts,
                ],
            ),
            (
                "Training",
                [
                    line_chart("training loss", [(float(s), v) for s, v in trained.losses], "loss"),
                    Table(
                        (
                            ("steps", str(trained.steps)),
                            ("examples", str(trained.examples)),
                            ("tokens", str(trained.tokens)),
                            ("seconds", str(trained.seconds)),
                            ("compute dtype", trained.compute_dtype),
                            ("attention", trained.attn_implementation),
                        )
                    ),
                ],
            ),
            (
                "Validation",
                [
                    Table(
                        (
                            ("rows", str(validation["total_rows"])),
                            ("good", str(validation["good_rows"])),
                            *((f"quarantined: {k}", str(v)) for k, v in validation["bad_by_reason"].items()),
                        )
                    )
                ],
            ),
            ("Lineage", [Table(tuple((k, str(v)) for k, v in lineage.items()))]),
        ],
    )


def _number(value: float | None) -> str:
    """A rule's estimate or bound; a dash where the rule computed none (stored as null)."""
    return "—" if value is None or value != value else f"{value:+.4f}"
