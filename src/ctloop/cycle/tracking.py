"""What a finished cycle leaves on its MLflow run: params, metrics, lineage tags and artifacts.
Called by the register stage."""

from __future__ import annotations

from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.registry.client import Registry
from ctloop.training.trainer import TrainResult


def log_cycle_run(
    registry: Registry,
    run_id: str,
    config: CtloopConfig,
    cycle_dir: Path,
    trained: TrainResult,
    evaluation,
    gate: dict,
    lineage: dict,
) -> None:
    """Params, metrics, tags and artifacts of a finished cycle on its MLflow run."""
    registry.log_params(run_id, flatten(config.model_dump(mode="json")))
    registry.log_series(run_id, "train_loss", trained.losses)
    registry.log_series(run_id, "learning_rate", trained.learning_rates)
    metrics = {"train_tokens": trained.tokens, "train_seconds": trained.seconds, "train_steps": trained.steps}
    metrics |= {f"{s}_{m}_loss": v for s, by_model in evaluation.means.items() for m, v in by_model.items()}
    metrics |= {
        f"{s}_{m}_{k}": v
        for s, by_model in evaluation.metric_means().items()
        for m, by_metric in by_model.items()
        for k, v in by_metric.items()
    }
    metrics |= {f"gate_{k}": v for k, v in gate["metrics"].items()} | {"gate_passed": float(gate["passed"])}
    registry.log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None})  # null: not computed
    registry.set_run_tags(
        run_id, {f"ctloop.{k}": str(v) for k, v in lineage.items()} | {"ctloop.gate": gate["outcome"]}
    )
    for name in (
        "validation.json",
        "drift.json",
        "drift.html",
        "replay_manifest.json",
        "training.json",
        "contamination.json",
        "eval.json",
        "gate.json",
        "quarantine.jsonl",
    ):  # report.html: the register stage writes and logs it once the version exists
        if (cycle_dir / name).is_file():
            registry.log_artifact(run_id, (cycle_dir / name), "reports")
    registry.log_artifact(run_id, cycle_dir / "train.parquet", "data")  # the next drift check's reference
    if (cycle_dir / "new_holdout.parquet").is_file():  # this era's holdout: the cumulative budget's, as anchor
        registry.log_artifact(run_id, cycle_dir / "new_holdout.parquet", "data")
    if (cycle_dir / "preference_train.parquet").is_file():  # a preference champion's own rows (drift reference)
        registry.log_artifact(run_id, cycle_dir / "preference_train.parquet", "data")
    registry.log_artifact(run_id, cycle_dir / "adapter", "adapter")


def flatten(value: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out |= flatten(item, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = item
    return out
