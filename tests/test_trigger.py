"""The trigger policy: a pure function of the facts, one informative reason per decision."""

from __future__ import annotations

import pytest

from ctloop.config import DriftConfig
from ctloop.drift.detectors import DetectorResult, DriftReport
from ctloop.drift.trigger import TriggerDecision, decide_trigger

MMD_HIT = DetectorResult("mmd", 0.25, 0.002, drift=True, adjusted_p=0.004)
MMD_MISS = DetectorResult("mmd", 0.001, 0.4, drift=False, adjusted_p=0.8)

DRIFT = DriftReport("drift", 200, 150, 0.05, (MMD_HIT,), ("mmd: p 0.002 <= alpha",))
NO_DRIFT = DriftReport("no_drift", 200, 150, 0.05, (MMD_MISS,), ("mmd: p 0.4 > alpha",))
TOO_FEW = DriftReport(
    "not_enough_data",
    200,
    12,
    0.05,
    (),
    ("reference has 200 rows and current 12; each needs at least drift.min_rows=50 for a decision",),
)

DEFAULT = DriftConfig()
COOLDOWN = DriftConfig(cooldown_hours=24.0)
RETRAIN = DriftConfig(retrain_after_days=7)


@pytest.mark.parametrize(
    ("report", "has_champion", "force", "hours", "config", "train", "fragments"),
    [
        (NO_DRIFT, True, True, 1.0, COOLDOWN, True, ["forced", "--force"]),
        (None, True, True, None, DEFAULT, True, ["forced"]),
        (None, False, False, None, DEFAULT, True, ["no champion", "first cycle"]),
        (NO_DRIFT, False, False, 1.0, COOLDOWN, True, ["no champion"]),
        (None, True, False, 1.0, DriftConfig(enabled=False), True, ["drift.enabled is false"]),
        (NO_DRIFT, True, False, 24 * 7.0, RETRAIN, True, ["drift.retrain_after_days=7", "older"]),
        (NO_DRIFT, True, False, 24 * 30.0, RETRAIN, True, ["drift.retrain_after_days=7"]),
        (None, True, False, 24 * 30.0, RETRAIN, True, ["drift.retrain_after_days=7"]),
        (TOO_FEW, True, False, None, RETRAIN, True, ["drift.retrain_after_days=7"]),
        (NO_DRIFT, True, False, 24 * 7.0 - 1, RETRAIN, False, ["no drift detected", "mmd p=0.4", "--force"]),
        (DRIFT, True, False, 2.0, COOLDOWN, False, ["drift detected", "2.0 h ago", "drift.cooldown_hours=24.0"]),
        (DRIFT, True, False, 24.0, COOLDOWN, True, ["drift detected", "mmd p=0.002"]),
        (DRIFT, True, False, 100.0, COOLDOWN, True, ["drift detected", "reference 200", "current 150"]),
        (DRIFT, True, False, None, COOLDOWN, True, ["drift detected"]),
        (DRIFT, True, False, 0.1, DEFAULT, True, ["drift detected"]),
        (NO_DRIFT, True, False, 3.0, DEFAULT, False, ["no drift detected", "use --force to train anyway"]),
        (TOO_FEW, True, False, 3.0, DEFAULT, False, ["not enough data", "drift.min_rows=50", "current 12"]),
    ],
    ids=[
        "force-overrides-no-drift",
        "force-without-report",
        "no-champion",
        "no-champion-beats-no-drift",
        "drift-disabled",
        "retrain-due-exactly",
        "retrain-due-long-ago",
        "retrain-due-without-report",
        "retrain-never-trained",
        "retrain-not-due",
        "drift-inside-cooldown",
        "drift-at-cooldown-end",
        "drift-outside-cooldown",
        "drift-never-trained",
        "drift-no-cooldown",
        "no-drift",
        "not-enough-data",
    ],
)
def test_decision_table(report, has_champion, force, hours, config, train, fragments):
    decision = decide_trigger(report, has_champion=has_champion, force=force, hours_since_training=hours, config=config)
    assert isinstance(decision, TriggerDecision)
    assert decision.train is train
    for fragment in fragments:
        assert fragment in decision.reason


def test_summary_says_train_or_skip_and_why():
    train = decide_trigger(DRIFT, has_champion=True, force=False, hours_since_training=None, config=DEFAULT)
    skip = decide_trigger(NO_DRIFT, has_champion=True, force=False, hours_since_training=None, config=DEFAULT)
    assert train.summary().startswith("trigger: train - drift detected")
    assert skip.summary().startswith("trigger: skip - no drift detected")


@pytest.mark.parametrize(
    "config",
    [DEFAULT, RETRAIN],
    ids=["no-retrain-rule", "retrain-not-due"],
)
def test_enabled_without_a_report_raises(config):
    with pytest.raises(ValueError, match="no drift report was computed"):
        decide_trigger(None, has_champion=True, force=False, hours_since_training=1.0, config=config)
