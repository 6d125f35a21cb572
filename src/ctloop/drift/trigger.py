"""The trigger policy: does this cycle train? A pure function of the facts the pipeline gathers.

Trains when forced, when there is no champion yet, when drift checking is off, when the last
training is older than `drift.retrain_after_days`, or when drift is detected outside the cooldown.
Otherwise the cycle records why and stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctloop.config import DriftConfig
from ctloop.drift.detectors import DriftReport


@dataclass(frozen=True)
class TriggerDecision:
    train: bool
    reason: str

    def summary(self) -> str:
        return f"trigger: {'train' if self.train else 'skip'} - {self.reason}"


def decide_trigger(
    drift: DriftReport | None,
    *,
    has_champion: bool,
    force: bool,
    hours_since_training: float | None,
    config: DriftConfig,
) -> TriggerDecision:
    if force:
        return TriggerDecision(True, "forced (--force)")
    if not has_champion:
        return TriggerDecision(True, "no champion yet: the first cycle always trains")
    if not config.enabled:
        return TriggerDecision(True, "drift.enabled is false: every cycle trains")
    if config.retrain_after_days is not None and (
        hours_since_training is None or hours_since_training >= 24 * config.retrain_after_days
    ):
        return TriggerDecision(
            True, f"last training is older than drift.retrain_after_days={config.retrain_after_days}"
        )
    if drift is None:
        raise ValueError("drift checking is enabled but no drift report was computed")
    if drift.outcome == "not_enough_data":
        return TriggerDecision(False, "not enough data for a drift decision: " + "; ".join(drift.reasons))
    if drift.outcome == "no_drift":
        return TriggerDecision(False, f"no drift detected ({drift.evidence()}); use --force to train anyway")
    if hours_since_training is not None and hours_since_training < config.cooldown_hours:
        return TriggerDecision(
            False,
            f"drift detected, but the last training was {hours_since_training:.1f} h ago, "
            f"inside drift.cooldown_hours={config.cooldown_hours}",
        )
    return TriggerDecision(True, f"drift detected ({drift.evidence()})")
