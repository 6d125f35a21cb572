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


@pytest.mark.slow
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


def test_the_lifetime_shares_sum_to_at_most_the_budget_over_any_number_of_looks(tmp_path):
    """#23: watch.alpha_spending: lifetime. The constant rounds sum 1/((k+1) ln^2(k+1)) up: its
    partial sum to N plus the integral bound of the tail, 1/ln(N), is below it."""
    import math

    from ctloop.drift.budget import LIFETIME_SUM

    n = 200_000
    partial = math.fsum(1 / ((k + 1) * math.log(k + 1) ** 2) for k in range(1, n + 1))
    assert partial + 1 / math.log(n + 1) <= LIFETIME_SUM < partial + 1 / math.log(n + 1) + 1e-4
    state, settings = tmp_path / "state.json", WatchConfig(false_alarm_budget=0.05, alpha_spending="lifetime")
    looks = [take_look(state, settings) for _ in range(400)]
    assert {w.period for w in looks} == {1} and [w.look for w in looks] == list(range(1, 401))
    alphas = [w.alpha for w in looks]
    assert alphas == sorted(alphas, reverse=True) and sum(alphas) < 0.05
    assert alphas[0] == pytest.approx(0.05 / (LIFETIME_SUM * 2 * math.log(2) ** 2))
    assert "any false alarm over the watch's whole life is at most 0.05" in looks[-1].describe()
    back = take_look(state, WatchConfig(false_alarm_budget=0.05))  # back to periods: a new budget
    assert (back.period, back.look, back.spending) == (2, 1, "period") and "alpha_spending lifetime -> period" in (
        back.new_period_reason
    )


def test_a_lifetime_watch_needs_a_detector_with_analytic_p_values():
    with pytest.raises(Exception, match=r"alpha_spending=lifetime.*add pca_ks to drift.detectors"):
        config_from_dict({"model": {"base": "x"}, "watch": {"alpha_spending": "lifetime"}})
    config_from_dict(
        {"model": {"base": "x"}, "watch": {"alpha_spending": "lifetime"}, "drift": {"detectors": ["mmd", "pca_ks"]}}
    )


@pytest.mark.slow
def test_a_lifetime_watch_keeps_false_alarms_within_the_budget_over_many_periods(tmp_path):
    """240 hourly looks (10 periods of 24) at traffic drawn like the reference, each look's window the
    last 6 hours. Per period, a budget of 0.05 bounds each period, not the ten together: a fifth or
    more of the watches raise a false alarm; with lifetime spending at most the budget's share."""
    from ctloop.drift.detectors import pca_ks_test

    looks, watches, per_hour, dims = 240, 30, 20, 8
    period_alarms = lifetime_alarms = 0
    for w in range(watches):
        rng = np.random.default_rng(100 + w)
        reference = rng.normal(size=(300, dims))
        hours = rng.normal(size=(looks + 5, per_hour, dims))
        period = WatchConfig(false_alarm_budget=0.05, period_looks=24)
        lifetime = WatchConfig(false_alarm_budget=0.05, alpha_spending="lifetime")
        periodic = forever = False
        for hour in range(5, looks + 5):
            window = hours[hour - 5 : hour + 1].reshape(-1, dims)
            p_value = pca_ks_test(np.vstack([reference, window]), len(reference), 4).p_value  # the detector itself
            periodic |= p_value <= take_look(tmp_path / f"p{w}.json", period).alpha
            forever |= p_value <= take_look(tmp_path / f"l{w}.json", lifetime).alpha
        period_alarms += periodic
        lifetime_alarms += forever
    print(
        f"watches with a false alarm in 240 looks: per period {period_alarms} of {watches}, lifetime {lifetime_alarms}"
    )
    assert period_alarms >= 5, period_alarms
    assert lifetime_alarms <= 4, lifetime_alarms  # expected <= 1.5 (0.05 x 30)
