"""What a finished cycle leaves for people: its MLflow run (params, metrics, tags, artifacts) and
its HTML report. Called by the register stage."""

from __future__ import annotations

import html
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.registry import Registry
from ctloop.train import TrainResult
from ctloop.workspace import read_json


def log_cycle_run(registry: Registry, run_id: str, config: CtloopConfig, cycle_dir: Path, trained: TrainResult,
                  evaluation, gate: dict, lineage: dict) -> None:
    """Params, metrics, tags and artifacts of a finished cycle on its MLflow run."""
    registry.log_params(run_id, flatten(config.model_dump(mode="json")))
    registry.log_series(run_id, "train_loss", trained.losses)
    registry.log_series(run_id, "learning_rate", trained.learning_rates)
    metrics = {"train_tokens": trained.tokens, "train_seconds": trained.seconds, "train_steps": trained.steps}
    metrics |= {f"{s}_{m}_loss": v for s, by_model in evaluation.means.items() for m, v in by_model.items()}
    metrics |= {f"{s}_{m}_{k}": v for s, by_model in evaluation.metric_means().items()
                for m, by_metric in by_model.items() for k, v in by_metric.items()}
    metrics |= {f"gate_{k}": v for k, v in gate["metrics"].items()} | {"gate_passed": float(gate["passed"])}
    registry.log_metrics(run_id, metrics)
    registry.set_run_tags(run_id, {f"ctloop.{k}": str(v) for k, v in lineage.items()} | {"ctloop.gate": gate["outcome"]})
    for name in ("validation.json", "drift.json", "drift.html", "replay_manifest.json", "training.json",
                 "contamination.json", "eval.json", "gate.json", "quarantine.jsonl", "report.html"):
        if (cycle_dir / name).is_file():
            registry.log_artifact(run_id, (cycle_dir / name), "reports")
    registry.log_artifact(run_id, cycle_dir / "train.parquet", "data")  # the next drift check's reference
    registry.log_artifact(run_id, cycle_dir / "adapter", "adapter")


def write_cycle_report(cycle_dir: Path, cycle_id: str, trained: TrainResult, evaluation, gate: dict,
                       lineage: dict) -> Path:
    """The cycle's HTML report: gate reasons, evaluation (also per slice), training curve, lineage."""
    from ctloop.reports import grouped_bars, line_chart, table, write_html

    validation = read_json(cycle_dir / "validation.json")
    css = "pass" if gate["passed"] else "fail"
    gate_html = f"<p class='{css}'><b>{gate['outcome']}</b> vs {gate['reference']}</p><ul>" + "".join(
        f"<li>{html.escape(r)}</li>" for r in gate["reasons"]) + "</ul>"
    rows = "".join(f"<tr><td>{html.escape(r['name'])}</td><td class='{'pass' if r['outcome'] == 'PASS' else 'fail'}'>"
                   f"{r['outcome']}</td><td>{r['estimate']:+.4f}</td><td>{r['bound']:+.4f}</td><td>{r['n']}</td></tr>"
                   for r in gate.get("rules", []))
    if rows:
        gate_html += ("<table><tr><th>rule</th><th>outcome</th><th>estimate</th><th>one-sided bound</th>"
                      f"<th>examples</th></tr>{rows}</table>")
    return write_html(cycle_dir / "report.html", f"ctloop cycle {cycle_id}", [
        ("Gate", gate_html),
        ("Evaluation", grouped_bars("mean token loss per example (lower is better)", evaluation.means, "loss")
         + "".join(grouped_bars(f"{name} by slice", {v: {m: x for m, x in by.items() if m != "n"}
                                                      for v, by in per_slice.items()}, "loss")
                   for name, per_slice in read_json(cycle_dir / "eval.json").get("slice_means", {}).items())),
        ("Training", line_chart("training loss", [(float(s), v) for s, v in trained.losses], "loss")
         + table([("steps", str(trained.steps)), ("examples", str(trained.examples)),
                  ("tokens", str(trained.tokens)), ("seconds", str(trained.seconds)),
                  ("compute dtype", trained.compute_dtype), ("attention", trained.attn_implementation)])),
        ("Validation", table([("rows", str(validation["total_rows"])), ("good", str(validation["good_rows"]))]
                             + [(f"quarantined: {k}", str(v)) for k, v in validation["bad_by_reason"].items()])),
        ("Lineage", table([(k, str(v)) for k, v in lineage.items()])),
    ])


def flatten(value: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out |= flatten(item, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = item
    return out


def log_shadow_report(registry: Registry, report, html_path: Path) -> None:
    """The shadow comparison on the challenger's MLflow run (metrics + HTML report) and its decision
    as a version tag, so the registry shows why a version was or was not promoted."""
    version = int(report.challenger_version)
    run_id = registry.version(version).run_id
    prefix = f"shadow_vs_v{report.champion_version}"
    figures = {"completed_pairs": report.counts.get("completed", 0), "error_rate": report.error_rate,
               "latency_ratio": report.latency_ratio, "length_ratio": report.length_ratio, **report.agreement}
    registry.log_metrics(run_id, {f"{prefix}_{k}": v for k, v in figures.items() if v == v})  # NaN: no pairs yet
    registry.log_artifact(run_id, html_path, f"shadow/v{report.champion_version}")
    registry.set_version_tags(version, {"ctloop.shadow_decision": f"{report.decision} vs v{report.champion_version} "
                                                                  f"({report.counts.get('completed', 0)} pairs)"})


def publish_shadow_report(registry: Registry, report, rows: list[dict], workspace_root: Path,
                          html_path: Path | None = None) -> Path:
    """Write the shadow report's HTML (default: <workspace>/shadow/vN-vs-vM.html) and log it to MLflow."""
    from ctloop.shadow.compare import write_html

    html_path = html_path or (workspace_root / "shadow"
                              / f"v{report.champion_version}-vs-v{report.challenger_version}.html")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    log_shadow_report(registry, report, write_html(report, rows, html_path))
    return html_path
