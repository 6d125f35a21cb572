"""A cycle's HTML report: gate reasons, evaluation (also per slice), training curve, lineage."""

from __future__ import annotations

from pathlib import Path

from ctloop.data.records import Record
from ctloop.evaluation.gate import NEW_SET
from ctloop.reports.charts import grouped_bars, line_chart
from ctloop.reports.page import Answers, Bullets, Link, Table, Text, write_page
from ctloop.training.trainer import TrainResult


def write_cycle_report(
    path: Path,
    cycle_id: str,
    trained: TrainResult,
    evaluation,
    gate: dict,
    lineage: dict,
    *,
    validation: dict,
    slice_means: dict,
    holdout: list[Record],
    drift_report: str | None = None,
    registered: dict | None = None,
) -> Path:
    """The cycle's HTML report at `path` (in the cycle folder). `holdout`: the new-data holdout,
    whose answers it shows; `drift_report`: the drift check's page beside it, if there is one;
    `registered`: the version the cycle registered, its state (champion, challenger, pending
    approval) and when."""
    gate_parts: list = [
        Text(f"{gate['outcome']}: {_in_words(gate)}", "pass" if gate["passed"] else "fail", bold=True),
    ]
    if registered:
        gate_parts.append(
            Table(
                (
                    ("registered as", f"version {registered['version']}"),
                    ("now", str(registered["state"])),
                    ("at", str(registered["at"])),
                )
            )
        )
    if drift_report:
        gate_parts.append(Link("the drift check that started this cycle", drift_report))
    gate_parts.append(Bullets(tuple(gate["reasons"]), folded="why: each rule, its estimate and its bound"))
    rules = gate.get("rules", [])
    if rules:
        gate_parts.append(
            Table(
                tuple(
                    (
                        r["name"],
                        _shown_outcome(r),
                        _number(r["estimate"]),
                        _number(r["bound"]),
                        _number(r.get("limit")),
                        str(r["n"]),
                    )
                    for r in rules
                ),
                header=("rule", "outcome", "estimate", "one-sided bound", "limit", "examples"),
            )
        )
        gate_parts.append(
            "Estimates, bounds and limits of the built-in rules are fractions (0.01 is 1%: a relative change, or a "
            "share of answers), as in the reasons; a configured rule's are in its metric's own units."
        )
    slice_charts = [
        grouped_bars(
            f"{name} by slice", {v: {m: x for m, x in by.items() if m != "n"} for v, by in per_slice.items()}, "loss"
        )
        for name, per_slice in slice_means.items()
    ]
    return write_page(
        path,
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
                    line_chart(
                        "training loss",
                        [(float(s), v) for s, v in trained.losses],
                        "loss (nats per token)",
                        "optimizer step",
                    ),
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
            ("Answers side by side", _answers(holdout, evaluation)),
            ("Lineage", [Table(tuple((k, str(v)) for k, v in lineage.items()))]),
        ],
    )


def _answers(holdout: list[Record], evaluation) -> list:
    """New-data prompts with the reference answer and each model's greedy answer and loss: the
    candidate's worst-scored rows, then a seeded sample."""
    shown = evaluation.examples.get(NEW_SET)
    if not shown or not holdout:
        return ["No examples: eval.report_examples is 0, or the cycle had no new-data holdout."]
    records = {r.id: r for r in holdout}
    ids, losses = evaluation.ids[NEW_SET], evaluation.losses[NEW_SET]

    def example(index: int, position: int) -> tuple[str, tuple[tuple[str, str], ...]]:
        record = records.get(ids[index])
        cells = [("prompt", record.prompt if record else ""), ("reference", record.completion if record else "")]
        for model, answers in shown["answers"].items():
            cells.append((f"{model} (loss {losses[model][index]:.3f})", answers[position]))
        return f"example {ids[index]}", tuple(cells)

    worst, sample = shown["worst"], shown["sample"]
    return [
        "Held-out new-data prompts, the reference answer, and each model's greedy answer with its loss on "
        "the reference (mean token loss; lower is better).",
        Text("the candidate's worst-scored examples", bold=True),
        Answers(tuple(example(i, k) for k, i in enumerate(worst))),
        Text("a random sample (seeded)", bold=True),
        Answers(tuple(example(i, len(worst) + k) for k, i in enumerate(sample))),
    ]


def _in_words(gate: dict) -> str:
    """The gate's outcome as a product owner would want it said."""
    reference = {"champion": "the adapter in production", "base": "the bare base model"}.get(
        gate["reference"], gate["reference"]
    )
    if gate["outcome"] == "PASS":
        return (
            f"this cycle's adapter did better than {reference} on the new data and met every other rule (what "
            "it must not forget: the old data and any golden sets), so it was registered."
        )
    if gate["outcome"] == "FAIL":
        return f"this cycle's adapter did not do well enough against {reference}; it was not registered."
    return (
        f"the evidence could not tell this cycle's adapter from {reference} (too few held-out rows, or too "
        "noisy); nothing was registered."
    )


def _shown_outcome(rule: dict) -> str:
    """A rule that reported without deciding reads "not checked", not PASS."""
    reason = rule.get("reason", "")
    if rule["outcome"] == "PASS" and (": not checked" in reason or "not gated" in reason):
        return "not checked"
    return rule["outcome"]


def _number(value: float | None) -> str:
    """A rule's estimate or bound; a dash where the rule computed none (stored as null)."""
    return "—" if value is None or value != value else f"{value:+.4f}"
