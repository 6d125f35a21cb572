"""Online drift detection: calibrated run length, resets, detection, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from ctloop.drift.online import OnlineDriftDetector, window_decision
from ctloop.errors import DataError


def _mean_run_length(detector: OnlineDriftDetector, rng: np.random.Generator, dims: int, alarms: int) -> float:
    lengths, since = [], 0
    while len(lengths) < alarms:
        for update in detector.update(rng.standard_normal((500, dims))):
            since += 1
            if update.drift:
                lengths.append(since)
                since = 0
    return float(np.mean(lengths))


def test_false_alarms_come_about_every_ert_instances():
    # A loose band for a test that must not flake: the benchmark (benchmarks/drift_online.py)
    # checks 10% over 1,000 alarms; here 3 reference samples x 80 alarms.
    run_lengths = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        detector = OnlineDriftDetector(
            rng.standard_normal((2000, 16)), ert=100, window=20, features=64, calibration_runs=400, seed=seed
        )
        run_lengths.append(_mean_run_length(detector, rng, 16, alarms=80))
    assert 70 <= np.mean(run_lengths) <= 140


def test_a_shift_is_detected_quickly_and_the_detector_resets_after_an_alarm():
    rng = np.random.default_rng(5)
    detector = OnlineDriftDetector(
        rng.standard_normal((2000, 16)), ert=400, window=20, features=64, calibration_runs=300
    )
    shifted = rng.standard_normal((400, 16)) + 1.0
    updates = detector.update(shifted)
    first = next(u for u in updates if u.drift)
    assert first.step <= 60  # far sooner than the 400 a false alarm would take on average
    after = updates[updates.index(first) + 1]
    assert after.step == 1 and np.isnan(after.statistic)  # the window refills after the reset


@pytest.mark.parametrize(
    ("reference", "kwargs", "message"),
    [
        (np.full((500, 4), np.nan), {}, "finite 2-D"),
        (np.zeros((50, 4)), {"window": 20}, "too few"),
        (np.zeros((500, 4)), {"ert": 30, "window": 20}, "at least twice the window"),
    ],
    ids=["nan", "too-few-rows", "ert-below-window"],
)
def test_bad_setups_are_refused(reference, kwargs, message):
    with pytest.raises(DataError, match=message):
        OnlineDriftDetector(reference, **kwargs)


def test_rows_of_the_wrong_width_are_refused():
    detector = OnlineDriftDetector(
        np.random.default_rng(0).standard_normal((500, 8)), ert=100, window=20, features=16, calibration_runs=50
    )
    with pytest.raises(DataError, match="8 dims"):
        detector.update(np.zeros((3, 9)))


@pytest.mark.parametrize(
    ("alarms", "rows", "ert", "drift"),
    [
        (10, 5000, 500, False),  # what no drift produces: "any alarm" called this drift (#16 item 7)
        (14, 5000, 500, False),
        (25, 5000, 500, True),
        (0, 5000, 500, False),
        (1, 150, 400, False),
        (4, 150, 400, True),
    ],
    ids=["expected-count", "a-few-more", "far-more", "none", "one-in-a-short-stream", "several-in-a-short-stream"],
)
def test_the_window_decision_weighs_alarms_against_the_expected_false_ones(alarms, rows, ert, drift):
    decided, expected, p_value = window_decision(alarms, rows, ert, alpha=0.05)
    assert decided is drift and expected == rows / ert and 0 < p_value <= 1


def test_the_gram_simulation_computes_the_feature_space_statistics():
    """References up to GRAM_ROWS rows calibrate through their Gram matrix: the same statistics,
    a fraction of the work."""
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((150, 12))
    detector = OnlineDriftDetector(reference, ert=100, window=20, features=32, calibration_runs=20)
    pool, picks, errors = detector._features(reference), rng.integers(0, 150, (4, 300)), rng.standard_normal((4, 150))
    centred = pool - detector.ref_mean
    gram, gram_severity = detector._gram_statistics(centred @ centred.T, picks, errors)
    features, feature_severity = detector._feature_statistics(pool, picks, errors)
    np.testing.assert_allclose(gram_severity, feature_severity, rtol=1e-9, atol=1e-12)
    assert gram.shape == features.shape == (4, 281)
    np.testing.assert_allclose(gram, features, rtol=1e-9, atol=1e-12)


def _alarms(detector: OnlineDriftDetector, rows: np.ndarray) -> list[int]:
    """The rows where the detector alarms on a stream, vectorised (checked equal to `update` below)."""
    phi = detector._features(rows)
    cumulative = np.cumsum(phi, axis=0)
    window = detector.window
    sums = cumulative[window - 1 :].copy()
    sums[1:] -= cumulative[: len(rows) - window]
    over = np.flatnonzero(((sums / window - detector.ref_mean) ** 2).sum(axis=1) > detector.threshold) + window - 1
    alarms, ready = [], window - 1
    for row in over:  # after an alarm the window refills: the next statistic comes `window` rows later
        if row >= ready:
            alarms.append(int(row))
            ready = row + window
    return alarms


@pytest.mark.slow
def test_each_reference_gets_at_least_its_run_length_not_only_the_average():
    """#23 item 12, the audit's setting (1,000-row references of N(0, I_32), ERT 500, window 50,
    5,000-row windows, alpha 0.05). Calibrated on the average over reference errors, the third
    reference ran 468 rows between false alarms and its window decisions were false 7% of the
    time; calibrated on the worst fifth of reference errors, every reference reaches the ERT."""
    rows, ert = 5000, 500
    run_lengths, false_rates = [], []
    for r in range(4):
        rng = np.random.default_rng(10_000 + r)
        detector = OnlineDriftDetector(rng.standard_normal((1000, 32)), ert=ert, window=50, seed=r)
        if r == 0:
            stream = rng.standard_normal((rows, 32))
            assert _alarms(detector, stream) == [i for i, u in enumerate(detector.update(stream)) if u.drift]
        counts = [len(_alarms(detector, rng.standard_normal((rows, 32)))) for _ in range(200)]
        run_lengths.append(rows / np.mean(counts))
        false_rates.append(np.mean([window_decision(c, rows, ert, 0.05)[0] for c in counts]))
    assert min(run_lengths) >= 0.95 * ert, run_lengths  # was 468 for the third reference
    assert max(false_rates) <= 0.05, false_rates  # was 0.070
