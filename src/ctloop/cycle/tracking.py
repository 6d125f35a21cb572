"""What a finished cycle leaves on its MLflow run: params, metrics, lineage tags and artifacts.
Called by the register stage."""

from __future__ import annotations

import math
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.evaluation.evaluate import EvalReport
from ctloop.evaluation.gate import GateDecision
from ctloop.registry.client import Registry
from ctloop.training.trainer import TrainResult


def log_cycle_run(
    registry: Registry,
    run_id: str,
    config: CtloopConfig,
    cycle_dir: Path,
    logged: list[tuple[str, str]],
    trained: TrainResult,
    evaluation: EvalReport,
    gate: GateDecision,
    lineage: dict,
) -> None:
    """Params, metrics, tags and artifacts of a finished cycle on its MLflow run. `logged`: (file in
    the cycle folder, MLflow artifact folder) of what the cycle's stages wrote (`declaration.logged_files`)."""
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
    # A gate metric not computed is NaN (null in gate.json): left off, as any metric not computed.
    metrics |= {f"gate_{k}": v for k, v in gate.metrics.items() if not math.isnan(v)}
    metrics |= {"gate_passed": float(gate.passed)}
    registry.log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None})
    registry.set_run_tags(run_id, {f"ctloop.{k}": str(v) for k, v in lineage.items()} | {"ctloop.gate": gate.outcome})
    for name, folder in logged:
        if (cycle_dir / name).exists():  # the optional ones (drift, contamination) only when written
            registry.log_artifact(run_id, cycle_dir / name, folder)


def flatten(value: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out |= flatten(item, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = item
    return out
