"""The training-seed noise of a model and recipe, measured (`ctloop calibrate-seeds`).

The gate's bootstrap resamples examples, not training runs, so each rule's bound also carries
`gate.seed_spread`: the standard deviation of a rule's relative change between two adapters trained
on the same data with different seeds. Its default was measured on the tiny quickstart model; a
real model's seeds may spread more, and every bound is then too narrow (at a true spread of 1%,
false passes reached 9.4% against 5%).

The measurement: the same training rows trained with k seeds, each adapter's mean token loss on
the same held-out rows, L_1..L_k. Two seeds' relative change has the standard deviation
sqrt(2) * sd(L) / mean(L); its one-sided upper confidence limit at `confidence` comes from the
chi-square distribution of the sample variance (k - 1 degrees of freedom). The gate uses the upper
limit, not the estimate: with few seeds the estimate is rough, and a spread too small passes too
much.

A measurement belongs to a base model (path or hub id, revision, dtype) and a recipe (the LoRA and
training settings but the seed): `recipe_key`. The data is not in the key: the spread is taken as
a property of the model and recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.data.records import Record

EVENT = "ctloop.seed_spread"  # the registered model's events holding each measurement


@dataclass(frozen=True)
class SeedSpread:
    recipe: str  # `recipe_key`
    base: str
    seeds: tuple[int, ...]
    losses: tuple[float, ...]  # each seed's mean token loss on the held-out rows
    spread: float  # sqrt(2) * sd / mean: two seeds' relative change, one standard deviation
    upper: float  # its one-sided upper confidence limit: what the gate uses
    confidence: float
    rows: int  # training rows
    holdout_rows: int
    measured_at: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SeedSpread:
        return cls(**{**raw, "seeds": tuple(raw["seeds"]), "losses": tuple(raw["losses"])})

    def summary(self) -> str:
        losses = ", ".join(f"{loss:.4f}" for loss in self.losses)
        return (
            f"seed spread of {self.base} with this recipe: {self.spread:.3%} between two seeds "
            f"({self.confidence:.0%} upper limit {self.upper:.3%}), from {len(self.seeds)} seeds on {self.rows} "
            f"training rows, held-out mean losses {losses}"
        )


def recipe_key(config: CtloopConfig) -> str:
    """What the spread depends on: the base model and the training recipe, all but its seed."""
    recipe = {
        "base": config.model.base,
        "revision": config.model.revision,
        "dtype": config.model.dtype,
        "lora": config.lora.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", exclude={"seed"}),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def spread_of(losses: list[float], confidence: float) -> tuple[float, float]:
    """(spread, upper limit) of two seeds' relative change from k seeds' mean losses."""
    from scipy.stats import chi2

    k = len(losses)
    sd = statistics.stdev(losses)
    spread = math.sqrt(2) * sd / statistics.fmean(losses)
    return spread, spread * math.sqrt((k - 1) / chi2.ppf(1 - confidence, k - 1))


def measure(
    config: CtloopConfig, train_rows: list[Record], holdout: list[Record], seeds: int, work: Path
) -> SeedSpread:
    """Train `train_rows` with seeds 1..`seeds` and score each adapter on `holdout`."""
    from ctloop.evaluation.evaluate import evaluate
    from ctloop.training.trainer import train_adapter

    if seeds < 2:
        raise ValueError("a spread needs at least 2 seeds; 4 or more give a usable upper limit")
    adapters: dict[str, Path | None] = {}
    for seed in range(1, seeds + 1):
        out = work / f"seed-{seed}"
        if not (out / "adapter_config.json").is_file():  # a rerun after a crash keeps the seeds trained
            train_adapter(
                train_rows,
                model=config.model,
                lora=config.lora,
                train=config.train.model_copy(update={"seed": seed, "checkpoint_every": 0}),
                out_dir=out,
            )
        adapters[f"seed-{seed}"] = out
    report = evaluate({"holdout": holdout}, adapters, model=config.model, config=config.eval)
    losses = [report.mean("holdout", name) for name in adapters]
    spread, upper = spread_of(losses, config.gate.confidence)
    return SeedSpread(
        recipe=recipe_key(config),
        base=config.model.base,
        seeds=tuple(range(1, seeds + 1)),
        losses=tuple(losses),
        spread=spread,
        upper=upper,
        confidence=config.gate.confidence,
        rows=len(train_rows),
        holdout_rows=len(holdout),
        measured_at=time.time(),
    )


def recorded(events: list[dict], config: CtloopConfig) -> SeedSpread | None:
    """The newest measurement of this model and recipe among the registered model's events."""
    key = recipe_key(config)
    matching = [SeedSpread.from_dict(e) for e in events if e.get("recipe") == key]
    return matching[-1] if matching else None
