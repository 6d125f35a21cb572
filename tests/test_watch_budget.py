"""The drift watch's false-alarm budget: looks counted per period, alpha per look, concurrent looks,
a corrupt state file, and the simulation that shows why (a watch testing every look at alpha
raises false alarms far above alpha over a period; the budgeted one stays within it)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from ctloop.config import DriftConfig, WatchConfig, config_from_dict
from ctloop.drift.budget import take_look
from ctloop.drift.detectors import detect_drift
from ctloop.errors import DataError


def test_looks_are_counted_per_period_and_each_spends_its_share(tmp_path):
    state, settings = tmp_path / "watch" / "state.json", WatchConfig(false_alarm_budget=0.06, period_looks=3)
    looks = [take_look(state, settings) for _ in range(7)]
    assert [(w.period, w.look) for w in looks] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)]
    assert [w.alpha for w in looks] == pytest.approx([0.02] * 7)
    assert "at most 0.06" in looks[0].describe() and looks[3].new_period_reason
    changed = take_look(state, WatchConfig(false_alarm_budget=0.01, period_looks=3))
    assert (changed.period, changed.look) == (4, 1) and "settings changed" in changed.new_period_reason


def test_concurrent_watches_take_distinct_looks(tmp_path):
    state, settings = tmp_path / "state.json", WatchConfig(period_looks=1000)
    taken: list[int] = []

    def watch() -> None:
        for _ in range(25):
            taken.append(take_look(state, settings).look)

    threads = [threading.Thread(target=watch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 101))


def test_a_corrupt_state_file_names_itself_and_the_fix(tmp_path):
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(DataError, match=r"state\.json is unreadable.*delete it"):
        take_look(state, WatchConfig())
    state.write_text(json.dumps({"period": 1}))
    with pytest.raises(DataError, match="KeyError"):
        take_look(state, WatchConfig())


def test_a_budget_needing_too_many_permutations_is_refused():
    with pytest.raises(Exception, match=r"watch.period_looks=100000.*permutations"):
        config_from_dict({"model": {"base": "x"}, "watch": {"period_looks": 100_000, "false_alarm_budget": 0.01}})


def test_a_budgeted_watch_keeps_false_alarms_within_the_budget_where_per_look_testing_does_not(tmp_path):
    """One period of 24 hourly looks at traffic drawn like the reference, each look's window the
    last 6 hours (overlapping). 40 simulated watches: at alpha 0.05 per look most of them raise a
    false alarm; with the budget of 0.05 spread over the period at most a few do."""
    config = DriftConfig(detectors=["mean"], permutations=99, min_rows=5)
    looks, watches, per_hour, dims = 24, 40, 20, 8
    per_look_alarms = budget_alarms = 0
    for w in range(watches):
        rng = np.random.default_rng(w)
        reference = rng.normal(size=(200, dims))
        hours = rng.normal(size=(looks + 5, per_hour, dims))
        state, settings = tmp_path / f"w{w}.json", WatchConfig(false_alarm_budget=0.05, period_looks=looks)
        per_look = budgeted = False
        for hour in range(5, looks + 5):
            window = hours[hour - 5 : hour + 1].reshape(-1, dims)
            per_look |= detect_drift(reference, window, config).drift
            budgeted |= detect_drift(reference, window, config, alpha=take_look(state, settings).alpha).drift
        per_look_alarms += per_look
        budget_alarms += budgeted
    assert per_look_alarms >= 12, per_look_alarms  # about 1 - 0.95^(24 looks / overlap) of the watches
    assert budget_alarms <= 6, budget_alarms  # expected <= 2 (0.05 x 40); 6 or more has P < 2% under the bound
